// Dual stack: ask the site's other-family name which address this visitor has there, and say it.
// Without JS (or when the other family is not reachable) the plain link to that test page stays.
(function () {
  "use strict";
  var box = document.getElementById("other-family");
  if (!box || !window.fetch) { return; }
  var url = box.getAttribute("data-url");
  fetch(url + "/api/v1/whoami", {credentials: "omit", cache: "no-store"})
    .then(function (response) { return response.ok ? response.json() : null; })
    .then(function (data) {
      if (!data || !data.address) { return; }
      var found = document.getElementById("other-found");
      found.textContent = box.getAttribute("data-found").replace("{address}", data.address);
      found.hidden = false;
    })
    .catch(function () { /* that family is not reachable from here: the link is enough */ });
})();
