"""The HTML dump's script: sections per opened group, search, the diff per pass, the legend.

`SCRIPT` is plain JavaScript fxquant writes itself (no library, no network). It runs after
`page_layout.LAYOUT` and `page_model.MODEL` in the page's one script. The one idea: nothing is laid
out before someone looks at it. The first screen draws only the top-level group: the embeddings,
one box per class of identical blocks, the final norm and the head. Clicking a box lays out that
group's members in a section beside it (`section`). Parameters, shared inputs and asserts become
chips and lists, never nodes. `window.fxq` holds the timings and the few helpers the browser
tests use.
"""

SCRIPT = r"""
const T0 = performance.now();
const D = JSON.parse(document.getElementById("fxq-data").textContent);
const S = D.strings, F = D.flags, T_PARSE = performance.now();
const CHAINS = {norm: "norm -> readers", vo: "v -> o (per head)", mlp: "up/gate -> down", stream: "residual add"};
const st = {step: D.steps.length - 1, side: "after", open: new Set(), sel: -1};
const cache = new Map();
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const leaf = (p) => p.slice(p.lastIndexOf(".") + 1);
const short = (op) => { const p = op.split("."); return (p[0] === "aten" || p[0] === "fxquant") && p.length > 1 ? p[1] : op; };
const has = (f, name) => (f & F[name]) !== 0;
const total = (rows) => (rows || []).reduce((a, x) => a + x[1], 0);
const chainClasses = (m, nodes) => [...new Set(nodes.flatMap((i) => m.chainsOf[i].map((c) => m.s.chains[c][0])))].sort();

function describe(m, G, item) {  // an item's label lines, classes, marks and height
  if (item.kind === "stub") return {lines: [item.label], cls: "kind-stub", h: 20};
  if (item.kind !== "node") {
    const nodes = m.under.get(item.path) || [], flags = nodes.reduce((f, i) => f | m.N[i][5], 0);
    const repeat = item.kind === "repeat", changed = st.side === "after" ? has(flags, "created") && " created"
      : has(flags, "erased") && " erased";  // a box outlines what this step did inside it, so a reader knows where to look
    return {lines: [repeat ? repeatTitle(item.info) : relative(G, item.path), `${item.size} ops${repeat ? " each" : ""}, open`],
            cls: "kind-" + item.kind + (st.open.has(item.path) ? " open" : "") + (changed || ""), chains: chainClasses(m, nodes),
            flags, h: 36};
  }
  const r = m.N[item.i], op = S[r[1]], f = r[5], inserted = r[6] > 0;
  const chips = new Set(r[3].map((a) => (has(m.N[a][5], "param") ? "W" : has(m.N[a][5], "shared") ? "S" : "")).filter(Boolean));
  let cls = "kind-" + kindOf(op, f) + (inserted ? " inserted" : "");
  if (st.side === "after" && has(f, "created")) cls += " created";
  if (st.side === "before" && has(f, "erased")) cls += " erased";
  const heads = headStrip(m, item.i);
  return {lines: [has(f, "input") ? r[0] : short(op), m.mod[item.i] !== G ? relative(G, m.mod[item.i]) : S[r[4]]],
          cls, chains: chainClasses(m, [item.i]), flags: f, chips: [...chips], heads,
          tag: inserted ? "+" + D.steps[r[6]].step : "", h: (inserted ? 48 : 36) + (heads.length ? 8 : 0)};
}
function headStrip(m, i) {  // v -> o per head: v's KV heads, or o's query heads coloured by the KV head they read
  for (const c of m.chainsOf[i]) {
    const roles = m.s.chains[c][4];
    if (!roles || !roles.heads) continue;
    if (roles.v.includes(i)) return roles.heads.map(([kv]) => kv);
    if (roles.o.includes(i)) return roles.heads.flatMap(([kv, qs]) => qs.map(() => kv));
  }
  return [];
}
const headColour = (kv) => `hsl(${(kv * 67) % 360},60%,48%)`;
const VIEWS = /\.(view|reshape|transpose|unsqueeze|expand|slice|to|alias|permute|contiguous|_to_copy|clone|squeeze)\./;
function kindOf(op, f) {
  if (has(f, "input") || has(f, "output")) return "io";
  if (op.startsWith("fxquant.")) return "fxq";
  if (/linear|addmm|\.mm\.|matmul|embedding/.test(op)) return "linear";
  if (/attention/.test(op)) return "attn";
  return VIEWS.test(op + ".") ? "view" : "op";
}

function svgOf(m, G, g) {  // lay out G's graph and draw it: edges first, then one <g class=node> per item
  const ds = g.items.map((it) => describe(m, G, it));
  ds.forEach((d, k) => {
    const text = 6.4 * Math.max(...d.lines.concat(d.tag || "").map((s) => s.length)), heads = 7 * (d.heads || []).length;
    g.items[k].w = Math.min(300, Math.max(d.h === 20 ? 60 : 76, 16 + 5 * (d.chains || []).length + Math.max(text, heads)));
  });
  const P = layout(g.items, g.edges), out = [], f1 = (v) => v.toFixed(1);
  for (const p of P.paths) {  // from the source's bottom through each dummy's row middle to the target's top
    const last = p.chain.length - 1;
    const pts = p.chain.map((v, k) => [P.x[v] + P.w[v] / 2, P.y[v] + (k === 0 ? ds[v].h : k === last ? 0 : 18)]);
    let d = `M${f1(pts[0][0])},${pts[0][1]}`;
    for (let k = 1; k < pts.length; k++) {
      const [a, b] = [pts[k - 1], pts[k]], my = (a[1] + b[1]) / 2;
      d += ` C${f1(a[0])},${my} ${f1(b[0])},${my} ${f1(b[0])},${b[1]}`;
    }
    out.push(`<path class="edge${p.back ? " back" : ""}" d="${d}"/>`);
  }
  g.items.forEach((it, k) => out.push(nodeSvg(m, it, ds[k], [P.x[k], P.y[k], P.w[k]])));
  const w = P.width.toFixed(0);
  return `<svg width="${w}" height="${P.height}" viewBox="0 0 ${w} ${P.height}">${out.join("")}</svg>`;
}
function nodeSvg(m, it, d, [x, y, w]) {
  const count = it.info ? ` data-count="${it.info.count}"` : "";
  const data = it.kind === "node" ? `data-i="${it.i}"` : it.path ? `data-path="${esc(it.path)}"${count}` : "";
  const chains = d.chains || [], x0 = 6 + 5 * chains.length;
  let s = `<g class="node ${d.cls}" ${data} transform="translate(${x.toFixed(1)},${y})">`
    + `<rect class="box" width="${w.toFixed(1)}" height="${d.h}"/>`;
  chains.forEach((c, j) => { s += `<rect class="stripe chain-${c}" x="${1 + j * 5}" y="1" width="4" height="${d.h - 2}"/>`; });
  s += `<text x="${x0}" y="${d.h === 20 ? 14 : 15}">${esc(d.lines[0])}</text>`;
  if (d.lines[1]) s += `<text class="sub" x="${x0}" y="30">${esc(d.lines[1])}</text>`;
  if (d.tag) s += `<text class="tag" x="${x0}" y="43">${esc(d.tag)}</text>`;
  const marks = [];
  if (d.flags && has(d.flags, "blocked")) marks.push(["blocked", "\u26a0"]);
  if (d.flags && has(d.flags, "edited") && st.side === "after") marks.push(["edited", "\u270e"]);
  marks.forEach(([c, t], j) => { s += `<text class="mark ${c}" x="${w - 4 - 13 * j}" y="15" text-anchor="end">${t}</text>`; });
  (d.heads || []).forEach((kv, j) => {
    s += `<rect class="head" data-kv="${kv}" x="${x0 + j * 7}" y="${d.h - 8}" width="6" height="5" fill="${headColour(kv)}"/>`;
  });
  if (d.chips && d.chips.length) s += `<text class="chip" x="${w - 4}" y="30" text-anchor="end">${d.chips.join(" ")}</text>`;
  return s + `<title>${esc(tooltip(m, it, d))}</title></g>`;
}
function tooltip(m, it, d) {
  if (it.kind !== "node") return it.path ? it.path + (it.info ? ` (same graph in ${it.info.label})` : "") : d.lines[0];
  const r = m.N[it.i], blocked = m.s.blocked.filter((b) => b[0] === it.i).map((b) => "blocked: " + b[2]);
  return [`${r[0]} = ${S[r[1]]}`, m.mod[it.i], S[r[4]], ...blocked].filter(Boolean).join("\n");
}

function section(m, G, title) {  // one group: header, its layout, then the sections of its opened boxes
  const el = document.createElement("section"), g = graph(m, G), info = blockOf(m, G);
  el.className = "group";
  el.dataset.path = G;
  const note = info && info.count > 1 ? `<span class=note>showing ${esc(G)}; ${info.count} blocks have this graph: `
    + `${esc(info.label)}</span>` : "";
  el.innerHTML = `<div class=ghead><b>${esc(title)}</b><span class=note>${(m.under.get(G) || []).length} ops</span>${note}`
    + `${G ? "<span class=x title=close>\u2715</span>" : ""}</div><div class=gbody>${svgOf(m, G, g)}<div class=children></div></div>`;
  const kids = el.querySelector(":scope > .gbody > .children");
  for (const it of g.items)
    if ((it.kind === "group" || it.kind === "repeat") && st.open.has(it.path))
      kids.appendChild(section(m, it.path, it.kind === "repeat" ? repeatTitle(it.info) : it.path));
  const x = el.querySelector(":scope > .ghead .x");
  if (x) x.onclick = () => { st.open.delete(G); render(); };
  el.querySelector(":scope > .gbody > svg").addEventListener("click", (e) => {
    const n = e.target.closest(".node");
    if (n && n.dataset.path) toggle(n.dataset.path);
    else if (n && n.dataset.i) select(Number(n.dataset.i));
  });
  return el;
}
const repeatTitle = (info) => (info.count > 1 ? `${info.label} \u00d7 ${info.count}` : info.label);
function toggle(path) { if (st.open.has(path)) st.open.delete(path); else st.open.add(path); render(); }

const view = () => (st.side === "before" && st.step > 0 ? st.step - 1 : st.step);  // the step whose graph is shown
function render() {
  const m = model(view()), s = D.steps[st.step], root = $("root");
  root.replaceChildren(section(m, "", s.index ? `after ${s.step}` : "input graph"));
  if (view() !== st.step) root.firstChild.querySelector("b").textContent = `before ${s.step} (after ${D.steps[st.step - 1].step})`;
  document.querySelectorAll("#steps li").forEach((li) => li.classList.toggle("on", Number(li.dataset.k) === st.step));
  document.querySelectorAll("#bar button").forEach((b) => {
    b.classList.toggle("on", b.dataset.side === st.side);
    b.disabled = st.step === 0;
  });
  $("title").textContent = `${String(s.index).padStart(2, "0")} ${s.step}`;
  $("summary").textContent = s.lines[0] || "the captured graph before any pass";
  panels(m, s);
  if (st.sel >= 0) mark(st.sel);
}
function panels(m, s) {  // the step's diff, its blocked places, and what the layout leaves out
  const list = (rows) => (rows && rows.length ? "<ul>" + rows.map(([t, c]) => `<li>${esc(t)}${c > 1 ? " \u00d7" + c : ""}</li>`).join("")
    + "</ul>" : "<p>none</p>");
  const d = s.diff || {}, col = (title, rows) => `<div><h2>${title}</h2>${list(rows)}</div>`;
  $("diff").innerHTML = s.index ? `<details class=panel open><summary>diff of ${esc(s.step)}: <span class=dc>${total(d.created)}</span> `
    + `created, <span class=de>${total(d.erased)}</span> erased, <span class=dm>${total(d.edited)}</span> edited, `
    + `<span class=dw>${total(d.weights)}</span> weights changed</summary><div class=cols>` + col("created", d.created)
    + col("erased", d.erased) + col("edited (the pass's changes)", d.edited) + col("weights whose values changed", d.weights)
    + "</div></details>" : "";
  const reasons = [...new Set(s.blocked.map((b) => `${b[3]}: ${b[1] || ""}: ${b[2]}`))];
  $("blocked").innerHTML = reasons.length ? `<details class=panel><summary>blocked (${s.blocked.length})</summary><ul>`
    + reasons.map((t) => `<li>\u26a0 ${esc(t)}</li>`).join("") + "</ul></details>" : "";
  const shared = new Map();
  let params = 0, hidden = 0, sharedOps = 0;
  m.N.forEach((r, i) => {
    if (has(r[5], "param")) params++;
    else if (has(r[5], "hidden")) hidden++;
    else if (has(r[5], "shared")) { sharedOps++; shared.set(m.mod[i] || "(root)", (shared.get(m.mod[i] || "(root)") || 0) + 1); }
  });
  $("pulled").innerHTML = `<details class=panel><summary>pulled out of the layout: ${params} parameters (chip W), ${sharedOps} `
    + `shared-input ops (chip S: rotary tables, masks), ${hidden} asserts</summary><ul>`
    + [...shared].map(([p, c]) => `<li>${esc(p)}: ${c} ops</li>`).join("") + "</ul></details>"
    + (s.note ? `<div class=panel>${esc(s.note)}</div>` : "");
}

function select(i) { st.sel = i; mark(i); detail(model(view()), i); }
function mark(i) {  // outline the other members of i's chains
  const m = model(view()), peers = new Set((m.chainsOf[i] || []).flatMap((c) => m.s.chains[c][3]));
  document.querySelectorAll(".node[data-i]").forEach((e) => {
    const j = Number(e.dataset.i);
    e.classList.toggle("peer", peers.has(j) && j !== i);
  });
}
function detail(m, i) {
  const r = m.N[i], el = $("detail"), what = (a) => (has(m.N[a][5], "param") ? ` (${esc(S[m.N[a][1]])})`
    : has(m.N[a][5], "shared") ? " (shared input)" : "");
  const chains = m.chainsOf[i].map((c) => m.s.chains[c])
    .map((c) => `<li><b>${CHAINS[c[0]]}</b>: ${esc(c[1])}<br>${esc(c[2])}</li>`);
  const blocked = m.s.blocked.filter((b) => b[0] === i).map((b) => `<li>\u26a0 ${esc(b[3])}: ${esc(b[2])}</li>`);
  const flags = Object.keys(F).filter((k) => has(r[5], k));
  el.innerHTML = `<span class=close>\u2715</span><b>${esc(r[0])}</b> = <code>${esc(S[r[1]])}</code><br>`
    + `module: <code>${esc(m.mod[i] || "(root)")}</code> ${esc(S[r[4]])}<br>`
    + `inputs: ${r[3].map((a) => esc(m.N[a][0]) + what(a)).join(", ") || "none"}<br>`
    + (r[6] > 0 ? `inserted by <b>${esc(D.steps[r[6]].step)}</b><br>` : "") + (flags.length ? `flags: ${flags.join(", ")}<br>` : "")
    + (chains.length ? `<ul>${chains.join("")}</ul>` : "") + (blocked.length ? `<ul>${blocked.join("")}</ul>` : "");
  el.style.display = "block";
  el.querySelector(".close").onclick = () => { el.style.display = "none"; st.sel = -1; mark(-1); };
}

function search(q) {  // every drawn node whose module path, op or name contains q
  const m = model(view()), out = $("results"), hits = [];
  q = q.trim().toLowerCase();
  if (!q) { out.innerHTML = ""; return; }
  const match = (i) => [m.mod[i], S[m.N[i][1]], m.N[i][0]].some((t) => t.toLowerCase().includes(q));
  for (let i = 0; i < m.n; i++) if (m.drawn[i] && match(i)) hits.push(i);
  out.innerHTML = `<p class=count>${hits.length} match${hits.length === 1 ? "" : "es"}</p>` + hits.slice(0, 60).map((i) =>
    `<div class=hit data-i="${i}">${esc(m.mod[i] || "(root)")} \u00b7 ${esc(short(S[m.N[i][1]]))} <code>${esc(m.N[i][0])}</code></div>`).join("");
  out.querySelectorAll(".hit").forEach((e) => { e.onclick = () => reveal(Number(e.dataset.i)); });
}
function reveal(i) {  // open the boxes on the way to node i; in a block of a class, go to the same node of the block shown
  const m = model(view());
  for (let G = "", depth = 0; depth < 40; depth++) {
    const {items: it, of} = items(m, G), item = it[of.get(i)];
    if (!item || item.kind === "node") break;
    if (item.kind === "repeat") {
      const mine = m.under.get(blockPath(m.mod[i], blockOf(m, m.mod[i]))) || [];
      i = (m.under.get(item.path) || [])[mine.indexOf(i)] ?? i;
    }
    st.open.add(item.path);
    G = item.path;
  }
  render();
  select(i);
  const e = document.querySelector(`.node[data-i="${i}"]`);
  if (e) { e.classList.add("flash"); e.scrollIntoView({block: "center", inline: "center"}); }
}

function sidebar() {  // the steps with their counts, the legend, the before/after buttons and the search box
  $("steps").innerHTML = D.steps.map((s, k) => {
    const d = s.diff || {}, counts = k ? `<span class=counts><span class=c>+${total(d.created)}</span> <span class=e>\u2212`
      + `${total(d.erased)}</span> <span class=m>\u270e${total(d.edited)}</span> <span class=b>\u26a0${s.blocked.length}</span></span>` : "";
    return `<li data-k="${k}"><span>${String(s.index).padStart(2, "0")} ${esc(s.step)}</span>${counts}</li>`;
  }).join("");
  $("steps").querySelectorAll("li").forEach((li) => {
    li.onclick = () => { st.step = Number(li.dataset.k); st.side = "after"; render(); };
  });
  const sw = (style, text) => `<div><span class="sw" style="${style}"></span>${text}</div>`;
  const heads = [0, 1, 2].map((kv) => `<span class=sw style="width:8px;background:${headColour(kv)}"></span>`).join("");
  $("legend").innerHTML = Object.entries(CHAINS).map(([c, t]) =>
    `<div><svg width=22 height=12><rect class="stripe chain-${c}" width=22 height=12 /></svg>${t}</div>`).join("")
    + sw("background:#d6e6fb", "linear / embedding") + sw("background:var(--fxq)", "fxquant op (hadamard, fake_quant, quantized_linear)")
    + sw("background:#e9dcf5", "attention") + sw("background:#f2f2f2", "other aten op") + sw("background:#fbfbfb", "view / cast")
    + sw("background:#e4f3e4", "graph input / output") + sw("background:#e3e9f7", "group (click to open); \u00d7N: N identical blocks")
    + sw("border:2px solid var(--created)", "inserted by a pass (+name); thick: by this step, or a box holding such ops")
    + sw("border:2px dashed var(--erased)", "erased by this step (before view), or a box holding such ops")
    + `<div><b style="color:var(--edited)">\u270e</b> weight edited by this step \u00a0 `
    + `<b style="color:var(--blocked)">\u26a0</b> blocked (hover: reason)</div>`
    + `<div>chips: W reads a parameter, S reads a shared input</div>`
    + `<div>${heads} v -> o per head: v's KV heads; o's query heads, coloured by the KV head they read</div>`
    + `<div>click a node: its chains (highlighted), heads, inputs</div>`;
  document.querySelectorAll("#bar button").forEach((b) => { b.onclick = () => { st.side = b.dataset.side; render(); }; });
  let timer = 0;
  $("search").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => search(e.target.value), 120); });
}

document.body.insertAdjacentHTML("afterbegin", `<aside><h1>${esc(D.title)}</h1>`
  + `<input id=search placeholder="search module path or op"><div id=results></div><h2>steps</h2><ol id=steps></ol>`
  + `<h2>legend</h2><div id=legend></div><div id=timing></div></aside><main><div id=bar><h2 id=title></h2>`
  + `<span id=summary></span><button data-side=before>before</button><button data-side=after>after</button></div>`
  + `<div id=diff></div><div id=blocked></div><div id=pulled></div><div id=root></div></main><div id=detail></div>`);
sidebar();
render();
const T1 = performance.now();
window.fxq = {timings: {parse: T_PARSE - T0, script: T1 - T0, firstRender: T1}, state: st, reveal, toggle, search, render};
requestAnimationFrame(() => setTimeout(() => { window.fxq.timings.painted = performance.now(); }));
$("timing").textContent = `written ${D.written}; opened in ${T1.toFixed(0)} ms `
  + `(JSON ${(T_PARSE - T0).toFixed(0)} ms, first render ${(T1 - T_PARSE).toFixed(0)} ms)`;
"""
