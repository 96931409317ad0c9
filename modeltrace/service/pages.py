"""The service's web pages: server-rendered, self-contained HTML (inline CSS, inline SVG plots, one inline script
allowed by a per-response nonce; nothing is fetched from another origin).

Data flow: app.py reads results (history.py `Revision`s, the stored report JSON) and calls `home` or `model_page`;
every value that comes from a model card, a repository or a report goes through `_e` (html.escape), and the polling
script inserts new rows with `textContent`, never as HTML. The home page's script asks `/api/results?after=ID` every
few seconds, so a new upload appears without a reload.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any
from urllib.parse import quote

from modeltrace.service.history import Revision, lineage

__all__ = ["home", "model_page", "not_found"]

CSS = """
:root{--ink:#1d2329;--muted:#5b6670;--line:#dde2e7;--bg:#f6f8fa}*{box-sizing:border-box}
body{margin:0;color:var(--ink);font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif}
header{background:#1d2329;color:#fff;padding:10px 24px}header a{color:#fff;text-decoration:none;font-weight:600}
header form{display:inline;margin-left:24px}input,select,button{font:inherit;padding:3px 8px}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}h1{font-size:24px}h2{font-size:19px;margin:26px 0 8px;
border-bottom:1px solid var(--line)}table{border-collapse:collapse;width:100%;font-size:14px;margin:6px 0 12px}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}th{background:var(--bg)}
.rel{display:inline-block;border-radius:4px;padding:0 7px;font-size:12px;font-weight:600;color:#fff;background:#6b7a8f}
.rel.independent{background:#2a9d6f}.rel.copy,.rel.recast{background:#8e1020}.rel.merge,.rel.finetune,.rel.stack,
.rel.partial,.rel.related{background:#c62839}.alert{color:#8e1020;font-weight:600}
.verdict{border-radius:10px;padding:16px 20px;margin:16px 0;border-left:10px solid #6b7a8f;background:var(--bg)}
.verdict.bad{background:#fdecee;border-color:#c62839}.verdict.ok{background:#e8f6ee;border-color:#2a9d6f}
.verdict p.plain{font-size:18px;margin:4px 0}.muted{color:var(--muted);font-size:13px}code{font-size:12.5px}
.sev{border-radius:4px;padding:0 6px;font-size:12px;font-weight:600;color:#fff;background:#6b7a8f}
.sev.critical{background:#8e1020}.sev.high{background:#c62839}.sev.medium{background:#e08a1e}
svg{display:block;margin:8px 0 16px;max-width:100%}
"""

POLL_JS = """
(() => {
  const body = document.getElementById('results');
  let last = Number(body.dataset.last || 0);
  const q = body.dataset.q || '';
  function cell(tr, text, cls) { const td = document.createElement('td'); td.textContent = text;
    if (cls) td.className = cls; tr.appendChild(td); return td; }
  function add(r) {
    const tr = document.createElement('tr'); tr.dataset.id = r.id;
    const a = document.createElement('a'); a.href = '/models/' + r.repo.split('/').map(encodeURIComponent).join('/');
    a.textContent = r.repo; const td = document.createElement('td'); td.appendChild(a); tr.appendChild(td);
    cell(tr, r.revision.slice(0, 12)).className = 'mono';
    const rel = document.createElement('span'); rel.className = 'rel ' + r.relation; rel.textContent = r.relation;
    const td2 = document.createElement('td'); td2.appendChild(rel); tr.appendChild(td2);
    cell(tr, r.summary); cell(tr, r.contradicted ? 'card contradicted' : '', r.contradicted ? 'alert' : '');
    cell(tr, new Date(r.created_at * 1000).toISOString().slice(0, 19).replace('T', ' '));
    body.insertBefore(tr, body.firstChild);
  }
  async function poll() {
    try {
      const res = await fetch('/api/results?after=' + last + '&q=' + encodeURIComponent(q));
      if (res.ok) { const rows = await res.json();
        for (const r of rows.sort((x, y) => x.id - y.id)) { add(r); last = Math.max(last, r.id); }
        body.dataset.last = last; const empty = document.getElementById('empty'); if (rows.length && empty)
        empty.remove(); }
    } catch (e) { /* the service restarting: try again at the next tick */ }
    setTimeout(poll, 2000);
  }
  setTimeout(poll, 2000);
})();
"""


def _e(x: object) -> str:
    return escape("" if x is None else str(x), quote=True)


def _when(ts: float | None) -> str:
    return "" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def model_href(repo_id: str) -> str:
    return "/models/" + "/".join(quote(p, safe="") for p in repo_id.split("/"))


def _page(title: str, body: str, nonce: str, script: str = "", q: str = "") -> str:
    js = f'<script nonce="{_e(nonce)}">{script}</script>' if script else ""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            'content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><header><a href=\"/\">modeltrace</a> "
            '<span class="muted">provenance of every upload</span><form action="/" method="get">'
            f'<input name="q" value="{_e(q)}" placeholder="search repositories" aria-label="search" maxlength="200">'
            f' <button>Search</button></form></header><main>{body}</main>{js}</body></html>')


def _rel(relation: str) -> str:
    return f'<span class="rel {_e(relation)}">{_e(relation)}</span>'


def home(rows: list[dict[str, Any]], counts: dict[str, int], failed: list[dict[str, Any]], q: str, nonce: str
         ) -> str:
    """Recent uploads with their verdicts (newest first), the queue, recent failures; polls for new results."""
    trs = "".join(
        f'<tr data-id="{int(r["id"])}"><td><a href="{_e(model_href(r["repo"]))}">{_e(r["repo"])}</a></td>'
        f'<td class="mono">{_e(r["revision"][:12])}</td><td>{_rel(r["relation"])}</td><td>{_e(r["summary"])}</td>'
        f'<td class="{"alert" if r["contradicted"] else ""}">{"card contradicted" if r["contradicted"] else ""}'
        f'</td><td>{_e(_when(r["created_at"]))}</td></tr>' for r in rows)
    last = max((int(r["id"]) for r in rows), default=0)
    empty = "" if rows else '<p id="empty" class="muted">No results yet.</p>'
    what = f'matching “{_e(q)}”' if q else "recent uploads"
    body = [f"<h1>Model provenance: {what}</h1>",
            f'<p class="muted">Queue: {counts.get("queued", 0)} waiting, {counts.get("running", 0)} running, '
            f'{counts.get("done", 0)} done, {counts.get("failed", 0)} failed. New results appear here by '
            "themselves.</p>",
            '<table><thead><tr><th>repository</th><th>revision</th><th>verdict</th><th>summary</th><th>card</th>'
            f'<th>checked (UTC)</th></tr></thead><tbody id="results" data-last="{last}" data-q="{_e(q)}">{trs}'
            f"</tbody></table>{empty}"]
    if failed:
        body.append("<h2>Recent failures</h2><table><thead><tr><th>repository</th><th>revision</th><th>attempts"
                    "</th><th>reason</th></tr></thead><tbody>" + "".join(
                        f'<tr><td>{_e(f["repo"])}</td><td>{_e(f["revision"][:12])}</td><td>{int(f["attempts"])}'
                        f'</td><td>{_e(f["error"])}</td></tr>' for f in failed) + "</tbody></table>")
    return _page("modeltrace: " + what, "".join(body), nonce, POLL_JS, q)


def not_found(what: str, nonce: str) -> str:
    return _page("modeltrace: not found", f"<h1>Not found</h1><p>{_e(what)}</p>", nonce)


def _plain(rev: Revision) -> tuple[str, str, str]:
    """(headline, sentence in plain words, tone) from the stored report."""
    from modeltrace.report.model import Subject
    from modeltrace.report.plain import headline

    subjects = rev.report.get("subjects") or []
    if not subjects:
        return rev.relation, rev.summary, "info"
    s = Subject.model_validate(subjects[0])
    title, sentence, tone = headline(s)
    if s.audit is None:  # no ancestor found: identify's words, not inspect's description
        title, sentence, tone = "No relation found", rev.summary, "ok"
    return title, sentence, tone


def _plots(rev: Revision) -> str:
    from modeltrace.report.formats import svg
    from modeltrace.report.model import AuditDetail

    subjects = rev.report.get("subjects") or []
    raw = subjects[0].get("detail") if subjects else None
    if not raw:
        return ""
    d = AuditDetail.model_validate(raw)
    out = []
    if d.weights:
        out.append(svg.weights_plot([(w.model, [(p.layer, p.weight, p.interval[0], p.interval[1]) for p in w.points])
                                     for w in d.weights], "Merge weight per layer (95% interval)"))
    for g in d.similarity[:2]:
        out.append(svg.heatmap(f"Similarity to {g.candidate} by layer and tensor role", g.layers, g.roles, g.values))
    return "<h2>What the weights show</h2>" + "".join(out) if out else ""


def _evidence(rev: Revision) -> str:
    hits = rev.identify.get("hits") or []
    if not hits:
        return f'<h2>Evidence</h2><p>{_e(rev.identify.get("summary") or "nothing indexed to compare with")}</p>'
    rows = "".join(f'<tr><td>{_e(h.get("model"))}</td><td>{_e(h.get("role"))}</td><td>{_e(h.get("p"))}</td>'
                   f'<td>{_e(h.get("similarity"))}</td><td>{_e(h.get("note"))}</td></tr>' for h in hits)
    audit = ((rev.report.get("subjects") or [{}])[0].get("audit") or {})
    pv = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v.get('text'))}</td></tr>"
                 for k, v in (audit.get("p_values") or {}).items())
    return ("<h2>Evidence</h2><p class=muted>Ranking of the indexed models (p-values Holm-adjusted over the index):"
            "</p><table><thead><tr><th>model</th><th>role</th><th>p (independent)</th><th>similarity</th>"
            f"<th>note</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<p class=muted>Confirming audit on the weights ({_e(audit.get('summary'))}):</p><table><thead><tr>"
               f"<th>candidate</th><th>independence test</th></tr></thead><tbody>{pv}</tbody></table>" if pv else ""))


def _card(rev: Revision) -> str:
    subjects = rev.report.get("subjects") or [{}]
    card = subjects[0].get("card") or {}
    findings = rev.report.get("findings") or []
    out = ["<h2>Model card against the weights</h2>"]
    if not card.get("present"):
        out.append("<p>The repository has no model card.</p>")
    else:
        out.append(f"<table><tbody><tr><th>licence</th><td>{_e(card.get('license') or '–')}</td></tr>"
                   f"<tr><th>base_model</th><td>{_e(', '.join(card.get('base_model') or []) or '–')}</td></tr>"
                   f"<tr><th>base_model_relation</th><td>{_e(card.get('base_model_relation') or '–')}</td></tr>"
                   "</tbody></table>")
    if findings:
        out.append("<table class=findings><thead><tr><th>severity</th><th>finding</th><th>detail</th></tr></thead>"
                   "<tbody>" + "".join(
                       f'<tr><td><span class="sev {_e(f.get("severity"))}">{_e(f.get("severity"))}</span></td>'
                       f'<td>{_e(f.get("title"))}<br><code>{_e(f.get("code"))}</code></td><td>{_e(f.get("detail"))}'
                       "</td></tr>" for f in findings) + "</tbody></table>")
    else:
        out.append("<p>Nothing in the card contradicts the weights.</p>")
    return "".join(out)


def _downloads(rev: Revision) -> str:
    links = [("JSON", "json"), ("HTML", "html"), ("CycloneDX", "cdx.json"), ("SPDX", "spdx.json"),
             ("Markdown", "md")]
    return ("<p>Report of this revision: " + " · ".join(
        f'<a href="/api/results/{rev.result_id}/report.{ext}" download>{name}</a>' for name, ext in links) + "</p>")


def _diff_form(history: list[Revision], diff: dict[str, Any] | None) -> str:
    if len(history) < 2:
        return ""
    opts = "".join(f'<option value="{r.number}">{r.number} ({_e(r.short)})</option>' for r in history)
    out = ['<h2>What changed between two revisions</h2><form method="get">'
           f'<select name="a" aria-label="from">{opts}</select> → <select name="b" aria-label="to">{opts}</select> '
           "<button>Compare</button></form>"]
    if diff is not None:
        out.append(f'<p><b>Revision {int(diff["a"]["revision"])} → {int(diff["b"]["revision"])}:</b></p><ul>'
                   + "".join(f"<li>{_e(s)}</li>" for s in diff["sentences"]) + "</ul>")
    return "".join(out)


def model_page(repo_id: str, history: list[Revision], jobs: list[dict[str, Any]], diff: dict[str, Any] | None,
               nonce: str) -> str:
    """One repository: the latest verdict in plain words, its evidence, plots, card findings, report downloads, and
    every checked revision with what it is."""
    body = [f"<h1>{_e(repo_id)}</h1>"]
    pending = [j for j in jobs if j["state"] in ("queued", "running", "failed")]
    if pending:
        body.append('<p class="muted">' + "; ".join(
            f'revision {_e(j["revision"][:12])}: {_e(j["state"])}'
            + (f' ({_e(j["error"])})' if j.get("error") else "") for j in pending) + "</p>")
    if history:
        rev = history[-1]
        title, sentence, tone = _plain(rev)
        cls = "ok" if tone == "ok" else "bad" if tone in ("bad", "warn") else ""
        body.append(f'<div class="verdict {cls}"><div class="muted">latest: revision {rev.number} · '
                    f"{_e(rev.short)} · {_rel(rev.relation)}</div><h2>{_e(title)}</h2>"
                    f'<p class="plain">{_e(sentence)}</p><p class="muted">{_e(lineage(history, rev))}.</p></div>')
        body.append(_downloads(rev))
        body.append(_card(rev))
        body.append(_evidence(rev))
        body.append(_plots(rev))
        body.append("<h2>History</h2><table><thead><tr><th>#</th><th>commit</th><th>verdict</th><th>what it is</th>"
                    "<th>checked (UTC)</th><th>report</th></tr></thead><tbody>" + "".join(
                        f"<tr><td>{r.number}</td><td><code>{_e(r.short)}</code></td><td>{_rel(r.relation)}</td>"
                        f"<td>{_e(lineage(history, r))}</td><td>{_e(_when(r.created_at))}</td>"
                        f'<td><a href="/api/results/{r.result_id}/report.html">HTML</a></td></tr>'
                        for r in reversed(history)) + "</tbody></table>")
        body.append(_diff_form(history, diff))
    elif not pending:
        body.append("<p>No revision of this repository has been checked yet.</p>")
    return _page(f"modeltrace: {repo_id}", "".join(body), nonce)
