"""From the rules that fired to the decision: explicit, explained conflict resolution.

* **Deferrals** are all listed, merged by (reason, scope); HARD wins over SOFT. A deferral scoped
  to an injectate category (e.g. CORTICOSTEROID) blocks that component only, never the procedure.
* **Cautions** and **missing data** accumulate by code; they never turn into deferrals here.
* **Modality**: fired modality rules are taken in descending ``precedence`` (ties by rule order).
  Every ``avoid`` accumulates. The first ``preferred`` not avoided by a rule of equal or higher
  precedence wins; ``acceptable`` collects the rest that nobody avoids. A rule whose whole
  contribution was overruled is kept in the explanations with ``overriddenBy``.
* **A requested modality** (the order's procedure codes, e.g. CPT 77002) that the rules avoid or
  did not retain is not blocked: a ``REQUESTED_MODALITY_CONFLICT`` caution suggests the preferred
  modality instead and names the rules behind it.
* **Injectates**: per category the most restrictive recommendation wins
  (AVOID > NOT_SUGGESTED > CAUTION > SUGGESTED); every rule that spoke about it is listed.
* **An exclusive rule** that fires (a deceased patient) is the whole decision: the other rules'
  outcomes are not added, so nothing else is asked of such a record.

The output is the contract's decision JSON (lowerCamelCase, empty lists omitted).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import orjson

from .prepare import FactInfo, PreparedFacts
from .conditions import tag
from .ruleset import RECOMMENDATIONS, Rule, RuleSet

_TEMPLATE = re.compile(r"\{([^{}]+)\}")


@dataclass(slots=True)
class Firing:
    """One rule that fired: the alternatives that matched and the facts each alias matched."""

    rule: Rule
    matched: dict[int, dict[str, list[int]]]  # alternative -> alias -> fact ids


def _fmt_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _param_text(ruleset: RuleSet, name: str) -> str:
    p = ruleset.params[name]
    return f"{_fmt_number(p.value)}" + (f" {p.unit}" if p.unit and not str(p.unit).startswith("{") else "")


def field_value(fact: dict, info: FactInfo, fld: str) -> str:
    if fld in info.codes:
        codes = info.codes[fld]
        if len(codes) == 1:  # the common case, without building a list to join
            c = codes[0]
            return f"{c.system}#{c.code} {c.display}" if c.display else f"{c.system}#{c.code}"
        return ", ".join([f"{c.system}#{c.code} {c.display}" if c.display else f"{c.system}#{c.code}" for c in codes]) or "(none)"
    if fld not in fact:
        return "(absent)"
    value = fact[fld]
    if isinstance(value, bool):
        return "true" if value else "false"
    text = _fmt_number(value)
    unit = info.units.get(fld)
    if unit:
        text = f"{text} {unit}"
    return f"{text} ({info.notes[fld]})" if fld in info.notes else text


def _named_aliases(template: str) -> tuple[str, ...]:
    """The aliases a template's ``{alias.field}`` placeholders name, in order."""
    return tuple(ref.partition(".")[0] for ref in _TEMPLATE.findall(template) if not ref.startswith("$"))


def _picks(named: tuple[str, ...], firing: Firing) -> list[dict[str, int]]:
    aliases = firing.matched[min(firing.matched)]
    for alias in named:
        if alias in aliases:
            return [{alias: fid} for fid in aliases[alias]]
    return [{}]


def _compile_template(template: str, ruleset: RuleSet) -> tuple[str | tuple[str, str], ...] | str:
    """``template`` as runs of fixed text (``{$param}`` filled in: parameters are fixed for a rule
    set) and ``(alias, field)`` references; or, if it names an unknown parameter, that name."""
    parts: list[str | tuple[str, str]] = []
    for i, piece in enumerate(_TEMPLATE.split(template)):  # text, placeholder, text, ..., text
        if i % 2 == 0:
            text = piece
        elif piece.startswith("$"):
            if piece[1:] not in ruleset.params:
                return piece[1:]
            text = _param_text(ruleset, piece[1:])
        else:
            alias, _, fld = piece.partition(".")
            parts.append((alias, fld))
            continue
        if parts and isinstance(parts[-1], str):
            parts[-1] += text
        elif text:
            parts.append(text)
    return tuple(parts)


