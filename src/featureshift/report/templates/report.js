// featureshift report: sortable and filterable tables, the most changed channels and the snapshot slider. No network, no libraries.
(function () {
  "use strict";

  // A column's first click puts the most changed channels first: data-first says which
  // direction that is (descending for a weight change, ascending for a correlation).
  function sortTable(table, col, th, direction) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var current = th.getAttribute("aria-sort");
    var asc = direction ? direction === "ascending"
      : current ? current !== "ascending" : th.getAttribute("data-first") !== "descending";
    var numeric = th.classList.contains("num");
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-value"), y = b.cells[col].getAttribute("data-value");
      // Cells with no value (not measured, dead) always go last, whichever the direction.
      if (x === null || x === "") return (y === null || y === "") ? 0 : 1;
      if (y === null || y === "") return -1;
      var d = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return asc ? d : -d;
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) button.addEventListener("click", function () { sortTable(table, col, th); });
    });
  });

  // "layer-x.html#sort=weight_change" opens the page ranked by that measure, most changed first.
  function sortFromHash() {
    var m = /^#sort=([A-Za-z0-9_]+)$/.exec(window.location.hash);
    if (!m) return;
    document.querySelectorAll("table.sortable").forEach(function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
        if (th.getAttribute("data-key") === m[1]) {
          sortTable(table, col, th, th.getAttribute("data-first") || "ascending");
          table.scrollIntoView();
        }
      });
    });
  }
  sortFromHash();
  window.addEventListener("hashchange", sortFromHash);

  // Channel filters: a channel spec ("3, 10-20"), the channel's feature, and whether channels
  // without renders are listed. Hidden rows keep their place in the table.
  function parseSpec(text) {
    var parts = text.split(",").map(function (p) { return p.trim(); }).filter(Boolean);
    if (!parts.length) return null;
    var ranges = [];
    for (var i = 0; i < parts.length; i++) {
      var m = /^(\d+)(?:\s*-\s*(\d+))?$/.exec(parts[i]);
      if (!m) return undefined;
      ranges.push([parseInt(m[1], 10), parseInt(m[2] || m[1], 10)]);
    }
    return ranges;
  }
  var channels = document.getElementById("channels");
  var specBox = document.getElementById("filter-channel");
  if (channels && specBox) {
    var fate = document.getElementById("filter-fate");
    var unrendered = document.getElementById("filter-unrendered");
    var count = document.getElementById("filter-count");
    var apply = function () {
      var ranges = parseSpec(specBox.value);
      specBox.setCustomValidity(ranges === undefined ? "channels like 3, 10-20" : "");
      specBox.classList.toggle("invalid", ranges === undefined);
      var want = fate ? fate.value : "";
      var shown = 0, rows = channels.tBodies[0].rows;
      for (var i = 0; i < rows.length; i++) {
        var r = rows[i], c = parseInt(r.getAttribute("data-channel"), 10), ok = true;
        if (ranges) ok = ranges.some(function (g) { return c >= g[0] && c <= g[1]; });
        if (ok && want === "dead") ok = r.getAttribute("data-dead") === "1" || r.getAttribute("data-fate") === "dead";
        else if (ok && want === "alive") ok = r.getAttribute("data-dead") !== "1" && r.getAttribute("data-fate") !== "dead";
        else if (ok && want) ok = r.getAttribute("data-fate") === want;
        if (ok && unrendered && !unrendered.checked && !ranges) ok = r.getAttribute("data-rendered") === "1";
        r.hidden = !ok;
        if (ok) shown++;
      }
      count.textContent = shown + " of " + rows.length + " channels shown";
    };
    specBox.addEventListener("input", apply);
    if (fate) fate.addEventListener("change", apply);
    if (unrendered) unrendered.addEventListener("change", apply);
    apply();
  }

  var topBy = document.getElementById("most-changed-by");
  if (topBy) topBy.addEventListener("change", function () {
    document.querySelectorAll(".top-channels").forEach(function (g) { g.hidden = g.id !== topBy.value; });
  });

  var data = document.getElementById("frames");
  if (data) {
    var frames = JSON.parse(data.textContent);
    var slider = document.getElementById("slider");
    var image = document.getElementById("snapshot");
    var caption = document.getElementById("snapshot-caption");
    var check = document.getElementById("snapshot-check");
    var play = document.getElementById("play");
    var buttons = document.querySelectorAll(".strip button");
    var timer = null;
    var show = function (i) {
      var f = frames[i];
      slider.value = i;
      image.src = f.src;
      image.alt = f.label;
      caption.textContent = f.label;
      if (check) {  // the frame's self-check badge and values
        check.textContent = "";
        if (f.check) {
          var mark = document.createElement("span");
          mark.className = "badge " + f.check.cls;
          mark.title = f.check.title;
          mark.textContent = f.check.mark;
          check.append(mark, " " + f.check.title);
        }
      }
      buttons.forEach(function (b, j) { b.setAttribute("aria-pressed", j === i ? "true" : "false"); });
    };
    slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
    buttons.forEach(function (b, j) { b.addEventListener("click", function () { show(j); }); });
    if (play) play.addEventListener("click", function () {
      if (timer) { clearInterval(timer); timer = null; play.textContent = "Play"; return; }
      play.textContent = "Pause";
      timer = setInterval(function () { show((parseInt(slider.value, 10) + 1) % frames.length); }, 700);
    });
    document.addEventListener("keydown", function (e) {
      if (e.target === slider) return;
      if (e.key === "ArrowRight") show(Math.min(frames.length - 1, parseInt(slider.value, 10) + 1));
      if (e.key === "ArrowLeft") show(Math.max(0, parseInt(slider.value, 10) - 1));
    });
  }
})();
