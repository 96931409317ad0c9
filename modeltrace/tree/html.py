# ruff: noqa: E501 - the inline script and style below are page text, not Python
"""The tree as one self-contained interactive HTML page: an SVG graph (wheel or buttons to zoom, drag to pan), a search
box that finds models by name, and a details panel for the clicked model (summary, recipe, every edge with its
evidence). No network: the data is embedded as JSON and the script is inline.

Data flow: `Tree` + its JSON document -> positions (families side by side, each laid out in rows by depth) -> page.
"""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["to_html"]

DX, DY, PAD = 170, 90, 60
MAX_ROW_WIDTH = 4200


def _layout(doc: dict[str, Any]) -> dict[str, tuple[float, float]]:
    fams: dict[int, list[dict]] = {}
    for n in doc["nodes"]:
        fams.setdefault(n["family"], []).append(n)
    parents: dict[str, list[str]] = {}
    for e in doc["edges"]:
        parents.setdefault(e["child"], []).append(e["parent"])
    pos: dict[str, tuple[float, float]] = {}
    x0 = y0 = row_h = 0.0
    for _, members in sorted(fams.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        levels: dict[int, list[dict]] = {}
        for n in members:
            levels.setdefault(int(n.get("depth", 0)), []).append(n)
        order: dict[str, float] = {}
        for d in sorted(levels):
            row = levels[d]
            row.sort(key=lambda n: (sum(order.get(p, 0) for p in parents.get(n["name"], [])) /
                                    max(1, len(parents.get(n["name"], []))), n["name"]))
            for i, n in enumerate(row):
                order[n["name"]] = i
        width = max(len(r) for r in levels.values()) * DX
        height = (max(levels) + 1) * DY
        if x0 and x0 + width > MAX_ROW_WIDTH:
            x0, y0, row_h = 0.0, y0 + row_h + PAD, 0.0
        for d, row in levels.items():
            off = (width - len(row) * DX) / 2
            for i, n in enumerate(row):
                pos[n["name"]] = (x0 + off + i * DX + DX / 2, y0 + d * DY + DY / 2)
        x0 += width + PAD
        row_h = max(row_h, height)
    return pos


_CSS = """
body{margin:0;font:13px/1.4 system-ui,sans-serif;color:#222;display:flex;height:100vh}
#main{flex:1;position:relative;overflow:hidden;background:#fafafa}
#side{width:380px;overflow:auto;border-left:1px solid #ddd;padding:12px;background:#fff}
#bar{position:absolute;top:8px;left:8px;z-index:2;display:flex;gap:6px}
#bar input{width:220px;padding:4px} #bar button{padding:4px 8px}
svg{width:100%;height:100%;cursor:grab}
.node circle{stroke:#333;stroke-width:1}
.node text{font-size:11px;pointer-events:none}
.node.hit circle{stroke:#d00;stroke-width:4}
.node.sel circle{stroke:#06c;stroke-width:4}
.edge{fill:none;stroke:#888;stroke-width:1.2}
.edge.merge{stroke:#c60;stroke-width:2}.edge.stack{stroke:#639;stroke-dasharray:2 3}
.edge.copy,.edge.recast,.edge.quantized{stroke:#999;stroke-dasharray:6 4}
.edge.undir{stroke:#bbb;stroke-dasharray:1 3}
table{border-collapse:collapse;width:100%} td{border-top:1px solid #eee;padding:3px;vertical-align:top}
h2{font-size:15px;margin:4px 0} .muted{color:#777}
"""

_ROLE_COLOUR = {"root": "#4caf50", "independent": "#9e9e9e", "finetune": "#64b5f6", "merge": "#ffb74d",
                "stack": "#ba68c8", "copy": "#e0e0e0"}

_JS = """
const D=JSON.parse(document.getElementById('data').textContent);
const svg=document.getElementById('g'), NS='http://www.w3.org/2000/svg';
const byName={}; D.nodes.forEach(n=>byName[n.name]=n);
let vb=D.viewBox.slice();
function setVB(){svg.setAttribute('viewBox',vb.join(' '));}
function el(t,a){const e=document.createElementNS(NS,t);for(const k in a)e.setAttribute(k,a[k]);return e;}
const gE=el('g',{}), gN=el('g',{}); svg.appendChild(gE); svg.appendChild(gN);
D.edges.forEach(e=>{const a=byName[e.parent],b=byName[e.child]; if(!a||!b)return;
  const cls='edge '+e.relation+((e.direction==='undetermined'||e.parent_or_sibling)?' undir':'');
  const p=el('path',{d:`M${a.x},${a.y+12} C${a.x},${(a.y+b.y)/2} ${b.x},${(a.y+b.y)/2} ${b.x},${b.y-12}`,class:cls,
    'marker-end':(e.direction==='undetermined'||e.parent_or_sibling)?'':'url(#arrow)'});
  const t=el('title',{}); t.textContent=`${e.parent} -> ${e.child}: ${e.relation}`+(e.weight!=null?` ${e.weight.toFixed(3)}`:'');
  p.appendChild(t); gE.appendChild(p);});
const nodeEls={};
D.nodes.forEach(n=>{const g=el('g',{class:'node',transform:`translate(${n.x},${n.y})`,'data-name':n.name});
  g.appendChild(el('circle',{r:11,fill:D.colours[n.role]||'#fff'}));
  const t=el('text',{y:26,'text-anchor':'middle'}); t.textContent=n.name; g.appendChild(t);
  g.addEventListener('click',ev=>{ev.stopPropagation();show(n.name);}); gN.appendChild(g); nodeEls[n.name]=g;});
function esc(s){return String(s==null?'':s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function show(name){const n=byName[name]; Object.values(nodeEls).forEach(g=>g.classList.remove('sel'));
  nodeEls[name].classList.add('sel');
  const ins=D.edges.filter(e=>e.child===name), outs=D.edges.filter(e=>e.parent===name);
  const row=(e,who)=>`<tr><td><a href="#" data-go="${esc(who)}">${esc(who)}</a></td><td>${esc(e.relation)}`+
    (e.weight!=null?` ${e.weight.toFixed(4)}`:'')+`<br><span class=muted>p ${esc(e.p)}; direction: ${esc(e.direction)}`+
    `<br>${esc(e.note)}</span></td></tr>`;
  let h=`<h2>${esc(name)}</h2><p><b>${esc(n.summary)}</b></p><table>`+
    `<tr><td>role</td><td>${esc(n.role)}</td></tr><tr><td>location</td><td>${esc(n.spec)}</td></tr>`+
    `<tr><td>architecture</td><td>${esc(n.architecture)} · ${esc(n.layers)} layers · ${esc(n.dtype)}</td></tr>`+
    `<tr><td>content hash</td><td class=muted>${esc(n.content_hash)}</td></tr>`+
    `<tr><td>declared base</td><td>${esc((n.declared_base_model||[]).join(', ')||'none')}</td></tr></table>`;
  if(n.recipe) h+=`<h2>recipe</h2><p>${esc(n.recipe.text)}</p>`;
  if(n.layer_map) h+=`<h2>layer map</h2><p>`+n.layer_map.map(m=>`${m.layer} ← ${esc(m.parent)}[${m.parent_layer}]`).join('<br>')+`</p>`;
  h+=`<h2>parents</h2><table>${ins.map(e=>row(e,e.parent)).join('')||'<tr><td>none in the index</td></tr>'}</table>`;
  h+=`<h2>children</h2><table>${outs.map(e=>row(e,e.child)).join('')||'<tr><td>none</td></tr>'}</table>`;
  const side=document.getElementById('side'); side.innerHTML=h;
  side.querySelectorAll('[data-go]').forEach(a=>a.addEventListener('click',ev=>{ev.preventDefault();focus(a.dataset.go);}));}
function focus(name){const n=byName[name]; if(!n)return; const w=Math.min(vb[2],1600),h=w*vb[3]/vb[2];
  vb=[n.x-w/2,n.y-h/2,w,h]; setVB(); show(name);}
document.getElementById('q').addEventListener('input',ev=>{const q=ev.target.value.trim().toLowerCase();
  let first=null; Object.entries(nodeEls).forEach(([k,g])=>{const hit=q&&k.toLowerCase().includes(q);
  g.classList.toggle('hit',!!hit); if(hit&&!first)first=k;}); document.getElementById('count').textContent=
  q?`${Object.keys(nodeEls).filter(k=>k.toLowerCase().includes(q)).length} found`:'';});
document.getElementById('q').addEventListener('keydown',ev=>{if(ev.key==='Enter'){const q=ev.target.value.trim().toLowerCase();
  const k=Object.keys(nodeEls).find(k=>k.toLowerCase().includes(q)); if(k)focus(k);}});
function zoom(f,cx,cy){cx=cx==null?vb[0]+vb[2]/2:cx; cy=cy==null?vb[1]+vb[3]/2:cy;
  vb=[cx-(cx-vb[0])*f,cy-(cy-vb[1])*f,vb[2]*f,vb[3]*f]; setVB();}
svg.addEventListener('wheel',ev=>{ev.preventDefault(); const r=svg.getBoundingClientRect();
  const cx=vb[0]+(ev.clientX-r.left)/r.width*vb[2], cy=vb[1]+(ev.clientY-r.top)/r.height*vb[3];
  zoom(ev.deltaY>0?1.2:1/1.2,cx,cy);},{passive:false});
let drag=null; svg.addEventListener('mousedown',ev=>{drag=[ev.clientX,ev.clientY,vb[0],vb[1]];});
window.addEventListener('mouseup',()=>drag=null);
window.addEventListener('mousemove',ev=>{if(!drag)return; const r=svg.getBoundingClientRect();
  vb[0]=drag[2]-(ev.clientX-drag[0])/r.width*vb[2]; vb[1]=drag[3]-(ev.clientY-drag[1])/r.height*vb[3]; setVB();});
document.getElementById('zin').onclick=()=>zoom(1/1.4); document.getElementById('zout').onclick=()=>zoom(1.4);
document.getElementById('fit').onclick=()=>{vb=D.viewBox.slice(); setVB();};
setVB(); window.tree={show,focus,zoom,viewBox:()=>vb.slice()};
"""


def to_html(tree: Any, doc: dict[str, Any]) -> str:
    pos = _layout(doc)
    nodes = [{**n, "x": pos[n["name"]][0], "y": pos[n["name"]][1]} for n in doc["nodes"]]
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    view = [min(xs) - PAD, min(ys) - PAD, max(xs) - min(xs) + 2 * PAD, max(ys) - min(ys) + 2 * PAD]
    data = {"nodes": nodes, "edges": doc["edges"], "viewBox": view, "colours": _ROLE_COLOUR}
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    stats = doc.get("stats", {})
    title = f"modeltrace family tree: {len(nodes)} models, {len(doc['edges'])} relations"
    legend = " · ".join(f'<span style="color:{c}">●</span> {r}' for r, c in _ROLE_COLOUR.items())
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><div id=main><div id=bar><input id=q placeholder='search models' "
            f"aria-label=search><button id=zin>+</button><button id=zout>−</button><button id=fit>fit</button>"
            f"<span id=count></span></div><svg id=g xmlns='http://www.w3.org/2000/svg'><defs><marker id=arrow "
            f"viewBox='0 0 10 10' refX=9 refY=5 markerWidth=6 markerHeight=6 orient=auto><path d='M0,0L10,5L0,10z' "
            f"fill='#666'/></marker></defs></svg></div><div id=side><h2>{html.escape(title)}</h2>"
            f"<p class=muted>index {html.escape(str(doc.get('index')))}; {stats.get('families', 0)} families"
            f"</p><p>{legend}</p><p>Click a model for its details; search by name (Enter centres it); wheel or "
            f"buttons zoom, drag pans.</p></div><script type='application/json' id=data>{payload}</script>"
            f"<script>{_JS}</script></body></html>\n")