class _Template:
    """A message template, compiled once per rule set. ``render`` fills ``{alias.field}`` with the
    facts the rule matched (``pick`` chooses the fact of an alias; default: the first it matched)."""

    __slots__ = ("parts", "unknown_param", "constant", "aliases")

    def __init__(self, template: str, ruleset: RuleSet):
        self.aliases = _named_aliases(template)  # for _picks
        compiled = _compile_template(template, ruleset)
        # Missing-data templates are not checked at load: one naming an unknown parameter fails
        # when its rule fires, not before.
        self.unknown_param = compiled if isinstance(compiled, str) else None
        self.parts = () if isinstance(compiled, str) else compiled
        # a template that names no fact is the same text every time
        fixed = self.unknown_param is None and all(isinstance(part, str) for part in self.parts)
        self.constant = "".join(self.parts) if fixed else None  # type: ignore[arg-type]

    def render(self, firing: Firing, prepared: PreparedFacts, pick: dict[str, int] | None = None) -> str:
        if self.constant is not None:
            return self.constant
        if self.unknown_param is not None:
            raise KeyError(self.unknown_param)
        aliases = firing.matched[min(firing.matched)]
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            alias, fld = part
            if alias not in aliases:
                out.append("(not matched)")
                continue
            fid = pick.get(alias, aliases[alias][0]) if pick else aliases[alias][0]
            info = prepared.info[fid]
            out.append(info.label if fld in ("", "display") else field_value(prepared.facts[fid], info, fld))
        return "".join(out)


def _pattern_plan(rule: Rule) -> tuple[tuple[tuple[str, str | None, tuple[str, ...]], ...], ...]:
    """Per alternative: each pattern's alias, the fixed text of a negated one, and the fields its
    tests name."""
    plan = []
    for alternative in rule.alternatives:
        steps = []
        for pattern in alternative:
            text = None
            if pattern.negated:
                tests = " and ".join(t.describe() for t in pattern.tests) or "any"
                text = f"no {pattern.kind} with {tests}"
            steps.append((pattern.alias, text, tuple(t.field for t in pattern.tests)))
        plan.append(tuple(steps))
    return tuple(plan)


def _matched_entries(firing: Firing, plan, prepared: PreparedFacts) -> list[dict]:
    entries: list[dict] = []
    facts, infos = prepared.facts, prepared.info
    matched = firing.matched
    for alt_index in matched if len(matched) == 1 else sorted(matched):
        aliases = matched[alt_index]
        for alias, negation_text, fields in plan[alt_index]:
            if negation_text is not None:
                entries.append({"fact": negation_text, "value": "none found"})
                continue
            for fid in aliases.get(alias, ()):
                fact, info = facts[fid], infos[fid]
                label = info.label if not info.alike else f"{info.label} (and {info.alike:,} more alike)"
                if not fields:
                    entries.append({"fact": label, "value": "present"})
                for fld in fields:
                    entries.append({"fact": f"{label}.{fld}", "value": field_value(fact, info, fld)})
    return entries


def _outcome_text(rule: Rule, ruleset: RuleSet) -> str:
    then = rule.then
    parts = []
    if then.deferral:
        d = then.deferral
        parts.append(f"defer: {d['reason']} ({d['severity']}, scope {d['scope']})")
    if then.modality:
        m = then.modality
        pref = m.get("preferred")
        if isinstance(pref, str) and pref.startswith("$"):
            pref = ruleset.params[pref[1:]].value
        bits = []
        if pref:
            bits.append(f"prefer {pref}")
        if m.get("acceptable"):
            bits.append("acceptable " + "/".join(m["acceptable"]))
        if m.get("avoid"):
            bits.append("avoid " + "/".join(m["avoid"]))
        parts.append("modality: " + ", ".join(bits))
    for inj in then.injectates:
        parts.append(f"{inj['category']}: {inj['recommendation']}")
    if then.caution:
        parts.append(f"caution: {then.caution}")
    if then.missing_data:
        parts.append(f"missing data: {then.missing_data}")
    return "; ".join(parts)


