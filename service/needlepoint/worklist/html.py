"""The worklist table in HTML, with its styles and script: shared by the report file
(:func:`needlepoint.worklist.writers.write_html`) and the web page (:mod:`needlepoint.worklist.web`).

Server-rendered: every row is in the document, so the table reads without JavaScript. A small
plain script (:data:`SCRIPT`, no library) sorts by any column (the header buttons; ``aria-sort``
says the order), filters by status, reason and planned week, searches the text of a row, keeps a
live count ("Showing 12 of 100"), and points the export links at the same filter
(``?status=…&reason=…&week=…&q=…``; :func:`matches` applies it on the server). Nothing is
fetched from the network: styles and script are inline, there are no fonts or images.

Accessibility: real ``<label>`` elements for every control, sortable headers are buttons,
status is a word (never only a colour), colours meet WCAG AA contrast on white, and focus is
visible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from html import escape

from needlepoint.worklist.rows import DESCRIPTIONS, STATUSES, WorklistRow, day_words

STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;line-height:1.4;color:#111;background:#fff}
h1{font-size:1.5em}table{border-collapse:collapse;width:100%}
th,td{border:1px solid #bbb;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}th button{font:inherit;font-weight:bold;background:none;border:0;padding:0;cursor:pointer;color:#111}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
.status{display:inline-block;padding:.1em .4em;border-radius:.3em;font-weight:bold;white-space:nowrap}
.s-ready{background:#dff0d8;color:#1d4d1d}.s-needs-data{background:#fff3cd;color:#5c4400}
.s-deferred{background:#f8d7da;color:#721c24}.s-needs-clinician-review{background:#e2e3f3;color:#2b2d6e}
.s-cannot-evaluate{background:#e0e0e0;color:#222}
.filters{display:flex;flex-wrap:wrap;gap:1em;align-items:end;margin:1em 0}
.filters label{display:flex;flex-direction:column;font-weight:bold}
select,input,button{font:inherit;padding:.25em}a{color:#0645ad}
a:focus,button:focus,select:focus,input:focus{outline:3px solid #1a5fb4;outline-offset:2px}
small,.muted{color:#444}ul.reasons{margin:0;padding-left:1.1em}.todo p{margin:0 0 .3em}
.legend dt{font-weight:bold}.legend dd{margin:0 0 .4em 1em}
progress{width:30em;max-width:100%;height:1.4em}
.visually-hidden{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
"""

SCRIPT = """
(function(){
  var table=document.getElementById('worklist'); if(!table) return;
  var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
  var f={status:document.getElementById('f-status'),reason:document.getElementById('f-reason'),
         week:document.getElementById('f-week'),q:document.getElementById('f-q')};
  var count=document.getElementById('count');
  function query(){var p=[];['status','reason','week','q'].forEach(function(k){
    if(f[k]&&f[k].value) p.push(k+'='+encodeURIComponent(f[k].value));}); return p.join('&');}
  function apply(){
    var st=f.status.value, re=f.reason.value, wk=f.week.value, q=f.q.value.trim().toLowerCase(), n=0;
    rows.forEach(function(r){
      var ok=(!st||r.dataset.status===st)&&(!re||r.dataset.reasons.split('|').indexOf(re)>=0)
        &&(!wk||r.dataset.week===wk)&&(!q||r.dataset.search.indexOf(q)>=0);
      r.hidden=!ok; if(ok) n++;});
    count.textContent='Showing '+n+' of '+rows.length+' referrals';
    var qs=query();
    document.querySelectorAll('a[data-export]').forEach(function(a){
      a.href=a.dataset.export+(qs?'?'+qs:'');});
  }
  ['status','reason','week'].forEach(function(k){f[k].addEventListener('change',apply);});
  f.q.addEventListener('input',apply);
  table.querySelectorAll('th[data-key] button').forEach(function(b){
    b.addEventListener('click',function(){
      var th=b.parentNode, key=th.dataset.key, asc=th.getAttribute('aria-sort')!=='ascending';
      table.querySelectorAll('th[data-key]').forEach(function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      rows.sort(function(a,b){var x=a.dataset[key]||'',y=b.dataset[key]||'';
        return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});
    });});
  var dl=document.getElementById('download-visible');
  if(dl) dl.addEventListener('click',function(){
    var lines=[['Referral','Patient','Planned date','Status','What to do','Reasons']];
    rows.forEach(function(r){ if(!r.hidden) lines.push([r.dataset.referral,r.dataset.name,r.dataset.planned,
      r.dataset.status,r.dataset.todo,r.dataset.reasons]);});
    var text=lines.map(function(l){return l.map(function(c){return '"'+String(c).replace(/"/g,'""')+'"';}).join(',');})\
.join('\\r\\n');
    var a=document.createElement('a'); a.href=URL.createObjectURL(new Blob([text],{type:'text/csv'}));
    a.download='worklist-visible.csv'; document.body.appendChild(a); a.click(); a.remove();});
  apply();
})();
"""


def e(value: object) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return escape("" if value is None else str(value), quote=True)


def status_class(status: str) -> str:
    return "s-" + status.replace(" ", "-")


