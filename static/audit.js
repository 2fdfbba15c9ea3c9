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

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) { var span = document.createElement("span"); span.className = cls; span.textContent = text; td.appendChild(span); }
    else { td.textContent = text; }
    tr.appendChild(td);
    return td;
  }

  var source = new EventSource("/api/v1/audits/" + encodeURIComponent(id) + "/events");
  if (status) { status.textContent = root.getAttribute("data-running") || "running"; }
  var ofText = root.getAttribute("data-of") || "%(done)s of %(planned)s";
  var etaText = root.getAttribute("data-eta") || ", about {eta} seconds left";
  source.addEventListener("check", function (ev) {
    var check = JSON.parse(ev.data);
    var known = seen[check.seq];
    if (known) {  // the same row in its final state (our sink received its message): update it in place
      if (known.nodeType) {
        known.className = "verdict-" + check.verdict;
        known.children[3].firstChild.textContent = check.verdict + " (" + check.reason + ")";
        known.children[4].textContent = check.detail || "";
      }
      return;
    }
    seen[check.seq] = true;
    if (check.seq <= count) { return; }  // already rendered by the server
    count += 1;
    var tr = document.createElement("tr");
    tr.className = "verdict-" + check.verdict;
    cell(tr, check.host); cell(tr, String(check.port));
    var what = cell(tr, check.name);
    if (check.description) {
      var p = document.createElement("p"); p.className = "small"; p.textContent = check.description; what.appendChild(p);
    }
    cell(tr, check.verdict + " (" + check.reason + ")", "badge");
    cell(tr, check.detail || "");
    rows.appendChild(tr);
    seen[check.seq] = tr;
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