def _preferred(rule: Rule, params: dict) -> str | None:
    pref = rule.then.modality.get("preferred")
    if isinstance(pref, str) and pref.startswith("$"):
        return params[pref[1:]]
    return pref


@dataclass(frozen=True, slots=True)
class _RulePlan:
    """Everything about one rule that the resolver needs and that does not depend on the patient."""

    head: dict  # the fixed part of its explanation
    parameters: list[dict]  # the parameters it uses, for its explanation
    patterns: tuple  # _pattern_plan, for its explanation's matched facts
    message: _Template
    quoted: bool  # whether the decision shows its message (deferral, caution and injectate rules)
    missing_data: _Template | None  # the missing-data code it reports, if any
    preferred: str | None  # its preferred modality, a parameter resolved
    injectates: tuple[tuple[str, int], ...]  # (category, level in RECOMMENDATIONS) it recommends


class Resolver:
    """Conflict resolution for one rule set; everything per rule is computed once."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.params = ruleset.param_values()
        self.order = {r.id: i for i, r in enumerate(ruleset.rules)}
        self.plans = {r.id: _rule_plan(r, ruleset, self.params) for r in ruleset.rules}
        # (modality, the tag an order requesting it carries)
        self.requested = tuple((requested, tag("code", vs_id)) for requested, vs_id in ruleset.requested_modality.items())

    def __call__(self, firings: list[Firing], prepared: PreparedFacts, as_of_text: str) -> dict:
        return resolve(firings, prepared, self, as_of_text)


def _rule_plan(rule: Rule, ruleset: RuleSet, params: dict) -> _RulePlan:
    head, parameters = _static_explanation(rule, ruleset)
    then = rule.then
    return _RulePlan(
        head=head,
        parameters=parameters,
        patterns=_pattern_plan(rule),
        message=_Template(then.message, ruleset),
        quoted=bool(then.deferral or then.caution or then.injectates),
        missing_data=_Template(then.missing_data, ruleset) if then.missing_data else None,
        preferred=_preferred(rule, params) if then.modality else None,
        injectates=tuple((inj["category"], RECOMMENDATIONS.index(inj["recommendation"])) for inj in then.injectates),
    )


def _static_explanation(rule: Rule, ruleset: RuleSet) -> tuple[dict, list[dict]]:
    """The fixed part of a rule's explanation (key order as in the contract), and its parameters."""
    head = {
        "ruleId": rule.id,
        "ruleVersion": rule.version,
        "title": rule.title,
        "category": rule.category,
        "outcome": _outcome_text(rule, ruleset),
        "rationale": rule.rationale,
    }
    if rule.evidence:
        head["evidence"] = [{"citation": e.citation, "strength": e.strength} for e in rule.evidence]
    params = [{"name": p, "value": str(ruleset.params[p].value), "layer": ruleset.params[p].layer} for p in rule.params]
    return head, params


