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
    refreshJobs(byName);
    refreshCharts(data.queues);
  });
  // The overview's charts, re-rendered by the server when any count changes: the page is
  // fetched again and only its [data-chart] elements are swapped in (the server escapes
  // everything it renders, and the CSP forbids inline script either way).
  var charts = document.querySelectorAll("[data-chart]");
  var chartSig = null;   // the counts the charts on the page were fetched for
  var latestSig = null;  // the newest counts seen
  var chartBusy = false;
  function refreshCharts(queues) {
    if (!charts.length) { return; }
    latestSig = JSON.stringify(queues);
    if (chartSig === null) { chartSig = latestSig; return; }
    if (chartBusy || latestSig === chartSig) { return; }
    var sig = latestSig;
    chartBusy = true;
    fetch(window.location.pathname, { credentials: "same-origin" }).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (!html) { return; }
      chartSig = sig;
      var fresh = new DOMParser().parseFromString(html, "text/html");
      document.querySelectorAll("[data-chart]").forEach(function (el) {
        var next = fresh.querySelector('[data-chart="' + CSS.escape(el.dataset.chart) + '"]');
        if (next) { el.replaceWith(document.importNode(next, true)); }
      });
    }).catch(function () {}).then(function () {
      chartBusy = false;
      // Counts moved again while the page was fetched: fetch once more.
      if (latestSig !== chartSig) { refreshCharts(JSON.parse(latestSig)); }
    });
  }

  // A queue's first page of jobs, reloaded from the JSON API when its counts change.
  var jobs = document.querySelector("table[data-live]");
  var seen = null;
  function refreshJobs(byName) {
    if (!jobs) { return; }
    var q = byName[jobs.dataset.queueName];
    var sig = q ? JSON.stringify(q) : "";
    if (seen === null || sig === seen) { seen = sig; return; }
    seen = sig;
    fetch(jobs.dataset.live, { credentials: "same-origin" }).then(function (r) {
      return r.ok ? r.json() : null;
    }).then(function (data) {
      if (!data || !data.jobs) { return; }
      var body = document.createElement("tbody");
      data.jobs.forEach(function (j) {
        var tr = document.createElement("tr");
        var link = document.createElement("a");
        link.href = "/jobs/" + encodeURIComponent(j.id);
        link.textContent = j.id;
        var first = document.createElement("td");
        first.appendChild(link);
        tr.appendChild(first);
        [j.state, j.priority, String(j.attempt), j.at || "", j.payload, (j.last_error || "").slice(0, 200)]
          .forEach(function (text, i) {
            var td = document.createElement("td");
            if (i === 4) {
              var code = document.createElement("code");
              code.textContent = text;
              td.appendChild(code);
            } else {
              td.textContent = text;
            }
            tr.appendChild(td);
          });
        body.appendChild(tr);
      });
      jobs.replaceChild(body, jobs.tBodies[0]);
    }).catch(function () {});
  }

  source.onerror = function () {
    if (live) { live.textContent = "reconnecting…"; }
  };
})();
