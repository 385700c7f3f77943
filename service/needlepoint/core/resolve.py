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

The output is the contract's decision JSON (lowerCamelCase, empty lists omitted).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import orjson

from .prepare import FactInfo, PreparedFacts
from .conditions import Pattern
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
        return ", ".join(f"{c.system}#{c.code}" + (f" {c.display}" if c.display else "") for c in codes) or "(none)"
    if fld not in fact:
        return "(absent)"
    value = fact[fld]
    if isinstance(value, bool):
        return "true" if value else "false"
    text = _fmt_number(value)
    unit = info.units.get(fld)
    text = f"{text} {unit}" if unit else text
    return f"{text} ({info.notes[fld]})" if fld in info.notes else text


def render_message(template: str, firing: Firing, prepared: PreparedFacts, ruleset: RuleSet, pick: dict[str, int] | None = None) -> str:
    """Fill ``{alias.field}`` and ``{$param}`` placeholders. ``pick`` chooses the fact of an alias
    (default: the first fact it matched)."""
    alternative = min(firing.matched)
    aliases = firing.matched[alternative]

    def substitute(m: re.Match) -> str:
        ref = m.group(1)
        if ref.startswith("$"):
            return _param_text(ruleset, ref[1:])
        alias, _, fld = ref.partition(".")
        if alias not in aliases:
            return "(not matched)"
        fid = (pick or {}).get(alias, aliases[alias][0])
        fact, info = prepared.facts[fid], prepared.info[fid]
        if fld in ("", "display"):
            return info.label
        return field_value(fact, info, fld)

    return _TEMPLATE.sub(substitute, template)


def per_fact_renderings(template: str, firing: Firing) -> list[dict[str, int]]:
    """One ``pick`` per fact of the first alias a template names, so that a rule matching several
    facts (e.g. several set-aside values) yields one entry each; ``[{}]`` if it names none."""
    aliases = firing.matched[min(firing.matched)]
    for ref in _TEMPLATE.findall(template):
        alias = ref.partition(".")[0]
        if not ref.startswith("$") and alias in aliases:
            return [{alias: fid} for fid in aliases[alias]]
    return [{}]


def _pattern_plan(rule: Rule) -> tuple[tuple[tuple[Pattern, str | None], ...], ...]:
    """Per alternative: each pattern, with the fixed text of a negated one."""
    plan = []
    for alternative in rule.alternatives:
        steps = []
        for pattern in alternative:
            text = None
            if pattern.negated:
                tests = " and ".join(t.describe() for t in pattern.tests) or "any"
                text = f"no {pattern.kind} with {tests}"
            steps.append((pattern, text))
        plan.append(tuple(steps))
    return tuple(plan)


def _matched_entries(firing: Firing, plan, prepared: PreparedFacts) -> list[dict]:
    entries: list[dict] = []
    facts, infos = prepared.facts, prepared.info
    for alt_index, aliases in sorted(firing.matched.items()):
        for pattern, negation_text in plan[alt_index]:
            if negation_text is not None:
                entries.append({"fact": negation_text, "value": "none found"})
                continue
            for fid in aliases.get(pattern.alias, ()):
                fact, info = facts[fid], infos[fid]
                if not pattern.tests:
                    entries.append({"fact": info.label, "value": "present"})
                for test in pattern.tests:
                    entries.append({"fact": f"{info.label}.{test.field}", "value": field_value(fact, info, test.field)})
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


