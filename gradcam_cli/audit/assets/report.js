"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const S = D.summary, ROWS = D.rows, METRICS = D.metrics, INFO = D.metricInfo || {};
const PAGE = 120;
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "n/a" : (+v).toFixed(d);
const url = (p) => p.split("/").map(encodeURIComponent).join("/");
const norm = (s) => (s || "").toLowerCase().replace(/_/g, " ").trim();
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const missing = (v) => v === null || v === undefined || v === "";
function cmp(a, b) {
  const na = missing(a), nb = missing(b);
  if (na || nb) return na === nb ? 0 : (na ? 1 : -1);
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b));
}
function correctOf(r) {
  if (!r.gt || r.pi === "") return null;
  return norm(r.gt) === norm(r.pl) || r.gt === r.pi;
}
for (const r of ROWS) r.c = correctOf(r);

// ------------------------------------------------------------------ summary, gates, per-class table
function stat(label, value) { $("summary").append(el("div", {class: "stat"}, el("b", {text: value}), el("span", {text: label}))); }
(function summary() {
  const run = S.run || {};
  $("run").textContent = [run.model && ("model " + run.model), run.layers && ("layer " + run.layers.join(", ")),
    run.method && ("method " + run.method)].filter(Boolean).join(" \u00b7 ");
  const c = S.counts;
  stat("images", String(c.images)); stat("ok", String(c.ok)); stat("failed", String(c.error));
  if (c.skipped) stat("skipped", String(c.skipped));
  const gt = S.ground_truth || {};
  if (gt.source) stat("accuracy (" + gt.correct + "/" + gt.images + ")", fmt(gt.accuracy));
  if (S.pointing) stat("pointing hit rate (" + S.pointing.hits + "/" + S.pointing.annotated + ")", fmt(S.pointing.hit_rate));
  const NAMES = {avg_drop: "Average Drop %", increase: "Increase in Confidence rate"};
  for (const [k, st] of Object.entries(S.metrics || {})) {
    const info = INFO[k] || {};
    const name = (NAMES[k] || "mean " + k.replace(/_/g, " ")) + (info.lower ? " (lower is better)" : "");
    if (k !== "pointing_hit" && st.count) stat(name, fmt(st.mean, k === "avg_drop" ? 1 : 3));
  }
  for (const g of S.gates || []) {
    $("gates").append(el("span", {class: "gate " + (g.passed ? "pass" : "fail"),
      text: (g.passed ? "passed " : "FAILED ") + g.gate + " (value " + fmt(g.value, 4) + ")"}));
  }
})();
(function classes() {
  const list = S.per_class || [];
  if (!list.length) { $("classes-box").hidden = true; return; }
  const cols = Object.keys(list[0]).filter((k) => !k.startsWith("count_"));
  const table = $("classes");
  let key = "class", asc = true;
  function draw() {
    table.textContent = "";
    const head = el("tr");
    for (const col of cols) {
      const th = el("th", {text: col.replace(/_/g, " ") + (col === key ? (asc ? " \u25b2" : " \u25bc") : "")});
      th.addEventListener("click", () => { asc = key === col ? !asc : true; key = col; draw(); });
      head.append(th);
    }
    table.append(el("thead", {}, head));
    const body = el("tbody");
    const sorted = list.slice().sort((a, b) => {
      if (missing(a[key]) || missing(b[key])) return cmp(a[key], b[key]);  // empty cells last, either way
      return cmp(a[key], b[key]) * (asc ? 1 : -1);
    });
    for (const row of sorted) {
      const tr = el("tr");
      for (const col of cols) tr.append(el("td", {text: typeof row[col] === "number" && !Number.isInteger(row[col]) ? fmt(row[col]) : (row[col] ?? "")}));
      body.append(tr);
    }
    table.append(body);
  }
  draw();
})();
// ------------------------------------------------------------- per-group tables: the gaps' two groups marked
(function groups() {
  const block = S.groups;
  if (!block) { $("groups-box").hidden = true; $("f-group-label").hidden = true; return; }
  const keyOf = D.groupKeys;  // gap key (accuracy, a metric column) -> its key in a group's entry
  for (const [attr, a] of Object.entries(block.attributes)) {
    const cols = Object.keys(a.groups[0] || {}).filter((k) => !k.startsWith("count_"));
    const marks = {};  // "group|column" -> gap-low / gap-high
    const gapOf = {};  // column -> [gap, whether it is the largest over every attribute]
    for (const [key, g] of Object.entries(a.gaps)) {
      if (!g) continue;
      const col = keyOf[key];
      marks[g.low.group + "|" + col] = "gap-low";
      marks[g.high.group + "|" + col] = "gap-high";
      const largest = (block.largest_gaps || {})[key];
      gapOf[col] = [g.gap, !!largest && largest.attribute === attr];
    }
    const table = el("table", {"data-attribute": attr});
    const head = el("tr");
    for (const col of cols) head.append(el("th", {text: col.replace(/_/g, " ")}));
    table.append(el("thead", {}, head));
    const body = el("tbody");
    for (const entry of a.groups) {
      const tr = el("tr", {"data-group": entry.group});
      for (const col of cols) {
        const v = entry[col];
        const text = typeof v === "number" && !Number.isInteger(v) ? fmt(v) : (v ?? "");
        tr.append(el("td", {class: marks[entry.group + "|" + col] || "", text: String(text)}));
      }
      body.append(tr);
    }
    const gaps = el("tr", {class: "gaps"});
    for (const col of cols) {
      const g = gapOf[col];
      const text = col === "group" ? "largest gap" : (g ? fmt(g[0]) : "");
      gaps.append(el("td", {class: g && g[1] ? "largest" : "", text: text}));
    }
    body.append(gaps);
    table.append(body);
    $("groups").append(el("h3", {text: attr + " (groups with fewer than " + block.min_count +
      " values take no part in a gap; " + block.no_group + ": images without a group)"}),
      el("div", {class: "table-wrap"}, table));
    for (const entry of a.groups) {
      $("f-group").append(el("option", {value: JSON.stringify([attr, entry.group]),
        text: attr + ": " + entry.group + " (" + entry.images + ")"}));
    }
  }
})();
// ------------------------------------------------------------------------------ filters and sorting
const sortSel = $("sort");
const SORTS = [["path", "path"], ["pp", "prediction probability"], ["tp", "target probability"]]
  .concat(METRICS.map((m) => ["m." + m, m]));
