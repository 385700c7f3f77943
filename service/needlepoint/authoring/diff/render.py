"""The report of ``needlepoint rules diff`` as JSON-ready data, Markdown or HTML."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from typing import Any

from needlepoint.authoring.diff.compare import FIELDS, CaseOutcome, FiringDiff, text_of
from needlepoint.authoring.diff.report import DiffReport, VersionInfo


def to_json(report: DiffReport) -> dict:
    """The report as plain JSON-ready data."""

    def version(v: VersionInfo) -> dict:
        return {"label": v.label, "id": v.id, "version": v.version, "digest": v.digest, "layers": list(v.layers)}

    def value(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    def case(o: CaseOutcome) -> dict:
        out: dict[str, Any] = {"case": o.case}
        if o.name:
            out["name"] = o.name
        if o.as_of:
            out["asOf"] = o.as_of
        if o.changes:
            out["changes"] = [
                {"field": c.field, "item": c.item, "old": value(c.old), "new": value(c.new), "rules": list(c.rules)}
                for c in o.changes
            ]
        if o.firings:
            out["firings"] = [{"rule": f.rule, "how": f.how, "old": list(f.old), "new": list(f.new)} for f in o.firings]
        if o.status == "error":
            out["oldError"], out["newError"] = o.old_error, o.new_error
        return out

    ch = report.changes
    return {
        "old": version(report.old),
        "new": version(report.new),
        "rulesetChanges": {
            "parameters": [
                {"name": p.name, "old": p.old, "new": p.new, "oldLayer": p.old_layer, "newLayer": p.new_layer}
                for p in ch.parameters
            ],
            "rulesAdded": ch.rules_added,
            "rulesRemoved": ch.rules_removed,
            "rulesModified": ch.rules_modified,
            "valueSets": ch.value_sets,
            "observations": ch.observations,
            "aggregates": ch.aggregates,
            "affectedRules": ch.affected,
        },
        "cases": str(report.cases_dir),
        "asOf": report.as_of,
        "defaultAsOf": report.default_as_of,
        "summary": {
            "cases": report.total,
            "changed": len(report.changed),
            "firingsOnly": len(report.of("firings")),
            "unchanged": report.same,
            "errors": len(report.of("error")),
            "errorsInOneVersionOnly": len(report.one_sided_errors),
            "skippedFiles": len(report.skipped),
            "fields": report.field_counts(),
        },
        "transitions": [
            {"field": f, "item": i, "old": value(o), "new": value(n), "cases": k} for f, i, o, n, k in report.transitions()
        ],
        "rules": [
            {
                "rule": s.rule,
                "title": s.title,
                "firedDifferently": s.fired_differently,
                "how": dict(s.how),
                "decisionsChanged": s.decisions_changed,
                "fields": dict(s.fields),
            }
            for s in report.by_rule()
        ],
        "changed": [case(o) for o in report.changed],
        "firingsOnly": [case(o) for o in report.of("firings")],
        "errors": [case(o) for o in report.of("error")],
        "skipped": [{"file": f, "reason": r} for f, r in report.skipped],
        "timing": _timing(report),
    }


def _timing(report: DiffReport) -> dict:
    evaluated = max(1, report.total)
    return {
        "seconds": round(report.seconds, 3),
        "processes": report.jobs,
        "casesPerSecond": round(report.total / report.seconds, 1) if report.seconds else None,
        "oldMsPerCase": round(1000 * report.old_seconds / evaluated, 3),
        "newMsPerCase": round(1000 * report.new_seconds / evaluated, 3),
    }


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (plural or word + 's')}"


_HOW = {
    "old only": "fired only under OLD",
    "new only": "fired only under NEW",
    "matched facts differ": "fired under both, on different facts",
    "overridden differently": "overridden differently",
}


def headline(report: DiffReport) -> str:
    parts = [
        f"{_plural(report.total, 'case')} evaluated",
        f"{_plural(len(report.changed), 'decision')} changed",
        f"{_plural(len(report.of('firings')), 'case')} where rules fired differently without changing the decision",
        f"{_plural(len(report.of('error')), 'error')}",
    ]
    if report.one_sided_errors:
        parts[-1] += f" ({len(report.one_sided_errors):,} under one version only)"
    parts.append(f"{_plural(len(report.skipped), 'file')} skipped")
    return ", ".join(parts) + "."


def _instant_text(report: DiffReport) -> str:
    if report.as_of:
        return f"every case at {report.as_of} (--as-of)"
    return f"each case at its own instant; inputs without one at {report.default_as_of} (the start of the run)"


def _ruleset_change_lines(report: DiffReport) -> list[tuple[str, str]]:
    """(kind, text) per rule-set change, plain text."""
    ch = report.changes
    lines = []
    for p in ch.parameters:
        old = "absent" if p.old_layer is None else f"{text_of(p.old)} (layer {p.old_layer})"
        new = "absent" if p.new_layer is None else f"{text_of(p.new)} (layer {p.new_layer})"
        lines.append(("parameter", f"{p.name}: {old} → {new}"))
    for kind, ids in (("rule added", ch.rules_added), ("rule removed", ch.rules_removed), ("rule edited", ch.rules_modified)):
        lines += [(kind, f"{rid}: {report.titles.get(rid, '')}") for rid in ids]
    for kind, names in (
        ("value set changed", ch.value_sets),
        ("observation concept changed", ch.observations),
        ("aggregate changed", ch.aggregates),
    ):
        lines += [(kind, name) for name in names]
    return lines


def _limited(items: list, limit: int | None) -> tuple[list, int]:
    if not limit or len(items) <= limit:
        return items, 0
    return items[:limit], len(items) - limit


# Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&#])")


def _md(value: Any) -> str:
    """Text safe inside a Markdown paragraph or table cell (one line, specials escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text_of(value).split()))


