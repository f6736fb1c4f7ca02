"""The HTML dump's stylesheet: colours for op kinds, chain classes and what a step did.

One idea: every colour the legend shows is one CSS class here (`chain-norm`, `created`, ...), so the
page, its legend and the browser tests agree by class name.
"""

STYLE = """
:root{--norm:#0e9f8e;--vo:#8e44ad;--mlp:#e67e22;--stream:#2c6fbb;--created:#1e9e3a;--erased:#d62828;
--edited:#d98e04;--blocked:#c0392b;--fxq:#ffe08a;--bg:#fafafa}
*{box-sizing:border-box}body{margin:0;font:13px/1.35 system-ui,sans-serif;color:#222;background:var(--bg);display:flex;height:100vh}
aside{width:330px;min-width:330px;overflow:auto;border-right:1px solid #ccc;padding:8px 10px;background:#fff}
main{flex:1;overflow:auto;padding:8px 14px}
h1{font-size:15px;margin:2px 0 6px}h2{font-size:13px;margin:10px 0 4px}
#search{width:100%;padding:4px 6px;font:inherit}
#results{max-height:220px;overflow:auto;font-size:12px}#results div{cursor:pointer;padding:1px 2px;white-space:nowrap}
#results div:hover,#steps li:hover{background:#eef}
#steps{list-style:none;padding:0;margin:0}#steps li{cursor:pointer;padding:2px 4px;border-radius:3px;display:flex;justify-content:space-between;gap:6px;white-space:nowrap}
#steps li.on{background:#dde6ff;font-weight:600}.counts{font-size:11px;color:#555;font-weight:400}
.counts .c{color:var(--created)}.counts .e{color:var(--erased)}.counts .m{color:var(--edited)}.counts .b{color:var(--blocked)}
#legend div{display:flex;align-items:center;gap:6px;margin:2px 0;font-size:12px}
.sw{display:inline-block;width:22px;height:12px;border-radius:2px;border:1px solid #999}
#bar{display:flex;gap:10px;align-items:center;flex-wrap:wrap}#bar h2{margin:0;font-size:15px}
button{font:inherit;padding:2px 8px;cursor:pointer}button.on{background:#dde6ff}
.panel{background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px 8px;margin:6px 0;font-size:12px}
.panel summary{cursor:pointer;font-weight:600}.panel li{white-space:nowrap}
.cols{display:flex;gap:18px;flex-wrap:wrap;max-height:190px;overflow:auto}.cols>div{min-width:220px}
.group{border:1px solid #c8cdd8;border-radius:5px;margin:8px 0;background:#fff}
.group>.ghead{padding:3px 8px;background:#eef1f7;border-bottom:1px solid #c8cdd8;display:flex;gap:10px;align-items:center}
.ghead b{font-size:13px}.ghead .x{margin-left:auto;cursor:pointer;color:#666}.ghead .note{color:#666;font-size:12px}
.gbody{display:flex;align-items:flex-start;gap:10px;flex-wrap:wrap;padding:4px}.children{display:flex;flex-direction:column;gap:8px;flex:1;min-width:0}
.children>.group{margin:0}svg{display:block;flex:none}
.node rect.box{stroke:#777;stroke-width:1;rx:4}.node{cursor:pointer}.node text{font-size:11px;pointer-events:none}
.node text.sub{fill:#555;font-size:10px}.node text.tag{fill:var(--created);font-size:10px;font-weight:600}
.kind-op rect.box{fill:#f2f2f2}.kind-view rect.box{fill:#fbfbfb;stroke:#bbb}.kind-linear rect.box{fill:#d6e6fb}
.kind-attn rect.box{fill:#e9dcf5}.kind-fxq rect.box{fill:var(--fxq)}.kind-io rect.box{fill:#e4f3e4}
.kind-group rect.box{fill:#eef1f7;stroke:#5a6b8c;stroke-width:1.5}.kind-repeat rect.box{fill:#e3e9f7;stroke:#2c3e66;stroke-width:2}
.kind-stub rect.box{fill:#fff;stroke:#aaa;stroke-dasharray:3 2}.kind-stub text{fill:#666}
.open rect.box{stroke:#1f4fbf;stroke-width:2.5;fill:#d5e1ff}
.stripe.chain-norm{fill:var(--norm)}.stripe.chain-vo{fill:var(--vo)}.stripe.chain-mlp{fill:var(--mlp)}.stripe.chain-stream{fill:var(--stream)}
.inserted rect.box{stroke:var(--created);stroke-width:1.5}.created rect.box{stroke:var(--created);stroke-width:3}
.erased rect.box{stroke:var(--erased);stroke-width:3;stroke-dasharray:5 3}.erased text{text-decoration:line-through}
.mark{font-size:12px;font-weight:700}.mark.edited{fill:var(--edited)}.mark.blocked{fill:var(--blocked)}
.chip{font-size:9px;fill:#666}.peer rect.box{stroke:#000;stroke-width:3}.flash rect.box{stroke:#ff00aa;stroke-width:4}
.edge{fill:none;stroke:#8a94a6;stroke-width:1.2}.edge.back{stroke-dasharray:4 3}
#detail{position:fixed;right:10px;bottom:10px;max-width:460px;max-height:45vh;overflow:auto;background:#fff;
border:1px solid #999;border-radius:4px;padding:6px 10px;font-size:12px;box-shadow:0 2px 8px #0003;display:none}
#detail .close{float:right;cursor:pointer}#timing{color:#888;font-size:11px;margin-top:10px}
code{font-size:11px}
"""
