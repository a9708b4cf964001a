"use strict";
// gradcam diff page: the data is inline (#data); cards are rendered in pages as the list scrolls.
const PAGE = 60;
const data = JSON.parse(document.getElementById("data").textContent);
const S = data.summary;
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 3) => (v === null || v === undefined || v === "" ? "n/a" : Number(v).toFixed(d));
const esc = (t) => String(t).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

$("runs").textContent = `A: ${S.a}  |  B: ${S.b}`;
const tiles = [
  ["pairs", S.counts.pairs], ["compared", S.counts.compared],
  ["flips", S.flips.rate === null ? "n/a" : `${S.flips.flipped}/${S.flips.images}`],
  ["spearman mean", fmt(S.similarity.spearman.mean)], ["ssim mean", fmt(S.similarity.ssim.mean)],
  ["iou mean", fmt(S.similarity.iou.mean)], ["peak shift mean", fmt(S.similarity.peak_shift.mean)],
];
for (const k of ["only_in_a", "only_in_b", "error_in_a", "error_in_b", "error_in_both"]) {
  if (S.counts[k]) tiles.push([k.replace(/_/g, " "), S.counts[k]]);
}
$("summary").innerHTML = tiles.map(([k, v]) => `<div class="tile">${esc(k)}<b>${esc(v)}</b></div>`).join("");
$("gates").innerHTML = (S.gates || []).map((g) =>
  `<div class="gate ${g.passed ? "pass" : "fail"}">${g.passed ? "passed" : "FAILED"}: ${esc(g.gate)} (value ${fmt(g.value, 4)})</div>`).join("");
const differ = Object.keys(S.settings.differ);
$("settings").textContent = differ.length ? `the runs differ in: ${differ.join(", ")}` : "the runs have the same settings";

const statuses = [...new Set(data.rows.map((r) => r.status))].sort();
$("f-status").innerHTML += statuses.map((s) => `<option>${esc(s)}</option>`).join("");

let view = [];
let shown = 0;
let ascending = true;

function matches(r) {
  if ($("f-flips").checked && r.flipped !== true) return false;
  if ($("f-below").checked) {
    const v = r[$("t-key").value];
    if (v === null || v === undefined || !(v < Number($("t-below").value))) return false;
  }
  const st = $("f-status").value;
  if (st && r.status !== st) return false;
  const q = $("f-search").value.trim().toLowerCase();
  if (q && !`${r.path} ${r.pred_a} ${r.pred_b}`.toLowerCase().includes(q)) return false;
  return true;
}

function sortKey(r, key) {
  if (key === "path") return r.path;
  const v = r[key];
  return v === null || v === undefined ? Infinity : v;
}

function card(r) {
  const flip = r.flipped === true ? '<span class="badge flip">flipped</span>' : "";
  const status = r.status !== "compared" ? `<span class="badge status">${esc(r.status)}</span>` : "";
  const img = (src, cap) => `<figure>${src ? `<img loading="lazy" src="${esc(src)}" alt="${esc(cap)}">` : "<div>none</div>"}<figcaption>${esc(cap)}</figcaption></figure>`;
  return `<article class="pair${r.flipped === true ? " flip" : ""}" data-path="${esc(r.path)}">
    <div class="path">${esc(r.path)}${r.slot ? ` [${r.slot}]` : ""} ${flip} ${status}</div>
    <div class="nums">A: ${esc(r.pred_a || "-")} &rarr; B: ${esc(r.pred_b || "-")} | spearman ${fmt(r.spearman)} ssim ${fmt(r.ssim)} iou ${fmt(r.iou)} shift ${fmt(r.peak_shift)}</div>
    <div class="imgs">${img(r.ta, "A")}${img(r.tb, "B")}${img(r.td, "where they differ")}</div>
  </article>`;
}

function fill() {
  const end = Math.min(view.length, shown + PAGE);
  $("pairs").insertAdjacentHTML("beforeend", view.slice(shown, end).map(card).join(""));
  shown = end;
}

function render() {
  const key = $("sort").value;
  view = data.rows.filter(matches);
  view.sort((x, y) => {
    const a = sortKey(x, key), b = sortKey(y, key);
    const c = a < b ? -1 : a > b ? 1 : 0;
    return ascending ? c : -c;
  });
  $("pairs").innerHTML = "";
  shown = 0;
  fill();
  $("count").textContent = `${view.length} of ${data.rows.length} pairs`;
}

for (const id of ["f-flips", "f-below", "t-key", "t-below", "f-status", "f-search", "sort"]) {
  $(id).addEventListener("input", render);
  $(id).addEventListener("change", render);
}
$("sort-dir").addEventListener("click", () => {
  ascending = !ascending;
  $("sort-dir").innerHTML = ascending ? "&#8593;" : "&#8595;";
  render();
document.body.dataset.ready = "1";
});
new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) fill(); },
  { rootMargin: "800px" }).observe($("sentinel"));
render();
document.body.dataset.ready = "1";