def _md_rules(rules: Iterable[str]) -> str:
    return ", ".join(f"`{r}`" for r in rules) or "—"


def render_markdown(report: DiffReport, *, max_cases: int | None = None) -> str:
    out: list[str] = []
    add = out.append
    o, n = report.old, report.new
    add(f"# Rule-set diff: {_md(o.id)} {_md(o.version)} → {_md(n.id)} {_md(n.version)}")
    add("")
    add("| | Rule set | Version | Layers | Digest | From |")
    add("|---|---|---|---|---|---|")
    for name, v in (("OLD", o), ("NEW", n)):
        add(f"| {name} | {_md(v.id)} | {_md(v.version)} | {_md(' + '.join(v.layers))} | `{v.digest[:19]}…` | {_md(v.label)} |")
    add("")
    if o.digest == n.digest:
        add("The two versions are identical (same digest).")
        add("")
    elif o.version == n.version and o.id == n.id:
        add(f"Note: both versions are numbered {_md(o.version)} but differ.")
        add("")
    add(f"Cases from {_md(report.cases_dir)}, {_md(_instant_text(report))}.")
    add("")
    add("## What changed in the rule set")
    add("")
    lines = _ruleset_change_lines(report)
    out += [f"- {kind}: {_md(text)}" for kind, text in lines] or ["- nothing that can change a decision"]
    if report.changes.affected:
        add(f"- rules whose behaviour may change: {_md_rules(report.changes.affected)}")
    add("")
    add("## Summary")
    add("")
    add(f"**{_md(headline(report))}**")
    add("")
    fields = report.field_counts()
    if fields:
        add("| Field | Decisions changed |")
        add("|---|---:|")
        out += [f"| {name} | {count:,} |" for name, count in fields.items()]
        add("")
        add("| Field | Item | OLD | NEW | Cases |")
        add("|---|---|---|---|---:|")
        out += [f"| {f} | {_md(i)} | {_md(a)} | {_md(b)} | {k:,} |" for f, i, a, b, k in report.transitions()]
        add("")
    rules = report.by_rule()
    if rules:
        add("## By rule")
        add("")
        add("| Rule | Title | Decisions changed | Fields changed | Fired differently | How |")
        add("|---|---|---:|---|---:|---|")
        for s in rules:
            fields_text = (
                ", ".join(f"{f} ({k:,})" for f, k in sorted(s.fields.items(), key=lambda fk: FIELDS.index(fk[0]))) or "—"
            )
            how = "; ".join(f"{_HOW[h]} ({k:,})" for h, k in s.how.most_common()) or "—"
            add(f"| `{s.rule}` | {_md(s.title)} | {s.decisions_changed:,} | {fields_text} | {s.fired_differently:,} | {how} |")
        add("")
    changed, more = _limited(report.changed, max_cases)
    if changed:
        add(f"## Changed decisions ({len(report.changed):,})")
        add("")
        for c in changed:
            add(f"### {_md(c.case)}" + (f" — {_md(c.name)}" if c.name else ""))
            add("")
            if c.as_of:
                add(f"As of {c.as_of}.")
                add("")
            add("| Field | Item | OLD | NEW | Rules responsible |")
            add("|---|---|---|---|---|")
            out += [f"| {x.field} | {_md(x.item)} | {_md(x.old)} | {_md(x.new)} | {_md_rules(x.rules)} |" for x in c.changes]
            add("")
            out += _md_firings(c.firings)
        if more:
            add(f"… and {_plural(more, 'more changed decision')} (--max-cases 0 lists all).")
            add("")
    firings, more = _limited(report.of("firings"), max_cases)
    if firings:
        add(f"## Rules fired differently, decision unchanged ({len(report.of('firings')):,})")
        add("")
        add("| Case | Rules |")
        add("|---|---|")
        for c in firings:
            rules_text = "; ".join(f"`{f.rule}` {_HOW[f.how]}" for f in c.firings)
            add(f"| {_md(c.case)}" + (f" {_md(c.name)}" if c.name else "") + f" | {rules_text} |")
        add("")
        if more:
            add(f"… and {more:,} more.")
            add("")
    errors, more = _limited(report.of("error"), max_cases)
    if errors:
        add(f"## Errors ({len(report.of('error')):,})")
        add("")
        add("| Case | OLD | NEW |")
        add("|---|---|---|")
        for c in errors:
            add(f"| {_md(c.case)} | {_md(c.old_error or 'evaluated')} | {_md(c.new_error or 'evaluated')} |")
        add("")
        if more:
            add(f"… and {more:,} more.")
            add("")
    if report.skipped:
        add(f"## Skipped files ({len(report.skipped):,})")
        add("")
        out += [f"- {_md(f)}: {_md(r)}" for f, r in report.skipped]
        add("")
    t = _timing(report)
    add("---")
    add("")
    add(f"{report.total:,} cases in {t['seconds']:.2f} s on {_plural(t['processes'], 'process', 'processes')}; "
        f"evaluation {t['oldMsPerCase']:.2f} ms per case under OLD, {t['newMsPerCase']:.2f} ms under NEW.")  # fmt: skip
    return "\n".join(out) + "\n"


