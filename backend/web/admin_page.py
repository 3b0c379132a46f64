"""The admin page (``GET /admin``): every project's references as thumbnails, their sources and
history with a restore button, the store's integrity report, and the field statistics.

Server-rendered HTML, no assets of its own: thumbnails come from ``/admin/versions/<id>/thumb.jpg``
and the restore button posts to ``/admin/versions/<id>/restore`` with the ``X-SmartSAM-Admin``
header, which a page of another site cannot add (see ``backend.web.admin_api.check_admin``). Everything shown is
escaped: labels, texts and sources come from annotations.
"""

from __future__ import annotations

import datetime
import html
import json
from typing import Dict, List, Optional

from backend.store.references import ReferenceStore, StoredReference

_STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}h2{font-size:17px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px}.ok{color:#176317}.bad{color:#a11}.muted{color:#777}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:260px}
.card img{max-width:256px;max-height:256px;display:block}.text{font-size:16px;padding:24px 8px;background:#f4f4f8}
table{border-collapse:collapse;margin-top:6px}td,th{border-bottom:1px solid #e4e4e4;padding:4px 8px;text-align:left;
vertical-align:middle}td img{max-height:48px}tr.current{background:#eef8ee}tr.withdrawn{color:#999}
button{cursor:pointer}
"""

_SCRIPT = """
async function restore(id, btn) {
  btn.disabled = true;
  const r = await fetch('/admin/versions/' + id + '/restore', {method: 'POST', headers: {'X-SmartSAM-Admin': '1'}});
  const s = document.getElementById('status');
  if (r.ok) { s.textContent = 'restored version ' + id; location.reload(); }
  else { s.textContent = 'restore failed: ' + (await r.text()); btn.disabled = false; }
}
"""


def _when(t: Optional[float]) -> str:
    return "" if t is None else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _source(v: StoredReference) -> str:
    s = v.source or {}
    bits = []
    for k in ("task", "annotation", "user", "event", "admin", "restored", "prep"):
        if s.get(k) not in (None, "", False):
            bits.append(f"{k} {s[k]}")
    return ", ".join(bits) or json.dumps(s)[:120]


def _visual(v: StoredReference, small: bool = False) -> str:
    e = html.escape
    if v.kind == "text":
        return f'<div class="text">&ldquo;{e(v.text or "")}&rdquo;</div>' if not small else f"&ldquo;{e(v.text or '')}&rdquo;"
    if v.thumb_file:
        return f'<img src="/admin/versions/{v.id}/thumb.jpg" alt="{e(v.label)} version {v.id}">'
    if v.kind == "none":
        return '<span class="muted">(cleared)</span>'
    if v.mask_file:
        return f'<img src="/admin/versions/{v.id}/mask.png" alt="mask of version {v.id}">'
    return '<span class="muted">(no picture)</span>'


def _stats(summary: Dict) -> str:
    from backend.store.field_stats import table

    e = html.escape
    rows = summary.get("objects") or []
    if not rows:
        return ("<h2 id='stats'>Field statistics</h2><p class='muted'>No annotation matched to a suggestion yet: the "
                "statistics fill as annotators submit masks the backend suggested.</p>")
    head, _, *body = table(summary).splitlines()
    cells = lambda line, tag: "".join(f"<{tag}>{e(c.strip())}</{tag}>" for c in line.strip("|").split("|"))  # noqa: E731
    return ("<h2 id='stats'>Field statistics</h2><p class='muted'>Per label and arm (smartsam, plain: "
            "SMARTSAM_COMPARE, prelabel): objects submitted, accepted unchanged, IoU between suggestion and final "
            "mask, clicks and seconds per object. JSON: /admin/stats.</p>"
            "<img src='/admin/stats.png' alt='field statistics plot'><table id='stats-table'><tr>" + cells(head, "th") +
            "</tr>" + "".join(f"<tr>{cells(b, 'td')}</tr>" for b in body) + "</table>")


def _instances(report: List[Dict]) -> str:
    """The "all like this one" thresholds: decisions, threshold in force, precision / recall."""
    e = html.escape
    if not report:
        return ""
    rows = []
    for r in report:
        curve = ", ".join(f"{c['threshold']:.2f}: P {c['precision']:.2f} R {c['recall']:.2f}" for c in r["curve"][-6:])
        rows.append(f"<tr><td>{e(r['project'])}</td><td>{e(r['label'])}</td><td>{r['decisions']}</td><td>{r['kept']}</td>"
                    f"<td>{r['threshold']:.3f}</td><td>{e(r['how'])}</td><td class='muted'>{e(curve) or '-'}</td></tr>")
    return ("<h2 id='instances'>All like this one: thresholds</h2><p class='muted'>Pre-labeled instances the "
            "annotators kept or deleted, the threshold in force (learned at SMARTSAM_INSTANCE_PRECISION once 30 are "
            "decided) and the precision / recall at the highest thresholds. JSON: /admin/stats.</p>"
            "<table id='instances-table'><tr><th>project</th><th>label</th><th>decided</th><th>kept</th><th>threshold</th>"
            "<th>from</th><th>precision / recall</th></tr>" + "".join(rows) + "</table>")


def _troubled(troubled: Dict) -> str:
    """The notices and tasks that failed at least once: waiting for their next try, or given up."""
    e = html.escape
    rows = []
    for kind, items in (("webhook", troubled.get("events", [])), ("task", troubled.get("tasks", []))):
        for t in items:
            what = (f"{t['action']} annotation {t['annotation']}" if kind == "webhook" else
                    f"project {t['project']} task {t['task']}" + (" (predicted, not written)" if t.get("predicted") else ""))
            state = "given up" if t["given_up"] else f"next try {_when(t['next_try'])}" if t.get("next_try") else "waiting"
            rows.append(f"<tr class='{'withdrawn' if t['given_up'] else ''}'><td>{e(kind)}</td><td>{e(what)}</td>"
                        f"<td>{t['attempts']}</td><td>{e(state)}</td><td>{e(t.get('last_error') or '')}</td></tr>")
    if not rows:
        return "<p class='ok' id='troubled'>Background work: nothing has failed.</p>"
    return ("<h2>Background work that failed</h2><p class='muted'>Tried again with backoff until SMARTSAM_RETRY_FOR, then "
            "given up and kept here (POST /admin/jobs/retry puts them back). JSON: /admin/jobs.</p>"
            "<table id='troubled'><tr><th>kind</th><th>what</th><th>attempts</th><th>state</th><th>last error</th></tr>"
            + "".join(rows) + "</table>")


def render(store: ReferenceStore, jobs: Dict, label_studio_url: Optional[str] = None,
           stats: Optional[Dict] = None, instances: Optional[List[Dict]] = None,
           troubled: Optional[Dict] = None) -> str:
    e = html.escape
    problems = store.check()
    out: List[str] = [f"<!doctype html><html><head><meta charset='utf-8'><title>SmartSAM references</title>"
                      f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
                      "<h1>SmartSAM references</h1>",
                      f"<p>Exemplars per label: {store.exemplars}. <span id='status' class='muted'></span></p>"]
    if problems:
        out.append("<p class='bad'>Integrity: " + str(len(problems)) + " problem(s)</p><ul>" +
                   "".join(f"<li class='bad'>{e(p)}</li>" for p in problems) + "</ul>")
    else:
        out.append("<p class='ok' id='integrity'>Integrity: no problems (database and every current file checked)</p>")
    ev = jobs.get("events") or {}
    if ev:
        out.append(f"<p class='muted'>Webhook events: {ev.get('applied', 0)} applied, {ev.get('rejected', 0)} rejected "
                   f"(not confirmed by Label Studio), {ev.get('retried', 0)} tries failed and were tried again, "
                   f"{ev.get('given_up', 0)} given up.</p>")
    if troubled is not None:
        out.append(_troubled(troubled))
    projects = store.projects()
    if not projects:
        out.append("<p class='muted'>No references yet: the first mask an annotator submits for a label becomes its "
                   "reference, or set one with PUT /admin/references/&lt;project&gt;/&lt;label&gt;.</p>")
    for project in projects:
        link = (f" <a href='{e(label_studio_url.rstrip('/'))}/projects/{e(project)}/data'>open in Label Studio</a>"
                if label_studio_url else "")
        out.append(f"<h2 id='project-{e(project)}'>Project {e(project)}{link}</h2>")
        for label in store.labels(project):
            current = store.current(project, label)
            live = {m.id for m in current}
            out.append(f"<h3>{e(label)}</h3>")
            if current:
                out.append("<div class='cards'>")
                for m in current:
                    out.append(f"<div class='card' data-version='{m.id}'>{_visual(m)}<div>{e(m.kind)} reference, "
                               f"version {m.id} ({e(m.how)})</div><div class='muted'>{e(_source(m))}</div>"
                               f"<div class='muted'>{_when(m.created_at)}</div></div>")
                out.append("</div>")
            else:
                out.append("<p class='muted'>No reference: clicks answer in pure-IS mode.</p>")
            out.append("<table><tr><th>version</th><th></th><th>set</th><th>how</th><th>kind</th><th>source</th>"
                       "<th>state</th><th></th></tr>")
            for v in store.history(project, label):
                if v.id in live:
                    state, cls = "current", "current"
                elif v.withdrawn_at is not None:
                    state, cls = f"withdrawn: {v.withdrawn_reason or ''}", "withdrawn"
                else:
                    state, cls = "superseded", ""
                button = ("" if v.id in live else
                          f"<button onclick='restore({v.id}, this)' data-restore='{v.id}'>Restore</button>")
                out.append(f"<tr class='{cls}' data-version='{v.id}'><td>{v.id}</td><td>{_visual(v, small=True)}</td>"
                           f"<td>{_when(v.created_at)}</td><td>{e(v.how)}</td><td>{e(v.kind)}</td>"
                           f"<td>{e(_source(v))}</td><td>{e(state)}</td><td>{button}</td></tr>")
            out.append("</table>")
    if stats is not None:
        out.append(_stats(stats))
    if instances:
        out.append(_instances(instances))
    out.append("</body></html>")
    return "\n".join(out)
