// Crabbox portal: live updates over server-sent events and copy buttons.
// Pages work without this script; it only keeps them current.
"use strict";
(function () {
  function wireCopy(root) {
    root.querySelectorAll(".cmd button.copy").forEach(function (b) {
      b.hidden = false;
      b.onclick = function () {
        var code = b.parentNode.querySelector("code");
        if (code && navigator.clipboard) {
          navigator.clipboard.writeText(code.textContent).then(function () {
            b.textContent = "Copied";
            setTimeout(function () { b.textContent = "Copy"; }, 1200);
          });
        }
      };
    });
  }
  function replace(ev) {
    var m = JSON.parse(ev.data);
    var old = document.getElementById(m.id);
    if (!old) return;
    var t = document.createElement("template");
    t.innerHTML = m.html;
    var fresh = t.content.firstElementChild;
    if (!fresh) return;
    old.replaceWith(fresh);
    wireCopy(fresh);
  }
  document.addEventListener("DOMContentLoaded", function () {
    wireCopy(document);
    document.body.dataset.js = "on";
    var live = document.querySelector("[data-live]");
    if (live && window.EventSource) {
      var es = new EventSource(live.dataset.live);
      es.addEventListener("replace", replace);
      es.addEventListener("open", function () { document.body.dataset.stream = "open"; });
    }
    var run = document.querySelector("[data-run-live]");
    if (run && window.EventSource) {
      var url = run.dataset.runLive + "?after=" + encodeURIComponent(run.dataset.after || "0");
      var rs = new EventSource(url);
      rs.addEventListener("open", function () { document.body.dataset.stream = "open"; });
      rs.addEventListener("replace", replace);
      rs.addEventListener("output", function (ev) {
        var e = JSON.parse(ev.data);
        var target = document.getElementById(e.stream === "stdout" ? "stdout" : e.stream === "stderr" ? "stderr" : "events");
        target.appendChild(document.createTextNode(e.stream ? e.text : e.text + "\n"));
        run.dataset.after = String(e.seq);
        target.scrollTop = target.scrollHeight;
      });
      rs.addEventListener("end", function () {
        rs.close();
        document.body.dataset.stream = "ended";
      });
    }
  });
})();