def matches(row: WorklistRow, status: str = "", reason: str = "", week: str = "", q: str = "") -> bool:
    """Whether a row passes the page's filter (the server side of the script's ``apply``)."""
    q = q.strip().lower()
    return ((not status or row.status == status) and (not reason or reason in row.reason_words)
            and (not week or row.planned_week == week) and (not q or q in search_text(row)))  # fmt: skip


def search_text(row: WorklistRow) -> str:
    """What the search box looks in: names, ids, file, status, what to do and reasons."""
    parts = [row.patient_name, row.patient_id, row.referral_id, row.source, row.status, row.what_to_do_text, row.reasons_text]
    return " ".join(p for p in parts if p).lower()


def filters(rows: Sequence[WorklistRow]) -> str:
    """The filter controls (labelled), with the options found in ``rows``."""
    reasons = sorted({w for r in rows for w in r.reason_words})
    weeks = sorted({r.planned_week for r in rows if r.planned_week})

    def select(ident: str, label: str, options: Iterable[str], everything: str) -> str:
        opts = "".join(f'<option value="{e(o)}">{e(o)}</option>' for o in options)
        return (f'<label for="{ident}">{label}<select id="{ident}" name="{ident[2:]}">'
                f'<option value="">{everything}</option>{opts}</select></label>')

    return (
        '<div class="filters" role="search">'
        + select("f-status", "Status", [s for s in STATUSES if any(r.status == s for r in rows)], "All statuses")
        + select("f-reason", "Reason", reasons, "All reasons")
        + select("f-week", "Planned week", weeks, "All weeks")
        + '<label for="f-q">Search (name, referral, file, words)'
        + '<input id="f-q" name="q" type="search" autocomplete="off"></label>'
        + "</div>"
        + '<p id="count" role="status" aria-live="polite"></p>'
    )


def legend() -> str:
    """What each status means, in words."""
    items = "".join(
        f'<dt><span class="status {status_class(s)}">{e(s)}</span></dt><dd>{e(DESCRIPTIONS[s])}</dd>' for s in reversed(STATUSES)
    )
    return f'<details><summary>What the statuses mean</summary><dl class="legend">{items}</dl></details>'


def table(rows: Sequence[WorklistRow], link: Callable[[int, WorklistRow], str | None]) -> str:
    """The worklist table: one ``<tr>`` per row, data attributes for the script. ``link(i, row)``
    is the URL of the row's explanation (None: no decision to explain)."""
    head = (
        '<table id="worklist"><caption class="visually-hidden">Referrals, one a row</caption><thead><tr>'
        '<th scope="col" data-key="name"><button type="button">Patient</button></th>'
        '<th scope="col" data-key="referral"><button type="button">Referral</button></th>'
        '<th scope="col" data-key="planned"><button type="button">Planned date</button></th>'
        '<th scope="col" data-key="rank"><button type="button">Status</button></th>'
        '<th scope="col">What to do</th><th scope="col">Reasons (rules)</th><th scope="col">Explanation</th>'
        "</tr></thead><tbody>"
    )
    out = [head]
    for i, row in enumerate(rows):
        url = link(i, row)
        reasons = "".join(f"<li>{e(r.text())}</li>" for r in row.reasons)
        todo = "".join(f"<p>{e(t)}</p>" for t in row.what_to_do)
        name = row.patient_name or row.patient_id or ""
        out.append(
            f'<tr data-status="{e(row.status)}" data-rank="{STATUSES.index(row.status)}" '
            f'data-reasons="{e("|".join(row.reason_words))}" '
            f'data-week="{e(row.planned_week)}" data-search="{e(search_text(row))}" data-name="{e(name.lower())}" '
            f'data-referral="{e(row.referral_id)}" data-planned="{e(row.planned_date or "")}" '
            f'data-todo="{e(row.what_to_do_text)}">'
            f'<td>{e(row.patient_name or "")}<br><small>{e(row.patient_id or "")}</small></td>'
            f"<td>{e(row.referral_id)}<br><small>{e(row.source)}</small></td>"
            f"<td>{e(day_words(row.planned_date)) if row.planned_date else '<span class=muted>none</span>'}"
            f"{'<br><small>' + e(row.planned_week) + '</small>' if row.planned_week else ''}</td>"
            f'<td><span class="status {status_class(row.status)}">{e(row.status)}</span></td>'
            f'<td class="todo">{todo}</td><td><ul class="reasons">{reasons}</ul></td>'
            f"<td>{f'<a href={chr(34)}{e(url)}{chr(34)}>Why (decision {e(row.decision_id)})</a>' if url else ''}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def document(title: str, body: str, *, script: bool = True) -> str:
    """A complete HTML document with the inline styles (and script)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>{body}"
        f"{'<script>' + SCRIPT + '</script>' if script else ''}</body></html>"
    )


def summary(rows: Sequence[WorklistRow]) -> str:
    """``100 referrals: 40 ready, 12 needs data, …``."""
    counts = [f"{sum(1 for r in rows if r.status == s)} {s}" for s in reversed(STATUSES) if any(r.status == s for r in rows)]
    return f"{len(rows)} referral{'' if len(rows) == 1 else 's'}: " + ", ".join(counts) if rows else "No referrals."