def _md_firings(firings: list[FiringDiff]) -> list[str]:
    if not firings:
        return []
    lines = ["Rules that fired differently:", ""]
    for f in firings:
        line = f"- `{f.rule}` {_HOW[f.how]}"
        if f.how == "old only":
            line += f"; it matched {_md('; '.join(f.old))}" if f.old else ""
        elif f.how == "new only":
            line += f"; it matched {_md('; '.join(f.new))}" if f.new else ""
        elif f.how == "matched facts differ":
            line += (
                f"; only under OLD: {_md('; '.join(f.old) or 'nothing')}; only under NEW: {_md('; '.join(f.new) or 'nothing')}"
            )
        else:
            line += f"; OLD by {_md_rules(f.old)}, NEW by {_md_rules(f.new)}"
        lines.append(line)
    lines.append("")
    return lines


# HTML

_CSS = (
    "\n"
    'body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:76em;color:#1d2330;'
    'padding:0 1em}\n'
    "h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d8dde6;padding-bottom:.2em}"
    "h3{font-size:1em;margin:1.4em 0 .4em}\n"
    "table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #d8dde6;padding:.25em .6em;text-align:left;"
    "vertical-align:top}\n"
    "th{background:#f1f3f7}td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "code{font:12px ui-monospace,Menlo,Consolas,monospace}\n"
    ".old{background:#fdecea}.new{background:#e6f4ea}.headline{font-size:1.1em;font-weight:600}.muted{color:#5d6678}\n"
    "ul.facts{margin:.2em 0;padding-left:1.2em}details{margin:.3em 0}summary{cursor:pointer}\n"
)


