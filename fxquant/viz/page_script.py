"""The HTML dump's script: groups, a layered layout per opened group, search, the diff per pass.

`SCRIPT` is plain JavaScript fxquant writes itself (no library, no network). The one idea: nothing
is laid out before it is looked at. The first screen draws only the top-level group (embeddings, one
box per class of identical blocks, the final norm, the head); opening a box lays out its members
with a longest-path layering, barycentre ordering and averaged left/right packing (`layout`).
Parameters, shared inputs and asserts are chips and lists, never nodes. `window.fxq` exposes the
timings and a few helpers the browser tests use.
"""

SCRIPT = r"""
"use strict";
const T0 = performance.now();
const D = JSON.parse(document.getElementById("fxq-data").textContent);
const S = D.strings, F = D.flags, T_PARSE = performance.now();
const INLINE_MAX = 6, ROW = 62, GAP = 16;
const CHAINS = {norm: "norm -> readers", vo: "v -> o (per head)", mlp: "up/gate -> down", stream: "residual add"};
const st = {step: D.steps.length - 1, side: "after", open: new Set(), sel: -1};
const cache = new Map();
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const leaf = (p) => p.slice(p.lastIndexOf(".") + 1);
const short = (op) => { const p = op.split("."); return (p[0] === "aten" || p[0] === "fxquant") && p.length > 1 ? p[1] : op; };
const has = (f, name) => (f & F[name]) !== 0;

function model(k) {  // everything the page derives from one step's rows, built once, on first view
  if (cache.has(k)) return cache.get(k);
  const s = D.steps[k], N = s.nodes, n = N.length;
  const mod = N.map((r) => S[r[2]]), users = N.map(() => []), chainsOf = N.map(() => []);
  N.forEach((r, i) => r[3].forEach((a) => users[a].push(i)));
  s.chains.forEach((c, ci) => c[3].forEach((i) => chainsOf[i].push(ci)));
  const drawn = N.map((r) => !has(r[5], "param") && !has(r[5], "shared") && !has(r[5], "hidden"));
  const own = new Map(), kids = new Map(), under = new Map();
  const add = (m, k2, v) => { if (!m.has(k2)) m.set(k2, []); m.get(k2).push(v); };
  for (let i = 0; i < n; i++) {
    if (!drawn[i]) continue;
    const path = mod[i];
    add(own, path, i); add(under, "", i);
    let p = "";
    for (const part of path ? path.split(".") : []) {
      const c = p ? p + "." + part : part;
      if (!kids.has(p)) kids.set(p, new Set());
      kids.get(p).add(c); add(under, c, i); p = c;
    }
  }
  const rep = new Map();
  for (const [parent, classes] of Object.entries(s.repeats))
    for (const [label, ids] of classes) {
      const info = {label: leaf(parent) + "." + label, count: ids.length, rep: parent + "." + ids[0], parent};
      ids.forEach((i) => rep.set(parent + "." + i, info));
    }
  const m = {s, N, n, mod, users, chainsOf, drawn, own, kids, under, rep, k};
  cache.set(k, m);
  return m;
}

function items(m, G) {  // the members of group G: nodes, inlined small children, boxes for the rest
  const out = [], of = new Map(), reps = new Map();
  const take = (item, nodes) => { item.id = out.length; item.order = least(nodes); out.push(item); nodes.forEach((i) => of.set(i, item.id)); };
  (function collect(P) {
    for (const i of m.own.get(P) || []) take({kind: "node", i}, [i]);
    for (const C of m.kids.get(P) || []) {
      const nodes = m.under.get(C) || [], r = m.rep.get(C);
      if (r && C !== G) {
        if (reps.has(r)) { const it = out[reps.get(r)]; nodes.forEach((i) => of.set(i, it.id)); it.order = Math.min(it.order, least(nodes)); continue; }
        take({kind: "repeat", path: r.rep, info: r, size: (m.under.get(r.rep) || []).length}, nodes); reps.set(r, out.length - 1);
      } else if (!(m.own.get(C) || []).length || (nodes.length <= INLINE_MAX && !hasRepeat(m, C))) collect(C);
      else take({kind: "group", path: C, size: nodes.length}, nodes);
    }
  })(G);
  out.sort((a, b) => a.order - b.order);
  const remap = new Map(out.map((it, k) => [it.id, k]));
  out.forEach((it, k) => { it.id = k; });
  for (const [i, id] of of) of.set(i, remap.get(id));
  return {items: out, of};
}
const least = (xs) => xs.reduce((a, b) => (b < a ? b : a), Infinity);  // Math.min(...xs) overflows the stack on big groups
const hasRepeat = (m, C) => [...m.rep.keys()].some((b) => b.startsWith(C + "."));

function graph(m, G) {  // items plus stubs for inputs from and outputs to outside G, and the edges
  const {items: it, of} = items(m, G), edges = new Set(), stubs = new Map();
  const stub = (key, label, order) => {
    if (!stubs.has(key)) { stubs.set(key, it.length); it.push({kind: "stub", label, order, id: it.length}); }
    return stubs.get(key);
  };
  const where = (i) => near(G, m.mod[i]);  // input_layernorm from self_attn, layers.1.input_layernorm from layers.0
  for (const [i, v] of of) {
    for (const a of m.N[i][3]) {
      if (!m.drawn[a]) continue;
      const u = of.has(a) ? of.get(a) : stub("in " + where(a), `from ${where(a)} (${short(S[m.N[a][1]])})`, a);
      if (u !== v) edges.add(u + "," + v);
    }
    for (const u of m.users[i]) if (m.drawn[u] && !of.has(u)) edges.add(v + "," + stub("out " + where(u), `to ${where(u)}`, u));
  }
  return {items: it, of, edges: [...edges].map((e) => e.split(",").map(Number))};
}
function blockOf(m, path) { let p = path; while (p) { if (m.rep.has(p)) return m.rep.get(p); p = p.slice(0, Math.max(0, p.lastIndexOf("."))); } return null; }

function layout(it, edges) {  // longest-path layers, dummies for long edges, barycentre order, packed x
  const n = it.length, order = it.map((x) => x.order), pred = it.map(() => []), succ = it.map(() => []);
  for (const [u, v] of edges) { const [a, b] = order[u] <= order[v] ? [u, v] : [v, u]; pred[b].push(a); succ[a].push(b); }
  const idx = [...Array(n).keys()].sort((a, b) => order[a] - order[b]), layer = new Array(n).fill(0);
  for (const v of idx) for (const u of pred[v]) layer[v] = Math.max(layer[v], layer[u] + 1);
  for (const v of idx.slice().reverse()) if (!pred[v].length && succ[v].length) layer[v] = Math.min(...succ[v].map((s) => layer[s])) - 1;
  const w = it.map((x) => x.w), up = it.map(() => []), down = it.map(() => []), lay = layer.slice(), paths = [];
  for (const [u, v] of edges) {
    const [a, b] = order[u] <= order[v] ? [u, v] : [v, u], chain = [a];
    for (let l = lay[a] + 1; l < lay[b]; l++) { const d = w.length; w.push(8); lay.push(l); up.push([]); down.push([]); chain.push(d); }
    chain.push(b);
    for (let k = 1; k < chain.length; k++) { up[chain[k]].push(chain[k - 1]); down[chain[k - 1]].push(chain[k]); }
    paths.push({u, v, chain, back: order[u] > order[v]});
  }
  const L = Math.max(0, ...lay) + 1, rows = Array.from({length: L}, () => []), pos = new Array(w.length).fill(0);
  const firstRow = Math.min(...lay);
  for (const v of [...Array(w.length).keys()].sort((a, b) => (order[a] ?? 1e9) - (order[b] ?? 1e9))) rows[lay[v] - firstRow].push(v);
  const sweep = (r, nb) => {
    const key = new Map(r.map((v, k) => [v, nb[v].length ? nb[v].reduce((s, x) => s + pos[x], 0) / nb[v].length : pos[v] ?? k]));
    r.sort((a, b) => key.get(a) - key.get(b)); r.forEach((v, k) => { pos[v] = k; });
  };
  rows.forEach((r) => r.forEach((v, k) => { pos[v] = k; }));
  for (let t = 0; t < 4; t++) { for (const r of rows.slice(1)) sweep(r, up); for (const r of rows.slice(0, -1).reverse()) sweep(r, down); }
  const x = new Array(w.length).fill(0);
  rows.forEach((r) => { let c = 0; r.forEach((v) => { x[v] = c; c += w[v] + GAP; }); });
  const centre = (v) => x[v] + w[v] / 2;
  for (let t = 0; t < 6; t++) for (const r of (t % 2 ? rows.slice().reverse() : rows)) {
    const want = r.map((v) => { const nb = up[v].concat(down[v]); return nb.length ? nb.reduce((s, q) => s + centre(q), 0) / nb.length - w[v] / 2 : x[v]; });
    const f = [], b = [];
    r.forEach((v, k) => { f[k] = k ? Math.max(want[k], f[k - 1] + w[r[k - 1]] + GAP) : want[k]; });
    for (let k = r.length - 1; k >= 0; k--) b[k] = k < r.length - 1 ? Math.min(want[k], b[k + 1] - w[r[k]] - GAP) : want[k];
    r.forEach((v, k) => { x[v] = (f[k] + b[k]) / 2; });
  }
  const minx = Math.min(...x.slice(0, w.length)) - 10;
  const y = lay.map((l) => (l - firstRow) * ROW + 10);
  return {x: x.map((v) => v - minx), y, w, paths, height: L * ROW + 10, width: Math.max(...x.map((v, i) => v - minx + w[i])) + 10};
}

function describe(m, G, item) {  // label lines, classes and marks of one item
  const step = D.steps[m.k];
  if (item.kind === "stub") return {lines: [item.label], cls: "kind-stub", h: 20};
  if (item.kind !== "node") {
    const nodes = m.under.get(item.path) || [], chains = new Set(nodes.flatMap((i) => m.chainsOf[i].map((c) => step.chains[c][0])));
    const flags = nodes.reduce((f, i) => f | m.N[i][5], 0), name = item.kind === "repeat" ? item.info.label : relative(G, item.path);
    const l2 = item.kind === "repeat" ? `${item.size} ops each, open` : `${item.size} ops, open`;
    return {lines: [item.kind === "repeat" ? repeatTitle(item.info) : name, l2], cls: "kind-" + item.kind + (st.open.has(item.path) ? " open" : ""),
            chains: [...chains].sort(), flags, h: 36};
  }
  const r = m.N[item.i], op = S[r[1]], f = r[5], kind = kindOf(op, f);
  const sub = m.mod[item.i] !== G ? relative(G, m.mod[item.i]) : S[r[4]];
  const chips = [];
  for (const a of r[3]) { if (has(m.N[a][5], "param")) chips.push("W"); else if (has(m.N[a][5], "shared")) chips.push("S"); }
  let cls = "kind-" + kind;
  if (r[6] > 0) cls += " inserted";
  if (st.side === "after" && has(f, "created")) cls += " created";
  if (st.side === "before" && has(f, "erased")) cls += " erased";
  const heads = headStrip(m, item.i), h = (r[6] > 0 ? 48 : 36) + (heads.length ? 8 : 0);
  return {lines: [has(f, "input") ? r[0] : short(op), sub], cls, chains: [...new Set(m.chainsOf[item.i].map((c) => step.chains[c][0]))].sort(),
          flags: f, chips: [...new Set(chips)], tag: r[6] > 0 ? "+" + D.steps[r[6]].step : "", heads, h};
}
function headStrip(m, i) {  // v -> o per head: v's KV heads, or o's query heads coloured by the KV head they read
  for (const c of m.chainsOf[i]) {
    const roles = D.steps[m.k].chains[c][4];
    if (!roles || !roles.heads) continue;
    if (roles.v.includes(i)) return roles.heads.map(([kv]) => kv);
    if (roles.o.includes(i)) return roles.heads.flatMap(([kv, qs]) => qs.map(() => kv));
  }
  return [];
}
const headColour = (kv) => `hsl(${(kv * 67) % 360},60%,48%)`;
function kindOf(op, f) {
  if (has(f, "input") || has(f, "output")) return "io";
  if (op.startsWith("fxquant.")) return "fxq";
  if (/linear|addmm|\.mm\.|matmul|embedding/.test(op)) return "linear";
  if (/attention/.test(op)) return "attn";
  if (/\.(view|reshape|transpose|unsqueeze|expand|slice|to|alias|permute|contiguous|_to_copy|clone|squeeze)\./.test(op + ".")) return "view";
  return "op";
}
function near(G, p) {  // p without the module path it shares with G: input_layernorm seen from self_attn
  const a = G.split("."), b = p.split(".");
  let k = 0; while (k < a.length && k < b.length - 1 && a[k] === b[k]) k++;
  if (k > 0 && /^\d+$/.test(b[k])) k--;  // layers.1.input_layernorm, not 1.input_layernorm
  return b.slice(k).join(".") || "(root)";
}
const relative = (G, p) => (G && p.startsWith(G + ".") ? p.slice(G.length + 1) : p) || "(root)";

function svgOf(m, G, g) {
  const ds = g.items.map((it) => describe(m, G, it));
  ds.forEach((d, k) => {
    const text = 6.4 * Math.max(...d.lines.concat(d.tag || "").map((s) => s.length)), heads = 7 * (d.heads || []).length;
    g.items[k].w = Math.min(300, Math.max(d.h === 20 ? 60 : 76, 16 + 5 * (d.chains || []).length + Math.max(text, heads)));
  });
  const P = layout(g.items, g.edges), out = [];
  for (const p of P.paths) {
    const last = p.chain.length - 1;  // from the source's bottom through each dummy's row middle to the target's top
    const pts = p.chain.map((v, k) => [P.x[v] + P.w[v] / 2, P.y[v] + (k === 0 ? ds[v].h : k === last ? 0 : 18)]);
    let d = `M${pts[0][0].toFixed(1)},${pts[0][1]}`;
    for (let k = 1; k < pts.length; k++) { const [a, b] = [pts[k - 1], pts[k]], my = (a[1] + b[1]) / 2; d += ` C${a[0].toFixed(1)},${my} ${b[0].toFixed(1)},${my} ${b[0].toFixed(1)},${b[1]}`; }
    out.push(`<path class="edge${p.back ? " back" : ""}" d="${d}"/>`);
  }
  g.items.forEach((it, k) => {
    const d = ds[k], x = P.x[k], y = P.y[k], w = P.w[k];
    const data = it.kind === "node" ? `data-i="${it.i}"` : it.path ? `data-path="${esc(it.path)}"${it.info ? ` data-count="${it.info.count}"` : ""}` : "";
    let s = `<g class="node ${d.cls}" ${data} transform="translate(${x.toFixed(1)},${y})"><rect class="box" width="${w.toFixed(1)}" height="${d.h}"/>`;
    (d.chains || []).forEach((c, j) => { s += `<rect class="stripe chain-${c}" x="${1 + j * 5}" y="1" width="4" height="${d.h - 2}"/>`; });
    const x0 = 6 + 5 * (d.chains || []).length;
    s += `<text x="${x0}" y="${d.h === 20 ? 14 : 15}">${esc(d.lines[0])}</text>`;
    if (d.lines[1]) s += `<text class="sub" x="${x0}" y="30">${esc(d.lines[1])}</text>`;
    if (d.tag) s += `<text class="tag" x="${x0}" y="43">${esc(d.tag)}</text>`;
    let mx = w - 4;
    if (d.flags && has(d.flags, "blocked")) { s += `<text class="mark blocked" x="${mx}" y="15" text-anchor="end">\u26a0</text>`; mx -= 13; }
    if (d.flags && has(d.flags, "edited") && st.side === "after") { s += `<text class="mark edited" x="${mx}" y="15" text-anchor="end">\u270e</text>`; mx -= 13; }
    (d.heads || []).forEach((kv, j) => { s += `<rect class="head" data-kv="${kv}" x="${x0 + j * 7}" y="${d.h - 8}" width="6" height="5" fill="${headColour(kv)}"/>`; });
    if (d.chips && d.chips.length) s += `<text class="chip" x="${w - 4}" y="30" text-anchor="end">${d.chips.join(" ")}</text>`;
    out.push(s + `<title>${esc(tooltip(m, it, d))}</title></g>`);
  });
  return `<svg width="${P.width.toFixed(0)}" height="${P.height}" viewBox="0 0 ${P.width.toFixed(0)} ${P.height}">${out.join("")}</svg>`;
}
function tooltip(m, it, d) {
  if (it.kind !== "node") return it.path ? `${it.path}${it.info ? " (same graph in " + it.info.label + ")" : ""}` : d.lines[0];
  const r = m.N[it.i], b = D.steps[m.k].blocked.filter((x) => x[0] === it.i).map((x) => "blocked: " + x[2]);
  return [`${r[0]} = ${S[r[1]]}`, m.mod[it.i], S[r[4]], ...b].filter(Boolean).join("\n");
}

function section(m, G, title) {  // one group: header, its layout, then the sections of its opened boxes
  const el = document.createElement("section");
  el.className = "group"; el.dataset.path = G;
  const g = graph(m, G), info = blockOf(m, G);
  const note = info && info.count > 1 ? `<span class=note>showing ${esc(G)}; ${info.count} blocks have this graph: ${esc(info.label)}</span>` : "";
  el.innerHTML = `<div class=ghead><b>${esc(title)}</b><span class=note>${(m.under.get(G) || []).length} ops</span>${note}${G ? "<span class=x title=close>\u2715</span>" : ""}</div>`
    + "<div class=gbody>" + svgOf(m, G, g) + "<div class=children></div></div>";
  const kids = el.querySelector(":scope > .gbody > .children");
  for (const it of g.items) if ((it.kind === "group" || it.kind === "repeat") && st.open.has(it.path))
    kids.appendChild(section(m, it.path, it.kind === "repeat" ? repeatTitle(it.info) : it.path));
  const x = el.querySelector(":scope > .ghead .x");
  if (x) x.onclick = () => { st.open.delete(G); render(); };
  el.querySelector(":scope > .gbody > svg").addEventListener("click", (e) => {
    const n = e.target.closest(".node"); if (!n) return;
    if (n.dataset.path) { toggle(n.dataset.path); return; }
    if (n.dataset.i) select(Number(n.dataset.i));
  });
  return el;
}
const repeatTitle = (info) => info.count > 1 ? `${info.label} \u00d7 ${info.count}` : info.label;
function toggle(path) { if (st.open.has(path)) st.open.delete(path); else st.open.add(path); render(); }

function view() { return st.side === "before" && st.step > 0 ? st.step - 1 : st.step; }
function render() {
  const m = model(view()), s = D.steps[st.step], root = $("root");
  root.replaceChildren(section(m, "", s.index ? `after ${s.step}` : "input graph"));
  if (st.side === "before" && st.step > 0) root.firstChild.querySelector("b").textContent = `before ${s.step} (the graph after ${D.steps[st.step - 1].step})`;
  document.querySelectorAll("#steps li").forEach((li) => li.classList.toggle("on", Number(li.dataset.k) === st.step));
  document.querySelectorAll("#bar button").forEach((b) => { b.classList.toggle("on", b.dataset.side === st.side); b.disabled = st.step === 0; });
  $("title").textContent = `${String(s.index).padStart(2, "0")} ${s.step}`;
  $("summary").textContent = s.lines[0] || "the captured graph before any pass";
  panels(m, s);
  if (st.sel >= 0) mark(st.sel);
}
function panels(m, s) {
  const list = (rows) => rows.length ? "<ul>" + rows.map(([t, c]) => `<li>${esc(t)}${c > 1 ? " \u00d7" + c : ""}</li>`).join("") + "</ul>" : "<p>none</p>";
  const dd = s.diff || {}, n = (r) => (r || []).reduce((a, x) => a + x[1], 0);
  $("diff").innerHTML = s.index ? `<details class=panel open><summary>diff of ${esc(s.step)}: <span class=dc>${n(dd.created)}</span> created, <span class=de>${n(dd.erased)}</span> erased, <span class=dm>${n(dd.edited)}</span> edited, <span class=dw>${n(dd.weights)}</span> weights changed</summary><div class=cols>`
    + `<div><h2>created</h2>${list(dd.created || [])}</div><div><h2>erased</h2>${list(dd.erased || [])}</div><div><h2>edited (the pass's changes)</h2>${list(dd.edited || [])}</div>`
    + `<div><h2>weights whose values changed</h2>${list(dd.weights || [])}</div></div></details>` : "";
  const bl = [...new Map(s.blocked.map((b) => [b[3] + ": " + (b[1] || "") + ": " + b[2], b])).keys()];
  $("blocked").innerHTML = bl.length ? `<details class=panel><summary>blocked (${s.blocked.length})</summary><ul>${bl.map((t) => `<li>\u26a0 ${esc(t)}</li>`).join("")}</ul></details>` : "";
  const shared = new Map(), N = m.N;
  let params = 0, hidden = 0;
  N.forEach((r, i) => { if (has(r[5], "param")) params++; else if (has(r[5], "hidden")) hidden++; else if (has(r[5], "shared")) shared.set(m.mod[i] || "(root)", (shared.get(m.mod[i] || "(root)") || 0) + 1); });
  $("pulled").innerHTML = `<details class=panel><summary>pulled out of the layout: ${params} parameters (chip W), ${[...shared.values()].reduce((a, b) => a + b, 0)} shared-input ops (chip S: rotary tables, masks), ${hidden} asserts</summary><ul>`
    + [...shared].map(([p, c]) => `<li>${esc(p)}: ${c} ops</li>`).join("") + "</ul></details>" + (s.note ? `<div class=panel>${esc(s.note)}</div>` : "");
}

function select(i) { st.sel = i; mark(i); detail(model(view()), i); }
function mark(i) {
  const m = model(view()), peers = new Set(m.chainsOf[i] ? m.chainsOf[i].flatMap((c) => D.steps[m.k].chains[c][3]) : []);
  document.querySelectorAll(".node[data-i]").forEach((e) => e.classList.toggle("peer", peers.has(Number(e.dataset.i)) && Number(e.dataset.i) !== i));
}
function detail(m, i) {
  const r = m.N[i], s = D.steps[m.k], el = $("detail");
  const ins = r[3].map((a) => `${esc(m.N[a][0])}${has(m.N[a][5], "param") ? " (" + esc(S[m.N[a][1]]) + ")" : has(m.N[a][5], "shared") ? " (shared input)" : ""}`);
  const chains = m.chainsOf[i].map((c) => `<li><b>${CHAINS[s.chains[c][0]]}</b>: ${esc(s.chains[c][1])}<br>${esc(s.chains[c][2])}</li>`);
  const bl = s.blocked.filter((b) => b[0] === i).map((b) => `<li>\u26a0 ${esc(b[3])}: ${esc(b[2])}</li>`);
  const flags = Object.keys(F).filter((k) => has(r[5], k));
  el.innerHTML = `<span class=close>\u2715</span><b>${esc(r[0])}</b> = <code>${esc(S[r[1]])}</code><br>module: <code>${esc(m.mod[i] || "(root)")}</code> ${esc(S[r[4]])}<br>`
    + `inputs: ${ins.join(", ") || "none"}<br>${r[6] > 0 ? "inserted by <b>" + esc(D.steps[r[6]].step) + "</b><br>" : ""}${flags.length ? "flags: " + flags.join(", ") + "<br>" : ""}`
    + (chains.length ? `<ul>${chains.join("")}</ul>` : "") + (bl.length ? `<ul>${bl.join("")}</ul>` : "");
  el.style.display = "block";
  el.querySelector(".close").onclick = () => { el.style.display = "none"; st.sel = -1; mark(-1); };
}

function search(q) {  // module path or op: every drawn node whose module, op or name contains q
  const m = model(view()), out = $("results");
  q = q.trim().toLowerCase();
  if (!q) { out.innerHTML = ""; return; }
  const hits = [];
  for (let i = 0; i < m.n; i++) if (m.drawn[i] && (m.mod[i].toLowerCase().includes(q) || S[m.N[i][1]].toLowerCase().includes(q) || m.N[i][0].toLowerCase().includes(q))) hits.push(i);
  out.innerHTML = `<p class=count>${hits.length} match${hits.length === 1 ? "" : "es"}</p>` + hits.slice(0, 60).map((i) => `<div class=hit data-i="${i}">${esc(m.mod[i] || "(root)")} \u00b7 ${esc(short(S[m.N[i][1]]))} <code>${esc(m.N[i][0])}</code></div>`).join("");
  out.querySelectorAll(".hit").forEach((e) => { e.onclick = () => reveal(Number(e.dataset.i)); });
}
function reveal(i) {  // open the boxes on the way to node i (in a block of a class: the same node of its shown block)
  const m = model(view());
  for (let G = "", guard = 0; guard < 40; guard++) {
    const {items: it, of} = items(m, G), item = it[of.get(i)];
    if (!item || item.kind === "node") break;
    if (item.kind === "repeat") {
      const b = blockOf(m, m.mod[i]), mine = (m.under.get(blockPath(m, m.mod[i], b)) || []), k = mine.indexOf(i);
      i = (m.under.get(item.path) || [])[k] ?? i;
    }
    st.open.add(item.path); G = item.path;
  }
  render(); select(i);
  const e = document.querySelector(`.node[data-i="${i}"]`);
  if (e) { e.classList.add("flash"); e.scrollIntoView({block: "center", inline: "center"}); }
}
function blockPath(m, path, info) { let p = path; while (p && p.slice(0, Math.max(0, p.lastIndexOf("."))) !== info.parent) p = p.slice(0, Math.max(0, p.lastIndexOf("."))); return p; }

function sidebar() {
  $("steps").innerHTML = D.steps.map((s, k) => {
    const d = s.diff || {}, n = (r) => (r || []).reduce((a, x) => a + x[1], 0);
    const counts = k ? `<span class=counts><span class=c>+${n(d.created)}</span> <span class=e>\u2212${n(d.erased)}</span> <span class=m>\u270e${n(d.edited)}</span> <span class=b>\u26a0${s.blocked.length}</span></span>` : "";
    return `<li data-k="${k}"><span>${String(s.index).padStart(2, "0")} ${esc(s.step)}</span>${counts}</li>`;
  }).join("");
  $("steps").querySelectorAll("li").forEach((li) => { li.onclick = () => { st.step = Number(li.dataset.k); st.side = "after"; render(); }; });
  const sw = (cls, text) => `<div><span class="sw" style="background:${cls}"></span>${text}</div>`;
  $("legend").innerHTML = Object.entries(CHAINS).map(([c, t]) => `<div><svg width=22 height=12><rect class="stripe chain-${c}" width=22 height=12 /></svg>${t}</div>`).join("")
    + sw("#d6e6fb", "linear / embedding") + sw("var(--fxq)", "fxquant op (hadamard, fake_quant, quantized_linear)") + sw("#e9dcf5", "attention")
    + sw("#f2f2f2", "other aten op") + sw("#fbfbfb", "view / cast") + sw("#e4f3e4", "graph input / output")
    + sw("#e3e9f7", "group (click to open); \u00d7N: N identical blocks")
    + `<div><span class=sw style="border:2px solid var(--created)"></span>inserted by a pass (+name); thick: by this step</div>`
    + `<div><span class=sw style="border:2px dashed var(--erased)"></span>erased by this step (before view)</div>`
    + `<div><b style="color:var(--edited)">\u270e</b> weight edited by this step \u00a0 <b style="color:var(--blocked)">\u26a0</b> blocked (hover: reason)</div>`
    + `<div>chips: W reads a parameter, S reads a shared input</div>`
    + `<div>${[0, 1, 2].map((kv) => `<span class=sw style="width:8px;background:${headColour(kv)}"></span>`).join("")} v -> o per head: v's KV heads; o's query heads, coloured by the KV head they read</div>`
    + `<div>click a node: its chains (highlighted), heads, inputs</div>`;
  document.querySelectorAll("#bar button").forEach((b) => { b.onclick = () => { st.side = b.dataset.side; render(); }; });
  let timer = 0;
  $("search").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => search(e.target.value), 120); });
}

document.body.insertAdjacentHTML("afterbegin", `<aside><h1>${esc(D.title)}</h1><input id=search placeholder="search module path or op"><div id=results></div>`
  + `<h2>steps</h2><ol id=steps></ol><h2>legend</h2><div id=legend></div><div id=timing></div></aside>`
  + `<main><div id=bar><h2 id=title></h2><span id=summary></span><button data-side=before>before</button><button data-side=after>after</button></div>`
  + `<div id=diff></div><div id=blocked></div><div id=pulled></div><div id=root></div></main><div id=detail></div>`);
sidebar();
render();
const T1 = performance.now();
window.fxq = {timings: {parse: T_PARSE - T0, script: T1 - T0, firstRender: T1}, state: st, reveal, toggle, search, render};
requestAnimationFrame(() => setTimeout(() => { window.fxq.timings.painted = performance.now(); }));
$("timing").textContent = `written ${D.written}; opened in ${T1.toFixed(0)} ms (JSON ${(T_PARSE - T0).toFixed(0)} ms, first render ${(T1 - T_PARSE).toFixed(0)} ms)`;
"""
