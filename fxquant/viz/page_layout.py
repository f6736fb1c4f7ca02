"""The HTML dump's graph layout: a layered (Sugiyama-style) layout of one opened group, in JavaScript.

`LAYOUT` defines `layout(items, edges)`, which fxquant writes itself (no library). It works in five stages:

1. layers: longest path from the sources, in graph order (so a back edge cannot loop); a source
   then moves down to just above its first reader, which keeps an input next to its use;
2. a dummy vertex on every layer a long edge crosses, so edges route between nodes;
3. order: four down-and-up barycentre sweeps (each vertex sorts by the mean position of its
   neighbours in the layer before);
4. x: six passes that pull each vertex to the mean centre of its neighbours. Each pass packs a
   layer left-to-right and right-to-left with a gap and averages the two placements. The
   average of two placements without overlap has no overlap either;
5. y: one row per layer.

Items come with `w` (width) and `order` (first graph position); edges are `[u, v]` item indices.
"""

LAYOUT = r"""
const ROW = 62, GAP = 16;  // row pitch and the gap between neighbours of one layer, in px

function layout(it, edges) {
  const n = it.length, order = it.map((x) => x.order), pred = it.map(() => []), succ = it.map(() => []);
  const forward = ([u, v]) => (order[u] <= order[v] ? [u, v] : [v, u]);
  for (const e of edges) { const [a, b] = forward(e); pred[b].push(a); succ[a].push(b); }
  const idx = [...Array(n).keys()].sort((a, b) => order[a] - order[b]), layer = new Array(n).fill(0);
  for (const v of idx) for (const u of pred[v]) layer[v] = Math.max(layer[v], layer[u] + 1);
  for (const v of idx.slice().reverse())
    if (!pred[v].length && succ[v].length) layer[v] = Math.min(...succ[v].map((s) => layer[s])) - 1;
  const w = it.map((x) => x.w), up = it.map(() => []), down = it.map(() => []), lay = layer.slice(), paths = [];
  for (const e of edges) {  // stage 2: dummies
    const [a, b] = forward(e), chain = [a];
    for (let l = lay[a] + 1; l < lay[b]; l++) {
      chain.push(w.length); w.push(8); lay.push(l); up.push([]); down.push([]);
    }
    chain.push(b);
    for (let k = 1; k < chain.length; k++) { up[chain[k]].push(chain[k - 1]); down[chain[k - 1]].push(chain[k]); }
    paths.push({u: e[0], v: e[1], chain, back: order[e[0]] > order[e[1]]});
  }
  const first = Math.min(...lay), L = Math.max(0, ...lay) - first + 1;
  const rows = Array.from({length: L}, () => []), pos = new Array(w.length).fill(0);
  const byOrder = [...Array(w.length).keys()].sort((a, b) => (order[a] ?? 1e9) - (order[b] ?? 1e9));
  for (const v of byOrder) rows[lay[v] - first].push(v);
  rows.forEach((r) => r.forEach((v, k) => { pos[v] = k; }));
  const sweep = (r, nb) => {  // stage 3: sort a layer by its neighbours' mean position
    const key = new Map(r.map((v, k) => [v, nb[v].length ? mean(nb[v].map((q) => pos[q])) : pos[v] ?? k]));
    r.sort((a, b) => key.get(a) - key.get(b));
    r.forEach((v, k) => { pos[v] = k; });
  };
  for (let t = 0; t < 4; t++) {
    for (const r of rows.slice(1)) sweep(r, up);
    for (const r of rows.slice(0, -1).reverse()) sweep(r, down);
  }
  const x = new Array(w.length).fill(0), centre = (v) => x[v] + w[v] / 2;
  rows.forEach((r) => { let c = 0; r.forEach((v) => { x[v] = c; c += w[v] + GAP; }); });
  for (let t = 0; t < 6; t++) for (const r of (t % 2 ? rows.slice().reverse() : rows)) {  // stage 4
    const want = r.map((v) => {
      const nb = up[v].concat(down[v]);
      return nb.length ? mean(nb.map(centre)) - w[v] / 2 : x[v];
    });
    const left = [], right = [];
    r.forEach((v, k) => { left[k] = k ? Math.max(want[k], left[k - 1] + w[r[k - 1]] + GAP) : want[k]; });
    for (let k = r.length - 1; k >= 0; k--)
      right[k] = k < r.length - 1 ? Math.min(want[k], right[k + 1] - w[r[k]] - GAP) : want[k];
    r.forEach((v, k) => { x[v] = (left[k] + right[k]) / 2; });
  }
  const minx = Math.min(...x) - 10, y = lay.map((l) => (l - first) * ROW + 10);
  const width = Math.max(...x.map((v, i) => v - minx + w[i])) + 10;
  return {x: x.map((v) => v - minx), y, w, paths, height: L * ROW + 10, width};
}
const mean = (xs) => xs.reduce((s, q) => s + q, 0) / xs.length;
"""