class Resolver:
    """Conflict resolution for one rule set; per-rule static text is computed once."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.params = ruleset.param_values()
        self.order = {r.id: i for i, r in enumerate(ruleset.rules)}
        self.static = {r.id: _static_explanation(r, ruleset) for r in ruleset.rules}
        self.plans = {r.id: _pattern_plan(r) for r in ruleset.rules}

    def __call__(self, firings: list[Firing], prepared: PreparedFacts, as_of_text: str) -> dict:
        return resolve(firings, prepared, self, as_of_text)


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


def _requested_modality_conflicts(modality: dict, prepared: PreparedFacts, resolver: Resolver, rules: dict[str, Rule]) -> list[dict]:
    order_fact = next((f for f in prepared.facts if f["t"] == "order"), None)
    if not modality or order_fact is None:
        return []
    tags = set(order_fact.get("_tags", ()))
    out = []
    for requested, vs_id in resolver.ruleset.requested_modality.items():
        if f"code@{vs_id}" not in tags or requested == modality.get("preferred") or requested in modality.get("acceptable", ()):
            continue
        behind = [rid for rid in modality.get("ruleIds", []) if requested in rules[rid].then.modality.get("avoid", ())]
        behind = behind or [rid for rid in modality.get("ruleIds", []) if _preferred(rules[rid], resolver.params) == modality.get("preferred")]
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


def resolve(firings: list[Firing], prepared: PreparedFacts, resolver: Resolver, as_of_text: str) -> dict:
    ruleset, params, order = resolver.ruleset, resolver.params, resolver.order
    firings = sorted(firings, key=lambda f: order[f.rule.id])
    messages = {f.rule.id: render_message(f.rule.then.message, f, prepared, ruleset) for f in firings}
    overridden: dict[str, list[str]] = {}

    # modality
    modality: dict = {}
    mod_rules = sorted((f.rule for f in firings if f.rule.then.modality), key=lambda r: (-r.precedence, order[r.id]))
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
            pref = _preferred(rule, params)
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
        modality = {"ruleIds": sorted(contributors, key=order.get)}
        if preferred:
            modality["preferred"] = preferred
        if acceptable:
            modality["acceptable"] = acceptable
        if avoid:
            modality["avoid"] = avoid
        modality = {k: modality[k] for k in ("preferred", "acceptable", "avoid", "ruleIds") if k in modality}

    conflicts = _requested_modality_conflicts(modality, prepared, resolver, {f.rule.id: f.rule for f in firings})

    # injectates
    by_category: dict[str, list[tuple[str, Rule]]] = {}
    for f in firings:
        for inj in f.rule.then.injectates:
            by_category.setdefault(inj["category"], []).append((inj["recommendation"], f.rule))
    injectates = []
    for category, entries in by_category.items():
        level = max(RECOMMENDATIONS.index(rec) for rec, _ in entries)
        deciding = [rule.id for rec, rule in entries if RECOMMENDATIONS.index(rec) == level]
        entry = {
            "category": category,
            "recommendation": RECOMMENDATIONS[level],
            "ruleIds": list(dict.fromkeys(rule.id for _, rule in entries)),
            "message": " ".join(dict.fromkeys(messages[r] for r in deciding)),
        }
        injectates.append(entry)
    injectates.sort(key=lambda e: (-RECOMMENDATIONS.index(e["recommendation"]), e["category"]))

    # deferrals, cautions, missing data
    deferrals: dict[tuple[str, str], dict] = {}
    cautions: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    for f in firings:
        then, rid = f.rule.then, f.rule.id
        if then.deferral:
            key = (then.deferral["reason"], then.deferral["scope"])
            d = deferrals.setdefault(key, {"reason": key[0], "severity": "SOFT", "scope": key[1], "ruleIds": [], "message": []})
            if then.deferral["severity"] == "HARD":
                d["severity"] = "HARD"
            d["ruleIds"].append(rid)
            d["message"].append(messages[rid])
        if then.caution:
            c = cautions.setdefault(then.caution, {"code": then.caution, "ruleIds": [], "message": []})
            c["ruleIds"].append(rid)
            c["message"].append(messages[rid])
        if then.missing_data:
            for pick in per_fact_renderings(then.missing_data, f):
                code = render_message(then.missing_data, f, prepared, ruleset, pick)
                m = missing.setdefault(code, {"code": code, "message": [], "ruleIds": []})
                if rid not in m["ruleIds"]:
                    m["ruleIds"].append(rid)
                m["message"].append(render_message(then.message, f, prepared, ruleset, pick))
    for conflict in conflicts:
        cautions[conflict["code"] + ":" + conflict["requested"]] = {k: v for k, v in conflict.items() if k != "requested"}
    for group in (deferrals.values(), cautions.values(), missing.values()):
        for item in group:
            item["message"] = " ".join(dict.fromkeys(item["message"]))
    deferral_list = sorted(deferrals.values(), key=lambda d: (d["severity"] != "HARD", d["scope"] != "PROCEDURE", d["reason"], d["scope"]))

    explanations = []
    for f in firings:
        head, parameters = resolver.static[f.rule.id]
        exp = dict(head)
        exp["matched"] = _matched_entries(f, resolver.plans[f.rule.id], prepared)
        if parameters:
            exp["parameters"] = parameters
        if f.rule.id in overridden:
            exp["overriddenBy"] = overridden[f.rule.id]
        explanations.append(exp)

    decision = {
        "decisionId": "",
        "asOf": as_of_text,
        "ruleset": {"id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest},
        "modality": modality,
        "injectates": injectates,
        "deferrals": deferral_list,
        "cautions": list(cautions.values()),
        "missingData": list(missing.values()),
        "explanations": explanations,
    }
    decision = {k: v for k, v in decision.items() if v not in ([], {})}
    blob = orjson.dumps([ruleset.digest, as_of_text, prepared.facts], option=orjson.OPT_SORT_KEYS)
    decision["decisionId"] = "dec-" + hashlib.sha256(blob).hexdigest()[:32]
    return decision

