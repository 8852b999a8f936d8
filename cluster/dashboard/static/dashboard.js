// moeyard dashboard: polls /api/panels every 2 s and drops the server-rendered
// fragments into their sections. No frameworks, nothing external.
(function () {
  "use strict";

  var INTERVAL_MS = 2000;
  var STORAGE_KEY = "moeyard.lookback";

  var timer = null;        // pending setTimeout id
  var inFlight = false;    // a request is running: never overlap
  var again = false;       // refresh as soon as the running request ends (lookback changed)
  var stopped = false;     // 401: stop for good
  var paused = false;
  var tokenStripped = false;

  function $(id) { return document.getElementById(id); }

  function clock(unixSeconds) {
    var d = new Date(unixSeconds * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  function lookback() {
    return $("lookback").value;
  }

  function setStatus(state, text) {
    var el = $("update-status");
    el.setAttribute("data-state", state);
    el.textContent = text;
  }

  function showError(text) {
    var el = $("fetch-error");
    if (text) {
      el.textContent = text;
      el.hidden = false;
    } else {
      el.textContent = "";
      el.hidden = true;
    }
  }

  // The server set the session cookie when it served the page: drop ?token= from the address bar.
  function stripToken() {
    if (tokenStripped) return;
    tokenStripped = true;
    try {
      var url = new URL(window.location.href);
      if (url.searchParams.has("token")) {
        url.searchParams.delete("token");
        var rest = url.searchParams.toString();
        history.replaceState(history.state, "", url.pathname + (rest ? "?" + rest : "") + url.hash);
      }
    } catch (e) { /* old browser: leave the URL alone */ }
  }

  // Model name and Redis status come with the serving panel (a hidden .panel-meta element).
  function updateHeader() {
    var meta = document.querySelector("#panel-serving .panel-meta");
    if (!meta) return;
    $("model").textContent = meta.getAttribute("data-model") || "–";
    var redis = $("redis-status");
    var ok = meta.getAttribute("data-redis") === "ok";
    var err = meta.getAttribute("data-redis-error") || "";
    redis.setAttribute("data-redis", ok ? "ok" : "error");
    redis.textContent = ok ? "ok" : ("error" + (err ? ": " + err : ""));
  }

  function applyPanels(data) {
    var panels = data.panels || {};
    Object.keys(panels).forEach(function (name) {
      var body = document.querySelector("#panel-" + name + " .panel-body");
      if (body) body.innerHTML = panels[name];
    });
    updateHeader();
    stripToken();
    setStatus("ok", "updated " + clock(data.time));
    showError("");
    document.body.setAttribute("data-updated", String(data.time));
  }

  function expire() {
    stopped = true;
    if (timer !== null) { clearTimeout(timer); timer = null; }
    setStatus("expired", "session expired");
    $("session-expired").hidden = false;
    showError("");
  }

  function schedule(ms) {
    if (stopped || paused) return;
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function poll() {
    timer = null;
    if (stopped || paused) return;
    if (inFlight) { again = true; return; }
    inFlight = true;
    var url = "/api/panels?lookback=" + encodeURIComponent(lookback());
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "application/json" } })
      .then(function (resp) {
        if (resp.status === 401) { expire(); return null; }
        if (!resp.ok) {
          return resp.text().then(function (t) {
            throw new Error("HTTP " + resp.status + (t ? ": " + t.slice(0, 200) : ""));
          });
        }
        return resp.json();
      })
      .then(function (data) {
        if (data) applyPanels(data);
      })
      .catch(function (err) {
        setStatus("error", "update failed");
        showError("could not update: " + (err && err.message ? err.message : String(err)) + " (retrying)");
      })
      .then(function () {
        inFlight = false;
        if (again) { again = false; schedule(0); } else { schedule(INTERVAL_MS); }
      });
  }

  function init() {
    var select = $("lookback");
    try {
      var saved = window.localStorage.getItem(STORAGE_KEY);
      if (saved && select.querySelector('option[value="' + saved + '"]')) select.value = saved;
    } catch (e) { /* storage disabled */ }
    select.addEventListener("change", function () {
      try { window.localStorage.setItem(STORAGE_KEY, select.value); } catch (e) { /* ignore */ }
      setStatus("loading", "loading…");
      if (inFlight) { again = true; } else { schedule(0); }
    });
    var pause = $("pause");
    pause.addEventListener("click", function () {
      paused = !paused;
      pause.setAttribute("aria-pressed", paused ? "true" : "false");
      pause.textContent = paused ? "resume" : "pause";
      if (paused) {
        if (timer !== null) { clearTimeout(timer); timer = null; }
        if (!stopped) setStatus("paused", "paused");
      } else if (!inFlight) {
        schedule(0);
      }
    });
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
