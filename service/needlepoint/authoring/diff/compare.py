"""The comparison at the heart of ``needlepoint rules diff``, pure: what changed in the rule set
itself, and what differs between two decisions for one case, with the rules responsible. No
files, no processes, no output."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from needlepoint.core.ruleset import RuleSet

# The decision fields compared, in report order.
FIELDS = ("modality", "injectates", "deferrals", "cautions", "missingData")


# -- what changed in the rule set itself ----------------------------------------------------------


def text_of(value: Any) -> str:
    """A value for people: lists joined, None -> an em dash."""
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(text_of(v) for v in value) or "—"
    return str(value)


@dataclass
class ParamChange:
    name: str
    old: Any
    new: Any
    old_layer: str | None
    new_layer: str | None


@dataclass
class RulesetChanges:
    parameters: list[ParamChange] = field(default_factory=list)
    rules_added: list[str] = field(default_factory=list)
    rules_removed: list[str] = field(default_factory=list)
    rules_modified: list[str] = field(default_factory=list)
    value_sets: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    aggregates: list[str] = field(default_factory=list)
    # Rules whose behaviour may differ: added, removed or edited, or using a changed parameter,
    # value set, observation concept or aggregate.
    affected: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.parameters or self.rules_added or self.rules_removed or self.rules_modified
                    or self.value_sets or self.observations or self.aggregates)  # fmt: skip


def rule_order(old: RuleSet, new: RuleSet) -> dict[str, int]:
    """Rule id -> position: NEW's rules in file order, then those only OLD has."""
    return {rid: i for i, rid in enumerate(dict.fromkeys([*(r.id for r in new.rules), *(r.id for r in old.rules)]))}


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def ruleset_changes(old: RuleSet, new: RuleSet) -> RulesetChanges:
    """The differences between two loaded rule sets that can change a decision."""
    changes = RulesetChanges()
    for name in sorted(old.params.keys() | new.params.keys()):
        po, pn = old.params.get(name), new.params.get(name)
        if po is None or pn is None or po.value != pn.value:
            changes.parameters.append(
                ParamChange(
                    name, po.value if po else None, pn.value if pn else None, po.layer if po else None, pn.layer if pn else None
                )
            )
    old_rules, new_rules = {r.id: r for r in old.rules}, {r.id: r for r in new.rules}
    changes.rules_added = [r for r in new_rules if r not in old_rules]
    changes.rules_removed = [r for r in old_rules if r not in new_rules]
    changes.rules_modified = [
        rid for rid, rule in new_rules.items()
        if rid in old_rules and dataclasses.replace(rule, source="") != dataclasses.replace(old_rules[rid], source="")
    ]  # fmt: skip
    changes.value_sets = _changed_keys(old.value_sets, new.value_sets)
    changes.observations = _changed_keys(old.observations, new.observations)
    old_aggs, new_aggs = {a.name: a for a in old.aggregates}, {a.name: a for a in new.aggregates}
    changes.aggregates = _changed_keys(old_aggs, new_aggs)

    params = {p.name for p in changes.parameters}
    value_sets, concepts, aggregates = set(changes.value_sets), set(changes.observations), set(changes.aggregates)

    def touches(patterns: Iterable) -> bool:
        for pattern in patterns:
            for test in pattern.tests:
                if test.op == "in" and isinstance(test.operand, str) and test.operand in value_sets:
                    return True
                if pattern.kind == "observation" and test.field == "concept" and test.operand in concepts:
                    return True
                if pattern.kind == "summary" and test.field in aggregates:
                    return True
        return False

    aggregates |= {a.name for a in new.aggregates if touches(a.patterns)}  # fed by a changed value set
    affected = set(changes.rules_added) | set(changes.rules_removed) | set(changes.rules_modified)
    for rule in (*new.rules, *old.rules):
        if params & set(rule.params) or touches(p for alternative in rule.alternatives for p in alternative):
            affected.add(rule.id)
    changes.affected = sorted(affected, key=rule_order(old, new).__getitem__)
    return changes


# -- comparing two decisions ----------------------------------------------------------------------


@dataclass(slots=True)
class Change:
    """One item of a decision field that differs: ``old`` -> ``new`` (None: absent)."""

    field: str
    item: str
    old: Any
    new: Any
    rules: tuple[str, ...]  # the rules responsible


@dataclass(slots=True)
class FiringDiff:
    """A rule that fired differently. ``how``: ``old only``, ``new only``, ``matched facts
    differ`` or ``overridden differently``; ``old``/``new``: the matched facts (for ``matched
    facts differ``, only those not matched under the other version)."""

    rule: str
    how: str
    old: tuple[str, ...]
    new: tuple[str, ...]


@dataclass(slots=True)
class CaseOutcome:
    key: tuple  # sort key: (file, line or index)
    case: str  # where the case is: file, file[index] or file:line
    name: str
    as_of: str
    changes: list[Change] = field(default_factory=list)
    firings: list[FiringDiff] = field(default_factory=list)
    old_error: str | None = None
    new_error: str | None = None

    @property
    def status(self) -> str:
        """``error``, ``changed`` (the decision), ``firings`` (only the rules that fired) or
        ``same``."""
        if self.old_error or self.new_error:
            return "error"
        if self.changes:
            return "changed"
        return "firings" if self.firings else "same"


