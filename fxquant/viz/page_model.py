"""The HTML dump's view model, in JavaScript: a step's rows as a module tree, and one group's members.

`MODEL` defines `model(k)`, built once per step on first view: users, the module tree over the nodes
that are drawn, the nodes under each path, and which blocks share a graph. It also defines
`items(m, G)`, the members of group G. The one idea: a group shows its own nodes, draws a child
module of at most `INLINE_MAX` ops inline, and shows a larger child as a box. A child without ops
of its own (`model`, `model.layers`) is see-through, and all the blocks of one class are one
repeat box. `graph(m, G)` adds stubs for the edges that leave the group.
"""

MODEL = r"""
const INLINE_MAX = 6;  // a child module with at most this many ops is drawn inline, not as a box

function model(k) {
  if (cache.has(k)) return cache.get(k);
  const s = D.steps[k], N = s.nodes, n = N.length;
  const mod = N.map((r) => S[r[2]]), users = N.map(() => []), chainsOf = N.map(() => []);
  N.forEach((r, i) => r[3].forEach((a) => users[a].push(i)));
  s.chains.forEach((c, ci) => c[3].forEach((i) => chainsOf[i].push(ci)));
  const drawn = N.map((r) => !has(r[5], "param") && !has(r[5], "shared") && !has(r[5], "hidden"));
  const own = new Map(), kids = new Map(), under = new Map();
  const add = (map, key, v) => { if (!map.has(key)) map.set(key, []); map.get(key).push(v); };
  for (let i = 0; i < n; i++) {
    if (!drawn[i]) continue;
    add(own, mod[i], i);
    add(under, "", i);
    let p = "";
    for (const part of mod[i] ? mod[i].split(".") : []) {
      const c = p ? p + "." + part : part;
      if (!kids.has(p)) kids.set(p, new Set());
      kids.get(p).add(c);
      add(under, c, i);
      p = c;
    }
  }
  const rep = new Map();  // block path -> its class: label, count, the block shown for all
  for (const [parent, classes] of Object.entries(s.repeats))
    for (const [label, ids] of classes) {
      const info = {label: leaf(parent) + "." + label, count: ids.length, rep: parent + "." + ids[0], parent};
      ids.forEach((i) => rep.set(parent + "." + i, info));
    }
  const m = {s, N, n, mod, users, chainsOf, drawn, own, kids, under, rep, k};
  cache.set(k, m);
  return m;
}

function items(m, G) {  // {items, of}: the members of G, and node -> the member that holds it
  const out = [], of = new Map(), reps = new Map();
  const take = (item, nodes) => {
    item.id = out.length; item.order = least(nodes); out.push(item);
    nodes.forEach((i) => of.set(i, item.id));
  };
  (function collect(P) {
    for (const i of m.own.get(P) || []) take({kind: "node", i}, [i]);
    for (const C of m.kids.get(P) || []) {
      const nodes = m.under.get(C) || [], r = m.rep.get(C);
      if (r && reps.has(r)) {  // another block of a class already shown: the same box
        const it = out[reps.get(r)];
        nodes.forEach((i) => of.set(i, it.id));
        it.order = Math.min(it.order, least(nodes));
      } else if (r) {
        take({kind: "repeat", path: r.rep, info: r, size: (m.under.get(r.rep) || []).length}, nodes);
        reps.set(r, out.length - 1);
      } else if (!(m.own.get(C) || []).length || (nodes.length <= INLINE_MAX && !hasRepeat(m, C))) {
        collect(C);  // see-through or small: its members join G's
      } else {
        take({kind: "group", path: C, size: nodes.length}, nodes);
      }
    }
  })(G);
  out.sort((a, b) => a.order - b.order);
  const remap = new Map(out.map((it, k) => [it.id, k]));
  out.forEach((it, k) => { it.id = k; });
  for (const [i, id] of of) of.set(i, remap.get(id));
  return {items: out, of};
}
const least = (xs) => xs.reduce((a, b) => (b < a ? b : a), Infinity);  // no Math.min(...xs): big groups overflow it
const hasRepeat = (m, C) => [...m.rep.keys()].some((b) => b.startsWith(C + "."));

function graph(m, G) {  // G's items plus a stub per outside module it reads or feeds, and the edges
  const {items: it, of} = items(m, G), edges = new Set(), stubs = new Map();
  const stub = (key, label, order) => {
    if (!stubs.has(key)) { stubs.set(key, it.length); it.push({kind: "stub", label, order, id: it.length}); }
    return stubs.get(key);
  };
  const where = (i) => near(G, m.mod[i]);
  for (const [i, v] of of) {
    for (const a of m.N[i][3]) {
      if (!m.drawn[a]) continue;
      const u = of.has(a) ? of.get(a) : stub("in " + where(a), `from ${where(a)} (${short(S[m.N[a][1]])})`, a);
      if (u !== v) edges.add(u + "," + v);
    }
    for (const u of m.users[i])
      if (m.drawn[u] && !of.has(u)) edges.add(v + "," + stub("out " + where(u), `to ${where(u)}`, u));
  }
  return {items: it, of, edges: [...edges].map((e) => e.split(",").map(Number))};
}

const parentOf = (p) => p.slice(0, Math.max(0, p.lastIndexOf(".")));
function blockOf(m, path) {  // the repeat class of the block `path` lies in, or null
  for (let p = path; p; p = parentOf(p)) if (m.rep.has(p)) return m.rep.get(p);
  return null;
}
function blockPath(path, info) {  // model.layers.3.mlp -> model.layers.3, for a block of `info`'s parent
  let p = path;
  while (p && parentOf(p) !== info.parent) p = parentOf(p);
  return p;
}
function near(G, p) {  // p without the path it shares with G: input_layernorm, seen from self_attn
  const a = G.split("."), b = p.split(".");
  let k = 0;
  while (k < a.length && k < b.length - 1 && a[k] === b[k]) k++;
  if (k > 0 && /^\d+$/.test(b[k])) k--;  // layers.1.input_layernorm, not 1.input_layernorm
  return b.slice(k).join(".") || "(root)";
}
const relative = (G, p) => (G && p.startsWith(G + ".") ? p.slice(G.length + 1) : p) || "(root)";
"""
