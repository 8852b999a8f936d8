"""Infrastructure: Redis connection and local server, telemetry through Redis, TLS credentials, Ray auth, node IP."""