def _project(decision: dict) -> dict[str, dict[str, tuple[Any, tuple[str, ...]]]]:
    """The compared part of a decision: field -> item -> (value, ruleIds)."""
    out: dict[str, dict[str, tuple[Any, tuple[str, ...]]]] = {f: {} for f in FIELDS}
    modality = decision.get("modality") or {}
    rule_ids = tuple(modality.get("ruleIds", ()))
    if modality.get("preferred"):
        out["modality"]["preferred"] = (modality["preferred"], rule_ids)
    for key in ("acceptable", "avoid"):
        if modality.get(key):
            out["modality"][key] = (tuple(sorted(modality[key])), rule_ids)
    for i in decision.get("injectates", ()):
        out["injectates"][i["category"]] = (i["recommendation"], tuple(i.get("ruleIds", ())))
    for d in decision.get("deferrals", ()):
        key = d["reason"] if d["scope"] == "PROCEDURE" else f"{d['reason']}/{d['scope']}"
        out["deferrals"][key] = (d["severity"], tuple(d.get("ruleIds", ())))
    for name, part in (("cautions", "cautions"), ("missingData", "missingData")):
        for entry in decision.get(part, ()):
            previous = out[name].get(entry["code"], (None, ()))[1]
            out[name][entry["code"]] = ("present", previous + tuple(r for r in entry.get("ruleIds", ()) if r not in previous))
    return out


def _matched(explanation: dict) -> tuple[str, ...]:
    return tuple(f"{m['fact']} = {m['value']}" for m in explanation.get("matched", ()))


def firing_diffs(old: dict, new: dict, order: dict[str, int]) -> list[FiringDiff]:
    """The rules that fired under one version only, or under both with different matched facts
    or a different ``overriddenBy``."""
    before = {e["ruleId"]: e for e in old.get("explanations", ())}
    after = {e["ruleId"]: e for e in new.get("explanations", ())}
    diffs = []
    for rid in sorted(before.keys() | after.keys(), key=lambda r: (order.get(r, len(order)), r)):
        if rid not in after:
            diffs.append(FiringDiff(rid, "old only", _matched(before[rid]), ()))
        elif rid not in before:
            diffs.append(FiringDiff(rid, "new only", (), _matched(after[rid])))
        else:
            mo, mn = _matched(before[rid]), _matched(after[rid])
            if set(mo) != set(mn):
                diffs.append(
                    FiringDiff(
                        rid, "matched facts differ", tuple(m for m in mo if m not in mn), tuple(m for m in mn if m not in mo)
                    )
                )
            elif before[rid].get("overriddenBy") != after[rid].get("overriddenBy"):
                diffs.append(
                    FiringDiff(
                        rid,
                        "overridden differently",
                        tuple(before[rid].get("overriddenBy", ())),
                        tuple(after[rid].get("overriddenBy", ())),
                    )
                )
    return diffs


def rule_fields(ruleset: RuleSet) -> dict[str, set[str]]:
    """The decision fields each rule can change."""
    out: dict[str, set[str]] = {}
    for rule in ruleset.rules:
        then, fields = rule.then, set()
        if then.modality:
            fields |= {"modality", "cautions"}  # a requested-modality conflict is a caution
        if then.injectates:
            fields.add("injectates")
        if then.deferral:
            fields.add("deferrals")
        if then.caution:
            fields.add("cautions")
        if then.missing_data:
            fields.add("missingData")
        out[rule.id] = fields
    return out


def compare(
    old: dict, new: dict, order: dict[str, int], affected: frozenset[str], rule_fields: dict[str, set[str]]
) -> tuple[list[Change], list[FiringDiff]]:
    """Field-by-field changes between two decisions, each with the rules responsible, and the
    rules that fired differently."""
    firings = firing_diffs(old, new, order)
    po, pn = _project(old), _project(new)
    if all({k: v for k, (v, _) in po[f].items()} == {k: v for k, (v, _) in pn[f].items()} for f in FIELDS):
        return [], firings
    differing = {f.rule for f in firings}
    fired = {e["ruleId"] for e in (*old.get("explanations", ()), *new.get("explanations", ()))}
    suspects = differing | (affected & fired)
    changes = []
    for name in FIELDS:
        items_old, items_new = po[name], pn[name]
        for item in sorted(items_old.keys() | items_new.keys()):
            vo, ro = items_old.get(item, (None, ()))
            vn, rn = items_new.get(item, (None, ()))
            if vo == vn:
                continue
            behind = dict.fromkeys((*ro, *rn))
            rules = [r for r in behind if r in suspects]
            if not rules:  # the item's own rules did not change: whatever did and can touch the field
                rules = [r for r in sorted(suspects, key=lambda r: order.get(r, len(order))) if name in rule_fields.get(r, ())]
            changes.append(
                Change(name, item, vo, vn, tuple(sorted(rules or behind, key=lambda r: (order.get(r, len(order)), r))))
            )
    return changes, firings
