"""The operator dashboard: expert load, placement, autoscaler timeline, serving health, ``/metrics``.

``state`` (what is shown, typed), ``collect`` (builds it from Redis and the shard manager),
``render`` (server-rendered SVG panels), ``prom`` (the Prometheus collector), ``server`` (aiohttp:
token auth, pages, JSON, ``/metrics``), ``static/`` (the page, its script and styles: no CDN).
"""