def _requested_modality_conflicts(modality: dict, prepared: PreparedFacts, resolver: Resolver, firings: list[Firing]) -> list[dict]:
    if not modality:
        return []
    order_fact = next((f for f in prepared.facts if f["t"] == "order"), None)
    if order_fact is None:
        return []
    tags = order_fact.get("_tags", ())
    out = []
    for requested, requested_tag in resolver.requested:
        if requested_tag not in tags or requested == modality.get("preferred") or requested in modality.get("acceptable", ()):
            continue
        rules = {f.rule.id: f.rule for f in firings}  # (only needed when there is a conflict)
        behind = [rid for rid in modality.get("ruleIds", []) if requested in rules[rid].then.modality.get("avoid", ())]
        behind = behind or [rid for rid in modality.get("ruleIds", []) if resolver.plans[rid].preferred == modality.get("preferred")]
        reasons = "; ".join(rules[rid].title for rid in behind)
        suggestion = modality.get("preferred", "another modality")
        out.append(
            {
                "code": "REQUESTED_MODALITY_CONFLICT",
                "requested": requested,
                "ruleIds": behind,
                "message": [f"{requested} was requested; suggest {suggestion} instead because: {reasons}. This is a suggestion; the order is not blocked."],
            }
        )
    return out


@dataclass(slots=True)
class _Injectate:
    """What the firings say about one injectate category, so far."""

    level: int  # the most restrictive recommendation, as its place in RECOMMENDATIONS
    rule_ids: list[str]  # every rule that spoke about it, once each
    deciding: list[str]  # the rules that recommend ``level``

    def add(self, level: int, rule_id: str) -> None:
        if rule_id not in self.rule_ids:
            self.rule_ids.append(rule_id)
        if level > self.level:
            self.level, self.deciding = level, [rule_id]
        elif level == self.level:
            self.deciding.append(rule_id)