def _h(value: Any) -> str:
    return html.escape(text_of(value), quote=True)


def _h_rules(rules: Iterable[str]) -> str:
    return ", ".join(f"<code>{html.escape(r)}</code>" for r in rules) or "—"


def render_html(report: DiffReport, *, max_cases: int | None = None) -> str:
    """A single self-contained page (inline CSS, no script)."""
    o, n = report.old, report.new
    out: list[str] = []
    add = out.append
    title = f"Rule-set diff: {o.id} {o.version} → {n.id} {n.version}"
    add(
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
    )
    add(f"<h1>{_h(title)}</h1>")
    add("<table><tr><th></th><th>Rule set</th><th>Version</th><th>Layers</th><th>Digest</th><th>From</th></tr>")
    for name, v in (("OLD", o), ("NEW", n)):
        add(f"<tr><th>{name}</th><td>{_h(v.id)}</td><td>{_h(v.version)}</td><td>{_h(' + '.join(v.layers))}</td>"
            f"<td><code>{_h(v.digest[:19])}…</code></td><td>{_h(v.label)}</td></tr>")  # fmt: skip
    add("</table>")
    if o.digest == n.digest:
        add("<p>The two versions are identical (same digest).</p>")
    elif o.version == n.version and o.id == n.id:
        add(f"<p>Note: both versions are numbered {_h(o.version)} but differ.</p>")
    add(f"<p>Cases from {_h(report.cases_dir)}, {_h(_instant_text(report))}.</p>")
    add("<h2>What changed in the rule set</h2><ul>")
    lines = _ruleset_change_lines(report)
    out += [f"<li>{_h(kind)}: {_h(text)}</li>" for kind, text in lines] or ["<li>nothing that can change a decision</li>"]
    if report.changes.affected:
        add(f"<li>rules whose behaviour may change: {_h_rules(report.changes.affected)}</li>")
    add("</ul>")
    add("<h2>Summary</h2>")
    add(f'<p class="headline">{_h(headline(report))}</p>')
    fields = report.field_counts()
    if fields:
        add("<table><tr><th>Field</th><th>Decisions changed</th></tr>")
        out += [f'<tr><td>{_h(name)}</td><td class="n">{count:,}</td></tr>' for name, count in fields.items()]
        add("</table>")
        add("<table><tr><th>Field</th><th>Item</th><th>OLD</th><th>NEW</th><th>Cases</th></tr>")
        out += [
            f'<tr><td>{_h(f)}</td><td>{_h(i)}</td><td class="old">{_h(a)}</td><td class="new">{_h(b)}</td>'
            f'<td class="n">{k:,}</td></tr>'
            for f, i, a, b, k in report.transitions()
        ]
        add("</table>")
    rules = report.by_rule()
    if rules:
        add("<h2>By rule</h2>")
        add(
            "<table><tr><th>Rule</th><th>Title</th><th>Decisions changed</th><th>Fields changed</th>"
            "<th>Fired differently</th><th>How</th></tr>"
        )
        for s in rules:
            fields_text = (
                ", ".join(f"{f} ({k:,})" for f, k in sorted(s.fields.items(), key=lambda fk: FIELDS.index(fk[0]))) or "—"
            )
            how = "; ".join(f"{_HOW[h]} ({k:,})" for h, k in s.how.most_common()) or "—"
            add(f'<tr><td><code>{_h(s.rule)}</code></td><td>{_h(s.title)}</td><td class="n">{s.decisions_changed:,}</td>'
                f'<td>{_h(fields_text)}</td><td class="n">{s.fired_differently:,}</td><td>{_h(how)}</td></tr>')  # fmt: skip
        add("</table>")
    changed, more = _limited(report.changed, max_cases)
    if changed:
        add(f"<h2>Changed decisions ({len(report.changed):,})</h2>")
        for c in changed:
            add(f"<h3>{_h(c.case)}" + (f" — {_h(c.name)}" if c.name else "") + "</h3>")
            if c.as_of:
                add(f'<p class="muted">As of {_h(c.as_of)}.</p>')
            add("<table><tr><th>Field</th><th>Item</th><th>OLD</th><th>NEW</th><th>Rules responsible</th></tr>")
            out += [
                f'<tr><td>{_h(x.field)}</td><td>{_h(x.item)}</td><td class="old">{_h(x.old)}</td><td class="new">{_h(x.new)}</td>'
                f"<td>{_h_rules(x.rules)}</td></tr>"
                for x in c.changes
            ]
            add("</table>")
            out += _html_firings(c.firings)
        if more:
            add(f"<p>… and {_h(_plural(more, 'more changed decision'))} (--max-cases 0 lists all).</p>")
    firings, more = _limited(report.of("firings"), max_cases)
    if firings:
        add(f"<h2>Rules fired differently, decision unchanged ({len(report.of('firings')):,})</h2>")
        add("<table><tr><th>Case</th><th>Rules</th></tr>")
        for c in firings:
            rules_text = "; ".join(f"<code>{_h(f.rule)}</code> {_h(_HOW[f.how])}" for f in c.firings)
            add(f"<tr><td>{_h(c.case)}" + (f" {_h(c.name)}" if c.name else "") + f"</td><td>{rules_text}</td></tr>")
        add("</table>")
        if more:
            add(f"<p>… and {more:,} more.</p>")
    errors, more = _limited(report.of("error"), max_cases)
    if errors:
        add(f"<h2>Errors ({len(report.of('error')):,})</h2>")
        add("<table><tr><th>Case</th><th>OLD</th><th>NEW</th></tr>")
        out += [
            f"<tr><td>{_h(c.case)}</td><td>{_h(c.old_error or 'evaluated')}</td><td>{_h(c.new_error or 'evaluated')}</td></tr>"
            for c in errors
        ]
        add("</table>")
        if more:
            add(f"<p>… and {more:,} more.</p>")
    if report.skipped:
        add(f"<h2>Skipped files ({len(report.skipped):,})</h2><ul>")
        out += [f"<li>{_h(f)}: {_h(r)}</li>" for f, r in report.skipped]
        add("</ul>")
    t = _timing(report)
    processes = _plural(t["processes"], "process", "processes")
    add(
        f'<hr><p class="muted">{report.total:,} cases in {t["seconds"]:.2f} s on {_h(processes)}; '
        f'evaluation {t["oldMsPerCase"]:.2f} ms per case under OLD, {t["newMsPerCase"]:.2f} ms under NEW.</p>'
    )
    add("</body></html>")
    return "\n".join(out) + "\n"


def _html_firings(firings: list[FiringDiff]) -> list[str]:
    if not firings:
        return []
    out = ["<details open><summary>Rules that fired differently</summary><ul>"]
    for f in firings:
        head = f"<code>{_h(f.rule)}</code> {_h(_HOW[f.how])}"
        if f.how == "overridden differently":
            out.append(f"<li>{head}: OLD by {_h_rules(f.old)}, NEW by {_h_rules(f.new)}</li>")
            continue
        facts = [f'<li class="old">OLD: {_h(m)}</li>' for m in f.old] + [f'<li class="new">NEW: {_h(m)}</li>' for m in f.new]
        out.append(f"<li>{head}" + (f'<ul class="facts">{"".join(facts)}</ul>' if facts else "") + "</li>")
    out.append("</ul></details>")
    return out
