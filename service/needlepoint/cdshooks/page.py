"""The human-readable explanation of a decision, served at ``/decisions/{decisionId}``.

Every card links here. The page is rendered from the decision JSON alone: first the coordinator's
view of it (``needlepoint.views.coordinator``: the verdict, the reasons to wait, guidance,
injectates, cautions and records to complete, in the same words as ``needlepoint evaluate`` and
the cards), each item linking the rules behind it; then, for every rule, its title, outcome, the
facts it matched, the parameters in force and its evidence, each rule with an anchor
(``#rule-ID``) the card's link points to. Minimal HTML with inline CSS and no scripts,
fonts or images: nothing is fetched from the network. Every value is escaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from needlepoint.views.coordinator import coordinator_view


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _rules(rule_ids: Any) -> str:
    return ", ".join(f'<a href="#rule-{_e(r)}">{_e(r)}</a>' for r in rule_ids or ())


def render_decision(decision: Mapping[str, Any]) -> str:
    """The explanation page of one decision (a complete HTML document)."""
    rs = decision.get("ruleset", {})
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Needlepoint decision {_e(decision.get('decisionId', ''))}</title>",
        "<style>body{font-family:sans-serif;max-width:52em;margin:1em auto;padding:0 1em;line-height:1.4}"
        "h2{border-bottom:1px solid #ccc}.rule{margin:1em 0;padding:.5em 1em;border-left:4px solid #888}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
        ".not-now{color:#a00}.review-first{color:#a60}</style></head><body>",
        "<h1>Why Needlepoint suggested this</h1>",
        f"<p>Decision <code>{_e(decision.get('decisionId', ''))}</code> at {_e(decision.get('asOf', ''))}, "
        f"rule set {_e(rs.get('id', ''))} {_e(rs.get('version', ''))} (<code>{_e(rs.get('digest', ''))}</code>).</p>",
        "<p><strong>Suggestions with reasons, never orders. The rule set is not clinically validated.</strong></p>",
    ]
    view = coordinator_view(dict(decision))  # the coordinator's words: the same as the CLI and the cards
    parts.append(f'<p class="verdict {_e(view.status)}"><strong>{_e(view.verdict)}</strong></p>')
    for section in view.sections:
        parts.append(f"<h2>{_e(section.title)}</h2><ul>")
        for item in section.items:
            rules = f" <small>[{_rules(item.rule_ids)}]</small>" if item.rule_ids else ""
            details = "".join(f"<br>{_e(detail)}" for detail in item.details)
            parts.append(f"<li><strong>{_e(item.headline)}</strong>{details}{rules}</li>")
        parts.append("</ul>")
    parts.append("<h2>The rules</h2>")
    for x in decision.get("explanations", ()):
        parts.append(f'<div class="rule" id="rule-{_e(x.get("ruleId", ""))}">')
        parts.append(f"<h3>{_e(x.get('ruleId', ''))} {_e(x.get('ruleVersion', ''))}: {_e(x.get('title', ''))}</h3>")
        parts.append(f"<p><em>{_e(x.get('outcome', ''))}</em></p><p>{_e(x.get('rationale', ''))}</p>")
        if x.get("overriddenBy"):
            parts.append(f"<p>Overridden by {_rules([x['overriddenBy']])}.</p>")
        matched = x.get("matched", ())
        if matched:
            parts.append("<table><tr><th>Fact</th><th>Value</th></tr>")
            parts.extend(f"<tr><td>{_e(m.get('fact', ''))}</td><td>{_e(m.get('value', ''))}</td></tr>" for m in matched)
            parts.append("</table>")
        params = x.get("parameters", ())
        if params:
            parts.append(
                "<p>Parameters: "
                + "; ".join(f"{_e(p.get('name', ''))} = {_e(p.get('value', ''))} ({_e(p.get('layer', ''))})" for p in params)
                + "</p>"
            )
        evidence = x.get("evidence", ())
        if evidence:
            parts.append(
                "<ul>"
                + "".join(f"<li>{_e(v.get('citation', ''))} — {_e(v.get('strength', ''))}</li>" for v in evidence)
                + "</ul>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_not_found(decision_id: str) -> str:
    """The page for a decision this process does not hold."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Decision not found</title></head><body>'
        f"<h1>Decision not found</h1><p>Decision <code>{_e(decision_id)}</code> is not held here "
        "(it may be older than the decisions kept, or made by another server process).</p></body></html>"
    )