def resolve(firings: list[Firing], prepared: PreparedFacts, resolver: Resolver, as_of_text: str) -> dict:
    ruleset, order, plans = resolver.ruleset, resolver.order, resolver.plans
    exclusive = [f for f in firings if f.rule.exclusive]
    if exclusive:  # e.g. a deceased patient: that is the whole answer, and nothing else is asked
        firings = exclusive
    firings = sorted(firings, key=lambda f: order[f.rule.id])

    # One pass over the firings, in rule order, collects what each one says and explains it.
    # Only deferrals, cautions and injectates show a rule's message (missing data renders its own,
    # per fact), so the messages of other rules are not rendered at all. The messages of one
    # deferral, caution or missing-data entry are gathered as the keys of a dict, which keeps each
    # distinct one once and in order, and joined at the end.
    messages: dict[str, str] = {}
    mod_rules: list[Rule] = []
    by_category: dict[str, _Injectate] = {}
    deferrals: dict[tuple[str, str], dict] = {}
    cautions: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    explanations: list[dict] = []
    for f in firings:
        rule = f.rule
        rid, then, plan = rule.id, rule.then, plans[rule.id]
        if plan.quoted:
            messages[rid] = plan.message.render(f, prepared)
        if then.modality:
            mod_rules.append(rule)
        for category, level in plan.injectates:
            inj = by_category.get(category)
            if inj is None:
                by_category[category] = _Injectate(level, [rid], [rid])
            else:
                inj.add(level, rid)
        if then.deferral:
            key = (then.deferral["reason"], then.deferral["scope"])
            d = deferrals.get(key)
            if d is None:
                d = deferrals[key] = {"reason": key[0], "severity": "SOFT", "scope": key[1], "ruleIds": [], "message": {}}
            if then.deferral["severity"] == "HARD":
                d["severity"] = "HARD"
            d["ruleIds"].append(rid)
            d["message"][messages[rid]] = None
        if then.caution:
            c = cautions.get(then.caution)
            if c is None:
                c = cautions[then.caution] = {"code": then.caution, "ruleIds": [], "message": {}}
            c["ruleIds"].append(rid)
            c["message"][messages[rid]] = None
        if then.missing_data:
            for pick in _picks(plan.missing_data.aliases, f):
                code = plan.missing_data.render(f, prepared, pick)
                m = missing.get(code)
                if m is None:
                    m = missing[code] = {"code": code, "message": {}, "ruleIds": []}
                if rid not in m["ruleIds"]:
                    m["ruleIds"].append(rid)
                m["message"][plan.message.render(f, prepared, pick)] = None
        exp = dict(plan.head)
        exp["matched"] = _matched_entries(f, plan.patterns, prepared)
        if plan.parameters:
            exp["parameters"] = plan.parameters
        explanations.append(exp)

    # modality
    modality: dict = {}
    overridden: dict[str, list[str]] = {}
    mod_rules.sort(key=lambda r: -r.precedence)  # stable: rule order among equal precedence
    if mod_rules:
        avoid: list[str] = []
        preferred: str | None = None
        preferred_by: Rule | None = None
        acceptable: list[str] = []
        contributors: list[str] = []
        for rule in mod_rules:
            m = rule.then.modality
            contributed = False
            for mod in m.get("avoid", ()):
                if mod == preferred and preferred_by is not None and preferred_by.precedence > rule.precedence:
                    continue  # a lower-precedence rule cannot veto what a higher one chose
                if mod not in avoid:
                    avoid.append(mod)
                contributed = True
            pref = plans[rule.id].preferred
            if pref and preferred is None and pref not in avoid:
                preferred, preferred_by, contributed = pref, rule, True
            for mod in ((pref,) if pref and pref != preferred else ()) + tuple(m.get("acceptable", ())):
                if mod not in avoid and mod != preferred and mod not in acceptable:
                    acceptable.append(mod)
                    contributed = True
                elif mod == preferred:
                    contributed = True
            if contributed:
                contributors.append(rule.id)
            else:
                overridden[rule.id] = [preferred_by.id] if preferred_by else [r for r in contributors]
        acceptable = [m for m in acceptable if m not in avoid and m != preferred]
        if preferred:
            modality["preferred"] = preferred
        if acceptable:
            modality["acceptable"] = acceptable
        if avoid:
            modality["avoid"] = avoid
        modality["ruleIds"] = sorted(contributors, key=order.get)
    if overridden:  # the explanation of a rule whose whole contribution was overruled says by whom
        for exp in explanations:
            if exp["ruleId"] in overridden:
                exp["overriddenBy"] = overridden[exp["ruleId"]]

    for conflict in _requested_modality_conflicts(modality, prepared, resolver, firings):
        caution = {k: v for k, v in conflict.items() if k != "requested"}
        caution["message"] = dict.fromkeys(caution["message"])
        cautions[conflict["code"] + ":" + conflict["requested"]] = caution

    # injectates: per category the most restrictive level wins, with the messages of the rules at it
    injectates = []
    for category, inj in by_category.items():
        entry = {
            "category": category,
            "recommendation": RECOMMENDATIONS[inj.level],
            "ruleIds": inj.rule_ids,
            "message": " ".join(dict.fromkeys([messages[rid] for rid in inj.deciding])),
        }
        injectates.append((-inj.level, category, entry))
    injectates.sort()  # most restrictive first, then by category (unique, so entries never compare)

    for group in (deferrals.values(), cautions.values(), missing.values()):
        for item in group:
            item["message"] = " ".join(item["message"])
    deferral_list = sorted(deferrals.values(), key=lambda d: (d["severity"] != "HARD", d["scope"] != "PROCEDURE", d["reason"], d["scope"]))

    blob = orjson.dumps([ruleset.digest, as_of_text, prepared.facts], option=orjson.OPT_SORT_KEYS)
    decision = {
        "decisionId": "dec-" + hashlib.sha256(blob).hexdigest()[:32],
        "asOf": as_of_text,
        "ruleset": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
    }
    # the parts in contract order; empty ones are left out
    if modality:
        decision["modality"] = modality
    if injectates:
        decision["injectates"] = [entry for _, _, entry in injectates]
    if deferral_list:
        decision["deferrals"] = deferral_list
    if cautions:
        decision["cautions"] = list(cautions.values())
    if missing:
        decision["missingData"] = list(missing.values())
    if explanations:
        decision["explanations"] = explanations
    return decision
