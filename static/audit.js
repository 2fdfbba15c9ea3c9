// Live progress of a running audit through the server-sent event stream. Without JS the page refreshes itself.
(function () {
  "use strict";
  var root = document.getElementById("audit");
  if (!root || !window.EventSource) { return; }
  var id = root.getAttribute("data-audit-id");
  var planned = parseInt(root.getAttribute("data-planned"), 10) || 0;
  var rows = document.getElementById("check-rows");
  var progress = document.getElementById("progress");
  var bar = document.getElementById("progress-bar");
  var status = document.getElementById("status");
  var eta = document.getElementById("eta");
  var started = parseInt(root.getAttribute("data-started"), 10) || Math.floor(Date.now() / 1000);
  var seen = {};
  var count = rows ? rows.children.length : 0;

  function part(parent, tag, text, cls) {
    var el = document.createElement(tag);
    if (cls) { el.className = cls; }
    el.textContent = text;
    parent.appendChild(el);
    return el;
  }

  // one finished check, as the server renders it while the test runs (the finished page groups them by port)
  function item(check) {
    var li = document.createElement("li");
    li.className = "check verdict-" + check.verdict;
    var head = part(li, "p", "");
    part(head, "code", check.name);
    head.appendChild(document.createTextNode(" "));
    part(head, "span", check.verdict, "badge");
    head.appendChild(document.createTextNode(" "));
    part(head, "span", check.reason, "small");
    if (check.description) { part(li, "p", check.description, "small"); }
    part(li, "p", check.detail || "", "detail");
    return li;
  }

  var source = new EventSource("/api/v1/audits/" + encodeURIComponent(id) + "/events");
  if (status) { status.textContent = root.getAttribute("data-running") || "running"; }
  var ofText = root.getAttribute("data-of") || "%(done)s of %(planned)s";
  var etaText = root.getAttribute("data-eta") || ", about {eta} seconds left";
  source.addEventListener("check", function (ev) {
    var check = JSON.parse(ev.data);
    var known = seen[check.seq];
    if (known) {  // the same row in its final state (our sink received its message): update it in place
      if (known.nodeType) { var fresh = item(check); rows.replaceChild(fresh, known); seen[check.seq] = fresh; }
      return;
    }
    seen[check.seq] = true;
    if (check.seq <= count) { return; }  // already rendered by the server
    count += 1;
    var li = item(check);
    rows.appendChild(li);
    seen[check.seq] = li;
    if (progress) { progress.textContent = ofText.replace("%(done)s", count).replace("%(planned)s", planned); }
    if (bar) { bar.value = count; }
    if (eta && count > 0 && planned > count) {
      var elapsed = Date.now() / 1000 - started;
      eta.textContent = etaText.replace("{eta}", Math.max(1, Math.round(elapsed / count * (planned - count))));
    }
  });
  source.addEventListener("done", function () {
    source.close();
    window.location.reload();  // the finished page renders the summary and the evidence
  });
})();
