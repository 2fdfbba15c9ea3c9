// Copy buttons on code blocks (guides, the curl command): progressive enhancement; without JS the text is there to select.
(function () {
  "use strict";
  if (!navigator.clipboard) { return; }
  var labels = document.body.dataset;
  var copy = labels.copy || "Copy", copied = labels.copied || "Copied";
  var blocks = document.querySelectorAll(".guide pre > code, pre.command > code");
  Array.prototype.forEach.call(blocks, function (code) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = copy;
    button.setAttribute("aria-label", labels.copyLabel || "Copy this block");
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(code.textContent).then(function () {
        button.textContent = copied;
        window.setTimeout(function () { button.textContent = copy; }, 2000);
      });
    });
    code.parentNode.insertBefore(button, code);
  });
})();
