// The dashboard's only script: a rollout page refreshes its live part every 2 s by
// fetching the server-rendered fragment (same origin, the session cookie), until the
// rollout has ended. Without JavaScript the page still works: reload it.
(function () {
  "use strict";
  var PERIOD_MS = 2000;
  function start() {
    var live = document.getElementById("live");
    if (!live || live.getAttribute("data-finished") === "1") { return; }
    var url = live.getAttribute("data-live-url");
    var busy = false;
    var timer = window.setInterval(function () {
      if (busy || document.hidden) { return; }
      // an operator typing a reason: do not replace the form under them
      if (live.contains(document.activeElement) && document.activeElement.tagName === "INPUT") { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) {
          if (r.redirected || r.status === 401 || r.status === 403) { window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null) { return; }
          live.innerHTML = html;
          live.setAttribute("data-updated", String(Date.now()));
          var root = live.querySelector(".live-root");
          if (root && root.getAttribute("data-finished") === "1") {
            live.setAttribute("data-finished", "1");
            window.clearInterval(timer);
          }
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    }, PERIOD_MS);
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
