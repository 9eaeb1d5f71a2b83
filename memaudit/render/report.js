// memaudit report: sortable, searchable tables (vanilla JS, no network, no dependencies).
(function () {
  "use strict";
  function key(cell) {
    if (!cell) return "";
    var v = cell.getAttribute("data-v");
    var text = v === null ? cell.textContent.trim() : v;
    var num = text === "" ? NaN : Number(text);
    return isNaN(num) ? text.toLowerCase() : num;
  }
  function compare(a, b) {
    var an = typeof a === "number", bn = typeof b === "number";
    if (an && bn) return a - b;
    if (a === "" && b !== "") return 1;   // empty cells last
    if (b === "" && a !== "") return -1;
    if (an !== bn) return an ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }
  function sortBy(table, th, index) {
    var body = table.tBodies[0];
    var asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return { row: row, key: key(row.cells[index]), i: i };
    });
    rows.sort(function (a, b) {
      var c = compare(a.key, b.key);
      if (a.key === "" || b.key === "") return c || a.i - b.i;  // empties stay last both ways
      return (asc ? c : -c) || a.i - b.i;
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r.row); });
    body.appendChild(frag);
  }
  function initTable(table) {
    table.querySelectorAll("thead th").forEach(function (th, index) {
      th.addEventListener("click", function () { sortBy(table, th, index); });
      th.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sortBy(table, th, index); }
      });
    });
  }
  function initSearch(root, input) {
    var table = root.querySelector("#" + input.getAttribute("data-table"));
    var count = root.querySelector('.count[data-for="' + input.getAttribute("data-table") + '"]');
    if (!table) return;
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0, rows = table.tBodies[0].rows;
      for (var i = 0; i < rows.length; i++) {
        var text = rows[i].textContent.toLowerCase();
        var hit = words.every(function (w) { return text.indexOf(w) >= 0; });
        rows[i].hidden = !hit;
        if (hit) shown++;
      }
      if (count) count.textContent = shown + " of " + rows.length;
    });
  }
  document.querySelectorAll(".memaudit:not([data-ready])").forEach(function (root) {
    root.setAttribute("data-ready", "1");
    root.querySelectorAll("table.sortable").forEach(initTable);
    root.querySelectorAll("input.search").forEach(function (i) { initSearch(root, i); });
  });
})();
