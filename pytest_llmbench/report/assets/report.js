/* pytest-llmbench HTML report. Every string from the data (model output included) is written
   with textContent or as a chart label (canvas), never parsed as HTML. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("llmbench-data").textContent);
  var S = D.strings;
  var PAGE = 50;
  var COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#9a6700", "#57606a"];

  function str(i) { return i === null || i === undefined || i < 0 ? "" : S[i]; }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }
  function secs(x) { return x === null || x === undefined ? "-" : x.toFixed(x < 10 ? 2 : 1) + " s"; }
  function usd(x) { return x === null || x === undefined ? "-" : "$" + x.toFixed(x < 1 ? 4 : 2); }
  function color(i) { return COLORS[i % COLORS.length]; }
  function groupLabel(g) { return g.suite + " \u00b7 " + g.model; }

  function header() {
    var run = D.run || {};
    document.title = D.title;
    document.getElementById("title").textContent = D.title;
    var parts = [];
    if (run.run_id) parts.push("run " + run.run_id);
    if (run.started_at) parts.push("started " + new Date(run.started_at * 1000).toISOString());
    if (run.finished_at && run.started_at) parts.push("took " + secs(run.finished_at - run.started_at));
    parts.push(D.items.length + " items");
    if (run.models && run.models.length) parts.push("models " + run.models.map(function (m) { return m.name; }).join(", "));
    if (run.plugin_version) parts.push("pytest-llmbench " + run.plugin_version);
    document.getElementById("meta").textContent = parts.join(" \u00b7 ");
  }

  function row(table, cells, head, cls) {
    var tr = document.createElement("tr");
    if (cls) tr.className = cls;
    cells.forEach(function (c) {
      var td = el(head ? "th" : "td", c.text !== undefined ? c.text : c);
      if (c.num) td.className = "num";
      tr.appendChild(td);
    });
    table.appendChild(tr);
    return tr;
  }

  function summaryTable() {
    var t = document.getElementById("summary");
    var cols = ["suite", "model", "items", "passed", "failed", "errors", "pass rate [95% CI]", "mean score", "p50", "p95", "tokens in/out"];
    if (D.priced) cols.push("cost");
    cols.push("errors by class");
    row(t, cols, true);
    D.groups.concat(D.total ? [D.total] : []).forEach(function (g, index) {
      var rate = g.rate === null ? "-" : pct(g.rate) + " [" + (100 * g.lo).toFixed(1) + "-" + (100 * g.hi).toFixed(1) + "]";
      if (g.errors && g.errors === g.items) rate = "n/a (all " + g.items + " errored)";
      var cells = [g.suite, g.model, {text: g.items, num: 1}, {text: g.passed, num: 1}, {text: g.failed, num: 1},
        {text: g.errors, num: 1}, {text: rate, num: 1},
        {text: g.mean_score === null ? "-" : g.mean_score.toFixed(3), num: 1},
        {text: secs(g.p50), num: 1}, {text: secs(g.p95), num: 1}, {text: g.tin + "/" + g.tout, num: 1}];
      if (D.priced) cells.push({text: usd(g.cost), num: 1});
      cells.push(Object.keys(g.errors_by_class).map(function (k) { return k + ":" + g.errors_by_class[k]; }).join(" ") || "-");
      row(t, cells, false, index === D.groups.length ? "total" : "");
    });
  }

  function models() {
    var seen = [];
    D.groups.forEach(function (g) { if (seen.indexOf(g.model) < 0) seen.push(g.model); });
    return seen;
  }

  var CHARTS = {};
  function chart(id, config) {
    config.options = Object.assign({animation: false, responsive: true, maintainAspectRatio: false}, config.options || {});
    CHARTS[id] = new Chart(document.getElementById(id), config);
    return CHARTS[id];
  }

  function rateChart() {
    var ms = models();
    var labels = D.groups.map(groupLabel);
    var colors = D.groups.map(function (g) { return color(ms.indexOf(g.model)); });
    chart("chart-rate", {
      type: "bar",
      data: {labels: labels, datasets: [
        {label: "pass rate %", data: D.groups.map(function (g) { return g.rate === null ? null : 100 * g.rate; }),
         backgroundColor: colors.map(function (c) { return c + "99"; }), order: 2},
        {label: "95% interval", data: D.groups.map(function (g) { return [100 * g.lo, 100 * g.hi]; }),
         backgroundColor: "#1f232855", borderColor: "#1f2328", borderWidth: 1, barPercentage: 0.12,
         grouped: false, order: 1}
      ]},
      options: {scales: {y: {min: 0, max: 100, title: {display: true, text: "% passed"}}}}
    });
  }

  function latencyChart() {
    var L = D.latency;
    var labels = [];
    for (var i = 0; i + 1 < L.edges.length; i++) labels.push(L.edges[i].toFixed(2) + "-" + L.edges[i + 1].toFixed(2) + " s");
    var ms = models();
    var datasets = Object.keys(L.series).map(function (m, i) {
      return {label: m, data: L.series[m], backgroundColor: color(ms.indexOf(m) < 0 ? i : ms.indexOf(m)) + "bb"};
    });
    chart("chart-latency", {type: "bar", data: {labels: labels, datasets: datasets},
      options: {scales: {x: {stacked: true, title: {display: true, text: "latency"}}, y: {stacked: true, title: {display: true, text: "items"}}}}});
  }

  function tokensChart() {
    var datasets = [
      {label: "prompt tokens", data: D.groups.map(function (g) { return g.tin; }), backgroundColor: "#0969da99", stack: "t"},
      {label: "completion tokens", data: D.groups.map(function (g) { return g.tout; }), backgroundColor: "#8250df99", stack: "t"}
    ];
    var scales = {y: {stacked: true, title: {display: true, text: "tokens"}}, x: {stacked: true}};
    if (D.priced) {
      document.getElementById("tokens-caption").textContent = "Tokens and cost per suite x model";
      datasets.push({label: "cost (USD)", type: "line", data: D.groups.map(function (g) { return g.cost; }),
        yAxisID: "cost", borderColor: "#bc4c00", backgroundColor: "#bc4c00"});
      scales.cost = {position: "right", title: {display: true, text: "USD"}, grid: {drawOnChartArea: false}};
    }
    chart("chart-tokens", {type: "bar", data: {labels: D.groups.map(groupLabel), datasets: datasets}, options: {scales: scales}});
  }

  function errorsChart() {
    if (!D.error_classes.length) {
      document.getElementById("no-errors").hidden = false;
    }
    var datasets = D.error_classes.map(function (cls, i) {
      return {label: cls, data: D.groups.map(function (g) { return g.errors_by_class[cls] || 0; }), backgroundColor: color(i + 1) + "bb"};
    });
    chart("chart-errors", {type: "bar", data: {labels: D.groups.map(groupLabel), datasets: datasets},
      options: {scales: {x: {stacked: true}, y: {stacked: true, beginAtZero: true, title: {display: true, text: "items"}}}}});
  }

  /* --- items table ------------------------------------------------------------------ */
  var F = {suite: 1, model: 2, outcome: 3, error: 4};
  var state = {page: 0, rows: []};

  function fillSelect(id, col) {
    var sel = document.getElementById(id);
    var values = {};
    D.items.forEach(function (it) { values[str(it[col])] = 1; });
    sel.appendChild(el("option", "all")).value = "";
    Object.keys(values).sort().forEach(function (v) {
      if (v === "") return;
      var o = el("option", v); o.value = v; sel.appendChild(o);
    });
    sel.addEventListener("change", function () { state.page = 0; filter(); });
  }

  function filter() {
    var want = {};
    Object.keys(F).forEach(function (k) { want[k] = document.getElementById("f-" + k).value; });
    var text = document.getElementById("f-text").value.toLowerCase();
    state.rows = [];
    D.items.forEach(function (it, i) {
      for (var k in F) { if (want[k] && str(it[F[k]]) !== want[k]) return; }
      if (text && str(it[0]).toLowerCase().indexOf(text) < 0) return;
      state.rows.push(i);
    });
    draw();
  }

  function draw() {
    var body = document.querySelector("#items tbody");
    body.textContent = "";
    var pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    state.rows.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (i) {
      var it = D.items[i];
      var tr = row(body, [str(it[0]), str(it[1]), str(it[2]), str(it[3]), str(it[4]) || "-",
        {text: it[5] === null ? "-" : it[5], num: 1}, {text: secs(it[6]), num: 1}, {text: it[7] + "/" + it[8], num: 1}], false);
      tr.children[3].className = "o-" + str(it[3]);
      tr.dataset.index = String(i);
      tr.addEventListener("click", function () { show(i, tr); });
    });
    document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById("f-count").textContent = state.rows.length + " of " + D.items.length + " items";
  }

  function fact(dl, name, value) {
    if (value === "" || value === null || value === undefined) return;
    dl.appendChild(el("dt", name));
    dl.appendChild(el("dd", value));
  }

  /* A code item's program verdicts as a table; every scorer's details as JSON, folded. */
  function extra(text) {
    var box = document.getElementById("detail-extra");
    box.textContent = "";
    if (!text) return;
    var details = null;
    try { details = JSON.parse(text); } catch (e) { details = null; }
    if (details && Array.isArray(details.tests) && details.tests.length) {
      box.appendChild(el("h4", "Program verdicts" + (details.verdict ? ": " + details.verdict : "")));
      var t = el("table", undefined, "grid");
      row(t, ["test", "verdict", "wall", "cpu", "limit", "exit", "stdout (head)", "error"], true);
      details.tests.forEach(function (v) {
        row(t, [v.test, v.verdict, {text: secs(v.wall), num: 1}, {text: secs(v.cpu), num: 1},
          {text: secs(v.limit), num: 1}, {text: v.exit_code === null || v.exit_code === undefined ? "-" : v.exit_code, num: 1},
          v.stdout_head || "", v.error || v.stderr_tail || ""], false);
      });
      box.appendChild(t);
    }
    var fold = el("details");
    fold.appendChild(el("summary", "scorer details (JSON)"));
    fold.appendChild(el("pre", text));
    box.appendChild(fold);
  }

  function show(i, tr) {
    var prev = document.querySelector("#items tr.selected");
    if (prev) prev.classList.remove("selected");
    if (tr) tr.classList.add("selected");
    var it = D.items[i], d = D.details[i];
    var box = document.getElementById("detail");
    box.hidden = false;
    document.getElementById("detail-title").textContent = str(it[0]);
    var dl = document.getElementById("detail-facts");
    dl.textContent = "";
    fact(dl, "outcome", str(it[3]) + (it[9] ? " (cached)" : ""));
    fact(dl, "error class", str(it[4]));
    fact(dl, "error", str(d.err));
    fact(dl, "deadline layer", str(d.dl));
    fact(dl, "score", it[5] === null ? "" : it[5]);
    fact(dl, "expected", str(d.e));
    fact(dl, "answer", str(d.a));
    fact(dl, "why", str(d.x));
    fact(dl, "attempts", str(d.t));
    extra(str(d.d));
    var tx = document.getElementById("transcript");
    tx.textContent = "";
    (d.m || []).forEach(function (m) {
      var role = str(m[0]);
      var div = el("div", undefined, "msg " + role.replace(/[^a-z]/g, ""));
      div.appendChild(el("div", role, "role"));
      div.appendChild(el("pre", str(m[1])));
      if (m.length > 2) div.appendChild(el("pre", str(m[2])));
      tx.appendChild(div);
    });
    if (!(d.m || []).length) tx.appendChild(el("p", "No messages recorded.", "muted"));
    if (d.tr && d.tr.length) {  /* an agent item: every model call, tool call and stop, timed */
      tx.appendChild(el("h4", "Agent transcript"));
      d.tr.forEach(function (e) {
        var div = el("div", undefined, "msg tool");
        div.appendChild(el("div", str(e[0]), "role"));
        div.appendChild(el("pre", str(e[1])));
        tx.appendChild(div);
      });
    }
    if (tr) box.scrollIntoView({block: "nearest"});
  }

  function items() {
    fillSelect("f-suite", F.suite);
    fillSelect("f-model", F.model);
    fillSelect("f-outcome", F.outcome);
    fillSelect("f-error", F.error);
    document.getElementById("f-text").addEventListener("input", function () { state.page = 0; filter(); });
    document.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); });
    document.getElementById("prev").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); draw(); });
    document.getElementById("next").addEventListener("click", function () { state.page += 1; draw(); });
    filter();
  }

  /* --- comparison ------------------------------------------------------------------- */
  function comparison() {
    var C = D.comparison;
    if (!C) return;
    document.getElementById("comparison").hidden = false;
    var a = (C.a && C.a.label) || "A", b = (C.b && C.b.label) || "B";
    document.getElementById("cmp-head").textContent = "A = " + a + " \u00b7 B = " + b;
    var suites = C.suites || [];
    function side(x) { return x || {}; }
    chart("chart-compare", {type: "bar", data: {labels: suites.map(function (s) { return s.suite; }), datasets: [
      {label: a, data: suites.map(function (s) { var r = side(s.a).rate; return r === null || r === undefined ? null : 100 * r; }), backgroundColor: color(0) + "99", order: 2},
      {label: b, data: suites.map(function (s) { var r = side(s.b).rate; return r === null || r === undefined ? null : 100 * r; }), backgroundColor: color(1) + "99", order: 2},
      {label: a + " 95% interval", data: suites.map(function (s) { return [100 * (side(s.a).ci_low || 0), 100 * (side(s.a).ci_high || 0)]; }),
       backgroundColor: "#1f232855", barPercentage: 0.08, order: 1, xAxisID: "x"},
      {label: b + " 95% interval", data: suites.map(function (s) { return [100 * (side(s.b).ci_low || 0), 100 * (side(s.b).ci_high || 0)]; }),
       backgroundColor: "#1f232855", barPercentage: 0.08, order: 1, xAxisID: "x"}
    ]}, options: {scales: {y: {min: 0, max: 100, title: {display: true, text: "% passed"}}}}});
    var t = document.getElementById("cmp-table");
    row(t, ["suite", "A pass rate", "B pass rate", "paired items", "difference", "p (McNemar)", "regressed", "improved", "verdict"], true);
    suites.forEach(function (s) {
      var verdict = s.significant ? (s.diff < 0 ? "significant regression" : "significant improvement") : "no significant change";
      row(t, [s.suite, {text: pct(side(s.a).rate), num: 1}, {text: pct(side(s.b).rate), num: 1},
        {text: s.both === undefined ? "-" : s.both, num: 1},
        {text: s.diff === undefined || s.diff === null ? "-" : (s.diff >= 0 ? "+" : "") + (100 * s.diff).toFixed(1) + " pts", num: 1},
        {text: s.p_value === undefined || s.p_value === null ? "-" : Number(s.p_value).toPrecision(3), num: 1},
        {text: (s.regressed || []).length, num: 1}, {text: (s.improved || []).length, num: 1}, verdict], false);
    });
    var box = document.getElementById("cmp-items");
    suites.forEach(function (s) {
      [["regressed", s.regressed], ["improved", s.improved]].forEach(function (p) {
        if (!p[1] || !p[1].length) return;
        box.appendChild(el("h4", s.suite + ": " + p[1].length + " " + p[0]));
        var ul = el("ul");
        p[1].forEach(function (n) { ul.appendChild(el("li", n)); });
        box.appendChild(ul);
      });
    });
  }

  header();
  comparison();
  summaryTable();
  if (D.items.length) {
    rateChart();
    latencyChart();
    tokensChart();
    errorsChart();
  } else {
    document.getElementById("plots").hidden = true;
  }
  items();
  document.body.dataset.ready = "1";
  document.body.dataset.charts = String(Object.keys(CHARTS).length);
})();
