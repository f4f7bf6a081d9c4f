// featureshift report: sortable tables and the snapshot slider. No network, no libraries.
(function () {
  "use strict";

  function sortTable(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.classList.contains("num");
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-value"), y = b.cells[col].getAttribute("data-value");
      // Cells with no value (not measured) always go last, whichever the direction.
      if (x === null || x === "") return (y === null || y === "") ? 0 : 1;
      if (y === null || y === "") return -1;
      var d = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) button.addEventListener("click", function () { sortTable(table, col, th); });
    });
  });

  var data = document.getElementById("frames");
  if (data) {
    var frames = JSON.parse(data.textContent);
    var slider = document.getElementById("slider");
    var image = document.getElementById("snapshot");
    var caption = document.getElementById("snapshot-caption");
    var play = document.getElementById("play");
    var buttons = document.querySelectorAll(".strip button");
    var timer = null;
    var show = function (i) {
      var f = frames[i];
      slider.value = i;
      image.src = f.src;
      image.alt = f.label;
      caption.textContent = f.label;
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
