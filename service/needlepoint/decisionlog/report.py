"""``needlepoint decisions overrides``: per rule, how often it fired, was shown on a card, and what
clinicians did with those cards.

For every rule: **fired** (decisions in which it fired, from every road), **shown** (CDS Hooks
cards naming it that were returned to an EHR), **accepted** and **overridden** (those cards whose
latest feedback says so; a card with no feedback was ignored or is still open), the override
reasons given (code, display, count) and the clinicians' comments. Feedback naming a card the
log never saw is counted apart (``unmatchedFeedback``). ``since`` / ``until`` restrict to
decisions made in that window (``created_at``), and feedback to those decisions' cards.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, func, select

from needlepoint.decisionlog import schema

_Query = TypeVar("_Query", bound=Select[Any])


def overrides_report(engine: Engine, *, since: str | None = None, until: str | None = None) -> dict[str, Any]:
    """The report as JSON-ready data: ``{"since", "until", "decisions", "rules": [...],
    "unmatchedFeedback"}``, rules sorted by id."""
    d, fr, c, f = schema.decisions, schema.fired_rules, schema.cards, schema.feedback

    def window(query: _Query) -> _Query:
        if since:
            query = query.where(d.c.created_at >= since)
        if until:
            query = query.where(d.c.created_at < until)
        return query

    rules: dict[str, dict[str, Any]] = defaultdict(_empty_rule)
    with engine.connect() as connection:
        total = connection.execute(window(select(func.count()).select_from(d))).scalar_one()
        fired = window(
            select(fr.c.rule_id, func.count()).select_from(fr.join(d, fr.c.decision_row == d.c.id)).group_by(fr.c.rule_id)
        )
        for rule_id, count in connection.execute(fired):
            rules[rule_id]["fired"] = count
        card_rules: dict[str, list[str]] = {}
        for uuid, rule_ids in connection.execute(
            window(select(c.c.card_uuid, c.c.rule_ids).select_from(c.join(d, c.c.decision_row == d.c.id)))
        ):
            card_rules[uuid] = list(rule_ids or [])
            for rule_id in card_rules[uuid]:
                rules[rule_id]["shown"] += 1
        latest: dict[str, Any] = {}
        unmatched = 0
        history = select(f).order_by(f.c.outcome_timestamp, f.c.id)
        for row in connection.execute(history):
            if row.card_uuid not in card_rules:
                unmatched += 1 if not (since or until) else 0
                continue
            latest[row.card_uuid] = row
    for uuid, row in latest.items():
        for rule_id in card_rules[uuid]:
            entry = rules[rule_id]
            entry[row.outcome] += 1
            if row.outcome == "overridden":
                if row.reason_code:
                    entry["_reasons"][(row.reason_system, row.reason_code, row.reason_display)] += 1
                if row.comment:
                    entry["comments"].append({"card": uuid, "at": row.outcome_timestamp, "comment": row.comment})
    out = []
    for rule_id in sorted(rules):
        entry = rules[rule_id]
        reasons = entry.pop("_reasons")
        entry["reasons"] = [
            {"system": s, "code": code, "display": display, "count": n}
            for (s, code, display), n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        entry["comments"].sort(key=lambda x: x["at"])
        out.append({"ruleId": rule_id, **entry})
    return {"since": since or "", "until": until or "", "decisions": total, "rules": out, "unmatchedFeedback": unmatched}


def _empty_rule() -> dict[str, Any]:
    return {"fired": 0, "shown": 0, "accepted": 0, "overridden": 0, "_reasons": Counter(), "comments": []}


def render_text(report: dict[str, Any]) -> str:
    """A plain-text table, then each rule's override reasons and comments."""
    lines = [f"{report['decisions']} decision(s)" + (f" since {report['since']}" if report["since"] else "")]
    width = max([len(r["ruleId"]) for r in report["rules"]] + [4])
    lines.append(f"{'rule'.ljust(width)}  {'fired':>7} {'shown':>7} {'accepted':>8} {'overridden':>10}")
    for r in report["rules"]:
        lines.append(f"{r['ruleId'].ljust(width)}  {r['fired']:>7} {r['shown']:>7} {r['accepted']:>8} {r['overridden']:>10}")
    for r in report["rules"]:
        if r["reasons"] or r["comments"]:
            lines.append("")
            lines.append(f"{r['ruleId']} overridden {r['overridden']} time(s):")
            for reason in r["reasons"]:
                lines.append(f"  {reason['count']:>4} x {reason['display'] or reason['code']} ({reason['code']})")
            for comment in r["comments"]:
                lines.append(f"  {comment['at']} \"{comment['comment']}\"")
    if report["unmatchedFeedback"]:
        lines.append("")
        lines.append(f"{report['unmatchedFeedback']} feedback item(s) name a card the log never recorded")
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: the table, then reasons and comments per rule."""
    e = html.escape

    def reasons(r: dict[str, Any]) -> str:
        return "<br>".join(f"{x['count']} × {e(x['display'] or x['code'])} <small>{e(x['code'])}</small>" for x in r["reasons"])

    def comments(r: dict[str, Any]) -> str:
        return "<br>".join(f"<q>{e(x['comment'])}</q> <small>{e(x['at'])}</small>" for x in r["comments"])

    rows = "".join(
        f"<tr><td><code>{e(r['ruleId'])}</code></td><td>{r['fired']}</td><td>{r['shown']}</td>"
        f"<td>{r['accepted']}</td><td>{r['overridden']}</td><td>{reasons(r)}</td><td>{comments(r)}</td></tr>"
        for r in report["rules"]
    )
    since = f" since {e(report['since'])}" if report["since"] else ""
    unmatched = (
        f"<p>{report['unmatchedFeedback']} feedback item(s) name a card the log never recorded.</p>"
        if report["unmatchedFeedback"]
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>Needlepoint: overrides by rule</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}"
        "td:nth-child(n+2):nth-child(-n+5){text-align:right}</style></head><body>"
        f"<h1>Overrides by rule</h1><p>{report['decisions']} decision(s){since}.</p>"
        "<table><thead><tr><th>Rule</th><th>Fired</th><th>Shown</th><th>Accepted</th><th>Overridden</th>"
        f"<th>Override reasons</th><th>Comments</th></tr></thead><tbody>{rows}</tbody></table>{unmatched}</body></html>\n"
    )
