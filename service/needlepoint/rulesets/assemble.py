"""Assembly of one checked rule into the model's :class:`~needlepoint.core.ruleset.Rule`.

Only entries the builder found without error come here, so nothing is checked again."""

from __future__ import annotations

from needlepoint.core.conditions import ParamRef
from needlepoint.core.ruleset import TEMPLATE, Evidence, Outcome, Rule, parse_placeholder

from .rules import RuleEntry


def assemble_rule(entry: RuleEntry, source: str) -> Rule:
    raw = entry.raw
    used: list[str] = []  # parameters in the order the rule uses them: conditions, then outcome
    alternatives = []
    for alt in entry.alts:
        for p in alt:
            used += [t.operand.name for t in p.tests if isinstance(t.operand, ParamRef)]
        # the engine needs negations after positive patterns (a stable sort keeps the rest in order)
        alternatives.append(tuple(sorted((p.pattern for p in alt), key=lambda p: p.negated)))
    then = raw["then"]
    modality = then.get("modality")
    if modality is not None:
        modality = dict(modality)
        preferred = modality.get("preferred")
        if isinstance(preferred, str) and preferred.startswith("$"):
            used.append(preferred[1:])
        for key in ("acceptable", "avoid"):
            modality[key] = tuple(modality.get(key, []))
    deferral = then.get("deferral")
    if deferral is not None:
        deferral = {"reason": deferral["reason"], "severity": deferral["severity"], "scope": deferral.get("scope", "PROCEDURE")}
    message = then["message"].strip()
    for template in (message, then.get("missing_data") or ""):  # the templates check_templates reads
        for ref in TEMPLATE.findall(template):
            placeholder = parse_placeholder(ref)
            if placeholder is not None and placeholder.param is not None:
                used.append(placeholder.param)
    outcome = Outcome(
        modality=modality,
        injectates=tuple(
            {"category": i["category"], "recommendation": i["recommendation"]} for i in then.get("injectates") or []
        ),
        deferral=deferral,
        caution=then.get("caution"),
        missing_data=then.get("missing_data"),
        message=message,
    )
    return Rule(
        id=entry.id,
        version=raw["version"],
        title=raw["title"],
        category=raw["category"],
        precedence=entry.precedence,
        alternatives=tuple(alternatives),
        then=outcome,
        rationale=raw["rationale"].strip(),
        evidence=tuple(Evidence(citation=e["citation"], strength=e["strength"]) for e in raw.get("evidence") or []),
        params=tuple(dict.fromkeys(used)),
        source=source,
        exclusive=raw.get("exclusive", False),
    )
