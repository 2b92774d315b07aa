// queue_ext dashboard: confirmations for actions, and live counts from /events.
// Values from the server are written with textContent only, never as markup.
"use strict";

document.addEventListener("submit", function (ev) {
  var el = (ev.submitter && ev.submitter.dataset.confirm) ? ev.submitter : ev.target;
  var question = el.dataset ? el.dataset.confirm : null;
  if (question && !window.confirm(question)) {
    ev.preventDefault();
  }
});

(function () {
  var rows = document.querySelectorAll("tr[data-queue]");
  var live = document.getElementById("live");
  if (!rows.length || !window.EventSource) {
    return;
  }
  var source = new EventSource("/events");
  source.addEventListener("counts", function (ev) {
    var data;
    try { data = JSON.parse(ev.data); } catch (e) { return; }
    if (!data.queues) {
      if (live) { live.textContent = "live: " + (data.error || "no data"); }
      return;
    }
    var byName = {};
    data.queues.forEach(function (q) { byName[q.queue] = q; });
    rows.forEach(function (row) {
      var q = byName[row.dataset.queue];
      if (!q) { return; }
      row.querySelectorAll("td[data-k]").forEach(function (cell) {
        var k = cell.dataset.k;
        var text = k === "paused" ? (q.paused ? "paused" : "active") : String(q[k]);
        if (cell.textContent !== text) { cell.textContent = text; }
      });
    });
    if (live) { live.textContent = "live " + new Date().toLocaleTimeString(); }
  });
  source.onerror = function () {
    if (live) { live.textContent = "reconnecting…"; }
  };
})();
