"""Why a rule did or did not fire for one patient, and what would change each deferral: beside the
evaluator, for the server's Explain RPC and ``needlepoint explain`` (:mod:`needlepoint.cli_explain`)
alike.

* **A rule**: each alternative, each pattern, each candidate fact with every condition: the value
  it saw, the threshold in force (parameters resolved) and whether it held.
* **Counterfactuals**: for every deferral in the decision, the smallest change to one numeric fact
  that stops a rule behind it (e.g. "INR 3.4 > 3; would not apply at ≤ 3"). Each one is checked,
  not just stated: the changed fact is re-derived (aggregates, absences) and re-run through the
  engine, and the report says whether the deferral actually lifts or which rule still holds it.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator

from needlepoint.core.conditions import ORDERING_OPERATORS, FieldTest, Pattern, resolve_operand, test_holds
from needlepoint.core.evaluator import Evaluator, format_instant
from needlepoint.core.prepare import FactInfo, PreparedFacts, _scope  # private: the same scoping as matching
from needlepoint.core.record import PatientRecord, RecordError
from needlepoint.core.resolve import field_value

_SYMBOL = {"eq": "=", "ne": "≠", "gt": ">", "gte": "≥", "lt": "<", "lte": "≤"}
_FLIP = {"gt": "≤", "gte": "<", "lt": "≥", "lte": ">"}  # where a passing value must move to
_DERIVED = ("summary", "absent")


def explain_rule(evaluator: Evaluator, record: PatientRecord, as_of: dt.datetime, rule_id: str) -> dict:
    """Why ``rule_id`` did or did not fire for this record at this instant."""
    try:
        rule = evaluator.ruleset.rule(rule_id)
    except KeyError:
        raise RecordError("rule", f"no rule {rule_id!r} in {evaluator.ruleset.id} {evaluator.ruleset.version}") from None
    prepared, firings = evaluator.firings(record, as_of)
    params = evaluator.ruleset.param_values()
    alternatives = []
    for i, alternative in enumerate(rule.alternatives):
        patterns = [_explain_pattern(pattern, prepared, params) for pattern in alternative]
        alternatives.append({"index": i, "holds": all(p["holds"] for p in patterns), "patterns": patterns})
    return {
        "ruleId": rule.id,
        "ruleVersion": rule.version,
        "title": rule.title,
        "fired": any(f.rule.id == rule.id for f in firings),
        "alternatives": alternatives,
    }


def _candidates(pattern: Pattern, prepared: PreparedFacts, params: dict) -> Iterator[tuple[dict, FactInfo]]:
    """The facts a pattern is about, as (fact, info) pairs: those of its kind, and for a pattern
    that pins an observation concept (``concept: inr``), only results of that concept.

    A condition is judged only against facts of its own pattern: a BMI of 30.3 is not an INR, so
    it must never be shown as passing or failing ``value > 3`` for the INR. Matching scopes the
    same way (prepare's ``_scope``), so what is shown is what the engine compared."""
    scope = _scope(pattern, params)
    for fact, info in zip(prepared.facts, prepared.info, strict=True):
        if fact["t"] != pattern.kind:
            continue
        if isinstance(scope, tuple) and fact.get("concept") != scope[1]:
            continue
        yield fact, info


def _explain_pattern(pattern: Pattern, prepared: PreparedFacts, params: dict) -> dict:
    candidates = []
    for fact, info in _candidates(pattern, prepared, params):
        tests = []
        for t in pattern.tests:
            threshold = resolve_operand(t.operand, params) if t.op not in ("in", "exists") else t.operand
            saw, holds = field_value(fact, info, t.field), test_holds(t, fact, params)
            tests.append({"condition": t.describe(), "threshold": str(threshold), "saw": saw, "holds": holds})
        candidates.append(
            {"fact": info.label, "source": info.source, "matches": all(t["holds"] for t in tests), "conditions": tests}
        )
    matched = any(c["matches"] for c in candidates)
    conditions = " and ".join(t.describe() for t in pattern.tests) or "anything"
    return {
        "alias": pattern.alias,
        "pattern": ("no " if pattern.negated else "") + f"{pattern.kind} with {conditions}",
        "negated": pattern.negated,
        "holds": not matched if pattern.negated else matched,
        "candidates": candidates,
    }


def _base(prepared: PreparedFacts) -> PreparedFacts:
    """The facts that come from the record, without the derived ones."""
    keep = [i for i, f in enumerate(prepared.facts) if f["t"] not in _DERIVED]
    return PreparedFacts([copy.deepcopy(prepared.facts[i]) for i in keep], [prepared.info[i] for i in keep])


def _rederive(evaluator: Evaluator, base: PreparedFacts) -> PreparedFacts:
    out = PreparedFacts([dict(f) for f in base.facts], list(base.info))
    evaluator.preparer.derive(out)
    return out


def counterfactuals(evaluator: Evaluator, record: PatientRecord, as_of: dt.datetime) -> list[dict]:
    """For each deferral, one-value changes that would stop a rule behind it, each verified."""
    prepared, firings = evaluator.firings(record, as_of)
    decision = evaluator.resolver(firings, prepared, format_instant(as_of))
    params = evaluator.ruleset.param_values()
    by_rule = {f.rule.id: f for f in firings}
    base = _base(prepared)
    results = []
    for deferral in decision.get("deferrals", []):
        key = (deferral["reason"], deferral["scope"])
        for rule_id in deferral["ruleIds"]:
            firing = by_rule[rule_id]
            for alt_index, aliases in firing.matched.items():
                for pattern in firing.rule.alternatives[alt_index]:
                    if pattern.negated or pattern.kind in _DERIVED:
                        continue
                    for fid in aliases.get(pattern.alias, []):
                        for test in pattern.tests:
                            if test.op in ORDERING_OPERATORS:
                                change = _try_change(evaluator, base, fid, test, params, deferral, key, rule_id, as_of,
                                                     decision.get("deferrals", []))
                                results.append(change)
    return results


def _try_change(evaluator: Evaluator, base: PreparedFacts, fid: int, test: FieldTest, params: dict, deferral: dict,
                key: tuple[str, str], rule_id: str, as_of: dt.datetime, base_deferrals: list[dict]) -> dict:
    fact, info = base.facts[fid], base.info[fid]
    threshold = resolve_operand(test.operand, params)
    integral = isinstance(fact[test.field], int) and isinstance(threshold, int)
    step = 1 if integral else 0.01
    new_value = {"gt": threshold, "gte": threshold - step, "lt": threshold, "lte": threshold + step}[test.op]
    changed = PreparedFacts([dict(f) for f in base.facts], list(base.info))
    changed.facts[fid] = {**fact, test.field: new_value}
    derived = _rederive(evaluator, changed)
    after = evaluator.resolver(evaluator.run_prepared(derived), derived, format_instant(as_of))
    still = next((d for d in after.get("deferrals", []) if (d["reason"], d["scope"]) == key), None)
    before = {(d["reason"], d["scope"]) for d in base_deferrals}
    appearing = [d for d in after.get("deferrals", []) if (d["reason"], d["scope"]) not in before]
    new_rules = [r for d in appearing for r in d["ruleIds"]]
    unit = info.units.get(test.field, "")
    saw = field_value(fact, info, test.field)
    bound = f"{threshold:g}{' ' + unit if unit else ''}" if isinstance(threshold, (int, float)) else str(threshold)
    text = f"{info.label}: {test.field} {saw} {_SYMBOL[test.op]} {bound}; {rule_id} would not apply at {_FLIP[test.op]} {bound}"
    return {
        "deferral": f"{deferral['reason']}/{deferral['scope']}",
        "ruleId": rule_id,
        "fact": info.label,
        "field": test.field,
        "saw": saw,
        "change": f"{test.field} {_FLIP[test.op]} {bound}",
        "liftsDeferral": still is None,
        "stillDeferredBy": [] if still is None else still["ruleIds"],
        "newDeferrals": [f"{d['reason']}/{d['scope']}" for d in appearing],
        "text": text
        + ("; the deferral would lift" if still is None else f"; the deferral would stay ({', '.join(still['ruleIds'])})")
        + (f", but {', '.join(d['reason'] for d in appearing)} would appear ({', '.join(new_rules)})." if appearing else "."),
    }