for (const [value, label] of SORTS) sortSel.append(el("option", {value: value, text: label}));
$("t-lowconf").value = D.lowConfidence;
let desc = false;
function disable(id, why) { const box = $(id); box.disabled = true; box.parentElement.title = why; box.parentElement.style.opacity = 0.5; }
if (!D.truthKnown) disable("f-misclassified", "no ground truth (labels.csv, --truth)");
if (!METRICS.includes("pointing_hit")) disable("f-missed", "no pointing_hit column (--metrics pointing)");
if (!METRICS.includes("energy_in_box")) disable("f-lowenergy", "no energy_in_box column (--metrics energy)");
// "worse than": any ranked metric column, on its bad side of the number (above it when lower is better)
for (const m of METRICS.filter((m) => INFO[m] && INFO[m].ranked))
  $("f-metric").append(el("option", {value: m, text: m + (INFO[m].lower ? " >" : " <")}));
if ($("f-metric").options.length === 1) $("f-metric-label").hidden = true;
function worse(r) {
  const m = $("f-metric").value, t = $("t-metric").value;
  if (!m || t === "") return true;
  const v = r.m[m];
  return v !== undefined && (INFO[m].lower ? v > +t : v < +t);
}

function value(r, key) { return key === "path" ? r.p : key.startsWith("m.") ? r.m[key.slice(2)] : r[key]; }
function matches(r) {
  if ($("f-misclassified").checked && r.c !== false) return false;
  if ($("f-lowconf").checked && !(r.pp !== null && r.pp < +$("t-lowconf").value)) return false;
  if ($("f-missed").checked && r.m.pointing_hit !== 0) return false;
  if ($("f-lowenergy").checked && !(r.m.energy_in_box !== undefined && r.m.energy_in_box < +$("t-lowenergy").value)) return false;
  if (!worse(r)) return false;
  const grp = $("f-group").value;
  if (grp) { const [attr, name] = JSON.parse(grp); if (!r.g || r.g[attr] !== name) return false; }
  const st = $("f-status").value;
  if (st && r.s !== st) return false;
  const q = norm($("f-search").value);
  if (q && !(norm(r.p).includes(q) || norm(r.pl).includes(q) || norm(r.tl).includes(q) || norm(r.gt).includes(q))) return false;
  return true;
}
let view = [], shown = 0;
function apply() {
  const key = sortSel.value;
  view = ROWS.filter(matches);
  view.sort((a, b) => {
    const va = value(a, key), vb = value(b, key), ma = missing(va), mb = missing(vb);
    if (ma || mb) return ma === mb ? a.i - b.i : (ma ? 1 : -1);  // rows without the value last, either way
    const c = cmp(va, vb);
    return c === 0 ? a.i - b.i : (desc ? -c : c);
  });
  $("gallery").textContent = "";
  shown = 0;
  more();
  requestAnimationFrame(fill);
}
function more() {
  const frag = document.createDocumentFragment();
  const end = Math.min(view.length, shown + PAGE);
  for (let k = shown; k < end; k++) frag.append(card(view[k]));
  $("gallery").append(frag);
  shown = end;
  $("count").textContent = "showing " + shown + " of " + view.length + " matching (" + ROWS.length + " rows)";
}
function thumb(src, alt) {
  return src ? el("img", {src: url(src), alt: alt, loading: "lazy", decoding: "async", width: "256", height: "256"})
             : el("div", {class: "none", text: alt + " not available"});
}
function card(r) {
  const c = el("article", {class: "card " + r.s, "data-path": r.p, "data-row": String(r.i), tabindex: "0"});
  c.append(el("div", {class: "pair"}, thumb(r.ti_, "original"), thumb(r.to, "overlay")));
  c.append(el("div", {class: "path", text: r.p}));
  if (r.s === "error") c.append(el("div", {class: "meta bad", text: "error: " + r.e}));
  else {
    c.append(el("div", {class: "meta", text: "pred " + r.pl + " (" + fmt(r.pp) + ")"}));
    if (r.s === "ok") c.append(el("div", {class: "meta", text: "target " + r.tl + " (" + fmt(r.tp) + ")" + (r.l ? " \u00b7 " + r.l : "")}));
    else c.append(el("div", {class: "meta", text: r.s + (r.e ? ": " + r.e : "")}));
    if (r.gt) c.append(el("div", {class: "meta " + (r.c ? "good" : "bad"), text: "truth " + r.gt + (r.c ? " \u2713" : " \u2717")}));
  }
  const m = el("div", {class: "metrics"});
  for (const k of METRICS) if (r.m[k] !== undefined) m.append(metric(k, r.m[k]));
  c.append(m);
  return c;
}
function metric(k, v) {
  if (k === "pointing_hit") return el("span", {class: v ? "" : "miss", text: v ? "pointing hit" : "pointing miss"});
  if (k === "increase") return el("span", {text: "increase " + (v ? "yes" : "no")});
  if (k === "avg_drop") return el("span", {text: "drop " + fmt(v, 1) + "%"});
  return el("span", {text: k.replace("_in_box", "").replace("_auc", " AUC") + " " + fmt(v)});
}
function openBox(r) {
  if (!r || !(r.o || r.ti_)) return;
  $("lb-img").src = url(r.o || r.ti_);
  $("lb-img").alt = r.p;
  $("lb-cap").textContent = r.p + (r.s === "ok" ? " \u2014 target " + r.tl + " (" + fmt(r.tp) + ")" : "");
  $("lightbox").hidden = false;
}
function closeBox() { $("lightbox").hidden = true; $("lb-img").removeAttribute("src"); }
$("gallery").addEventListener("click", (ev) => {
  const c = ev.target.closest(".card"); if (c) openBox(ROWS[+c.dataset.row]);
});
$("gallery").addEventListener("keydown", (ev) => {
  const c = ev.target.closest(".card"); if (c && ev.key === "Enter") openBox(ROWS[+c.dataset.row]);
});
$("lightbox").addEventListener("click", closeBox);
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeBox(); });
for (const id of ["f-misclassified", "f-lowconf", "f-missed", "f-lowenergy", "f-metric", "t-metric", "f-group", "f-status", "sort", "t-lowconf", "t-lowenergy"])
  $(id).addEventListener("change", apply);
let typing = 0;
$("f-search").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(apply, 150); });
$("sort-dir").addEventListener("click", () => { desc = !desc; $("sort-dir").innerHTML = desc ? "&#8593;" : "&#8595;"; apply(); });
// the next page is appended while the end of the list is within 1200 px of the viewport
function fill() {
  if (shown < view.length && $("sentinel").getBoundingClientRect().top < window.innerHeight + 1200) {
    more();
    requestAnimationFrame(fill);
  }
}
new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) fill(); },
  {rootMargin: "1200px"}).observe($("sentinel"));
window.addEventListener("scroll", () => requestAnimationFrame(fill), {passive: true});
apply();
document.body.dataset.ready = "1";
