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
* **An injectate bound to a modality** (ruleset.yaml ``modality_bound_injectates``, e.g.
  ``IODINATED_CONTRAST: FLUOROSCOPY``: contrast only serves to confirm the needle under
  fluoroscopy) is never SUGGESTED or CAUTION in a decision whose modality avoids, or does not
  retain, every modality it is used with: it becomes NOT_SUGGESTED, its message says why, its
  ``ruleIds`` add the modality rules behind that (those that avoid the modality, else those that
  chose the preferred one), and their explanations' outcomes say so.

  Why a declaration and a resolver step, not more rules: the contradiction comes from combining
  rules (a contrast rule that assumes fluoroscopy, a modality rule of higher precedence that
  avoids it), so no single rule can see it; every rule that avoids fluoroscopy would otherwise
  have to repeat the contrast consequence, and a new one that forgot would bring the
  contradiction back. The binding is a fact about the injectate, stated once and validated when
  the rule set loads. NOT_SUGGESTED rather than dropping the entry: the clinician sees why
  contrast is not part of this plan, and an explanation names the rule behind it.
* **Explanation outcomes** say what the rule's then-block decides in the decision's terms: a
  missing-data code template is rendered per firing, and a modality a rule prefers or avoids is
  not also listed as acceptable.
* **Messages** are for people (see ``_Template``): facts by name, values with human units, dates
  and ages; the explanations' ``matched`` keep the codes and raw units for auditors.
* **An exclusive rule** that fires (a deceased patient) is the whole decision: the other rules'
  outcomes are not added, so nothing else is asked of such a record.

The output is a typed :class:`~.decision.Decision` (:meth:`Resolver.decide`), whose one
serialiser writes the contract's decision JSON (lowerCamelCase, empty lists omitted); calling the
resolver gives that JSON.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import cast

import orjson

from . import plain
from .conditions import tag
from .decision import (
    Caution,
    Decision,
    Deferral,
    Evidence,
    Explanation,
    Injectate,
    MatchedFact,
    MissingData,
    Modality,
    ParameterUse,
    RuleHead,
    RulesetRef,
)
from .prepare import FactInfo, PreparedFacts
from .ruleset import RECOMMENDATIONS, TEMPLATE, Rule, RuleSet, parse_placeholder


@dataclass(slots=True)
class Firing:
    """One rule that fired: the alternatives that matched and the facts each alias matched."""

    rule: Rule
    matched: dict[int, dict[str, list[int]]]  # alternative -> alias -> fact ids


def _fmt_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _param_text(ruleset: RuleSet, name: str) -> str:
    """A parameter as it reads inside a code (raw: ``3``, ``20 10*9/L``)."""
    p = ruleset.params[name]
    return f"{_fmt_number(p.value)}" + (f" {p.unit}" if p.unit and not str(p.unit).startswith("{") else "")


def _plain_param(ruleset: RuleSet, name: str) -> str:
    """A parameter as people read it: ``7 days``, ``20 ×10⁹/L``, ``38 °C``, ``fluoroscopy``."""
    p = ruleset.params[name]
    if isinstance(p.value, str):
        return plain.words(p.value) if p.value.isupper() else p.value
    if isinstance(p.value, bool) or not isinstance(p.value, (int, float)):
        return str(p.value)
    return plain.quantity(p.value, p.unit)


def field_value(fact: dict, info: FactInfo, fld: str) -> str:
    """A fact's field as explanations show it to auditors: codes with their systems, numbers with
    their raw (UCUM) unit, and how a derived value came about."""
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


def _plain_what(info: FactInfo, fallback: str | None = None) -> str:
    """What a fact is, in words: its display name, never a bare ``system#code``. A coded item
    without a display is named by ``fallback`` (the title of the value set the rule matched it
    with), else as "an unnamed entry"."""
    what = info.what or info.label
    if "#" in what and " " not in what:  # a code without a display
        return fallback or "an unnamed entry"
    return what


def _value_set_names(rule: Rule | None, ruleset: RuleSet) -> dict[str, str]:
    """Per alias of ``rule``, the title of the value set its pattern matches codes with (first
    letter lower-cased unless it starts an acronym): how a message names a fact whose codes carry
    no display."""
    names: dict[str, str] = {}
    if rule is None:
        return names
    for alternative in rule.alternatives:
        for pattern in alternative:
            for test in pattern.tests:
                if (
                    pattern.alias in names
                    or test.op != "in"
                    or not isinstance(test.operand, str)
                    or test.operand not in ruleset.value_sets
                ):
                    continue
                title = ruleset.value_sets[test.operand].title
                names[pattern.alias] = title[:1].lower() + title[1:] if title[1:2].islower() else title
    return names


def plain_field(fact: dict, info: FactInfo, fld: str) -> str:
    """A fact's field as people read it in a message: the names of its codes, a number with a
    human unit and without the notes on how it was derived, plain text for strings."""
    if fld in info.codes:
        names = [c.display or f"an item coded {c.code}" for c in info.codes[fld]]
        return ", ".join(dict.fromkeys(names)) or "nothing recorded"
    if fld not in fact:
        return "not recorded"
    value = fact[fld]
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return plain.quantity(value, info.units.get(fld))
    return plain.units_in_text(str(value))


def _named_aliases(template: str) -> tuple[str, ...]:
    """The aliases a template's ``{alias.field}`` placeholders name, in order."""
    return tuple(ref.partition(".")[0] for ref in TEMPLATE.findall(template) if not ref.startswith("$"))


def _picks(named: tuple[str, ...], firing: Firing) -> list[dict[str, int]]:
    aliases = firing.matched[min(firing.matched)]
    for alias in named:
        if alias in aliases:
            return [{alias: fid} for fid in aliases[alias]]
    return [{}]


# A compiled placeholder: ("fact", alias, field, plus-days or None) or ("since", days).
_Part = str | tuple


def _compile_template(template: str, ruleset: RuleSet, human: bool) -> tuple[_Part, ...] | str:
    """``template`` as runs of fixed text (``{$param}`` filled in: parameters are fixed for a rule
    set) and placeholders that depend on the facts or the instant; or, if it names an unknown
    parameter, that name. ``human``: parameters and fields in plain words (a message), else raw
    (a missing-data code)."""
    parts: list[_Part] = []
    for i, piece in enumerate(TEMPLATE.split(template)):  # text, placeholder, text, ..., text
        if i % 2 == 0:
            text = piece
        else:
            ph = parse_placeholder(piece)
            if ph is None:  # not a placeholder at all: keep the braces
                text = "{" + piece + "}"
            elif ph.param is not None and ph.param not in ruleset.params:
                return ph.param
            elif ph.alias is None:
                assert ph.param is not None  # a placeholder without an alias is a parameter ({$param})
                if ph.modifier == "since":
                    parts.append(("since", float(ruleset.params[ph.param].value)))
                    continue
                text = _plain_param(ruleset, ph.param) if human else _param_text(ruleset, ph.param)
            else:
                plus = float(ruleset.params[ph.param].value) if ph.modifier == "plus" and ph.param is not None else None
                parts.append(("fact", ph.alias, ph.field, plus))
                continue
        if parts and isinstance(parts[-1], str):
            parts[-1] += text
        elif text:
            parts.append(text)
    return tuple(parts)


class _Template:
    """A message template, compiled once per rule set. ``render`` fills ``{alias.field}`` with the
    facts the rule matched (``pick`` chooses the fact of an alias; default: the first it matched).

    A ``human`` template is a message for people: ``{inr.value}`` reads ``3.4``, ``{vka}`` the
    drug's name, ``{inr.when}`` ``30 May 2025``, ``{inr.age}`` ``3 days ago`` and
    ``{$inr_max_age_days.since}`` the date a result must be no older than. Otherwise it is a code
    (``{issue.kind}:{issue.concept}``) and renders the raw values."""

    __slots__ = ("parts", "unknown_param", "constant", "aliases", "human", "names")

    def __init__(self, template: str, ruleset: RuleSet, human: bool = True, rule: Rule | None = None):
        self.human = human
        self.names = _value_set_names(rule, ruleset) if human else {}  # for facts without a display
        self.aliases = _named_aliases(template)  # for _picks
        compiled = _compile_template(template, ruleset, human)
        # Missing-data templates are not checked at load: one naming an unknown parameter fails
        # when its rule fires, not before.
        self.unknown_param = compiled if isinstance(compiled, str) else None
        self.parts = () if isinstance(compiled, str) else compiled
        # a template that names no fact and no date is the same text every time
        fixed = self.unknown_param is None and all(isinstance(part, str) for part in self.parts)
        self.constant = "".join(self.parts) if fixed else None  # type: ignore[arg-type]

    def render(
        self, firing: Firing, prepared: PreparedFacts, pick: dict[str, int] | None = None, now: dt.datetime | None = None
    ) -> str:
        """The text for one firing; ``now`` is the decision's instant (for ages and dates)."""
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
            if part[0] == "since":
                out.append(plain.day(now - dt.timedelta(days=part[1])) if now else "(unknown date)")
                continue
            _, alias, fld, plus = part
            if alias not in aliases:
                out.append("(not matched)")
                continue
            fid = pick.get(alias, aliases[alias][0]) if pick else aliases[alias][0]
            info = prepared.info[fid]
            out.append(self._field(prepared.facts[fid], info, alias, fld, plus, now))
        return "".join(out)

    def _field(self, fact: dict, info: FactInfo, alias: str, fld: str, plus: float | None, now: dt.datetime | None) -> str:
        if fld == "when":
            when = info.when + dt.timedelta(days=plus) if info.when is not None and plus is not None else info.when
            return plain.day(when) if self.human else (when.isoformat() if when else "(absent)")
        if fld == "age":
            return plain.relative(info.when, now) if now else "(unknown)"
        if fld in ("", "display"):
            return _plain_what(info, self.names.get(alias)) if self.human else info.label
        return plain_field(fact, info, fld) if self.human else field_value(fact, info, fld)


# Per alternative of a rule, per pattern: (alias, the entry of a negated pattern, the fields its tests name).
_PatternPlan = tuple[tuple[tuple[str, MatchedFact | None, tuple[str, ...]], ...], ...]


def _pattern_plan(rule: Rule) -> _PatternPlan:
    """Per alternative: each pattern's alias, the entry a negated one shows (it names no fact, so
    it is the same in every decision and made once), and the fields its tests name."""
    plan = []
    for alternative in rule.alternatives:
        steps = []
        for pattern in alternative:
            entry = None
            if pattern.negated:
                tests = " and ".join(t.describe() for t in pattern.tests) or "any"
                entry = MatchedFact(f"no {pattern.kind} with {tests}", "none found")
            steps.append((pattern.alias, entry, tuple(t.field for t in pattern.tests)))
        plan.append(tuple(steps))
    return tuple(plan)


def _matched_entries(firing: Firing, plan: _PatternPlan, prepared: PreparedFacts) -> tuple[MatchedFact, ...]:
    entries: list[MatchedFact] = []
    facts, infos = prepared.facts, prepared.info
    matched = firing.matched
    for alt_index in matched if len(matched) == 1 else sorted(matched):
        aliases = matched[alt_index]
        for alias, negation, fields in plan[alt_index]:
            if negation is not None:
                entries.append(negation)
                continue
            for fid in aliases.get(alias, ()):
                fact, info = facts[fid], infos[fid]
                label = info.label if not info.alike else f"{info.label} (and {info.alike:,} more alike)"
                if not fields:
                    entries.append(MatchedFact(label, "present"))
                for fld in fields:
                    entries.append(MatchedFact(f"{label}.{fld}", field_value(fact, info, fld)))
    return tuple(entries)


def _outcome_parts(rule: Rule, ruleset: RuleSet) -> list[str]:
    """What a rule's then-block decides, in the decision's own terms, without its missing-data
    code (which may be a template, rendered per firing). A modality the rule prefers or avoids is
    not also called acceptable, as the resolver would not make it so."""
    then = rule.then
    parts = []
    if then.deferral:
        d = then.deferral
        parts.append(f"defer: {d['reason']} ({d['severity']}, scope {d['scope']})")
    if then.modality:
        m = then.modality
        pref = preferred_modality(rule, ruleset.param_values())
        avoid = list(m.get("avoid", ()))
        acceptable = [x for x in m.get("acceptable", ()) if x != pref and x not in avoid]
        bits = []
        if pref:
            bits.append(f"prefer {pref}")
        if acceptable:
            bits.append("acceptable " + "/".join(acceptable))
        if avoid:
            bits.append("avoid " + "/".join(avoid))
        parts.append("modality: " + ", ".join(bits))
    for inj in then.injectates:
        parts.append(f"{inj['category']}: {inj['recommendation']}")
    if then.caution:
        parts.append(f"caution: {then.caution}")
    if rule.exclusive:
        parts.append("exclusive: when it fires, no other rule's outcome is added")
    return parts


def _outcome_text(rule: Rule, ruleset: RuleSet) -> str:
    """The outcome of a rule whose missing-data code, if any, is fixed text."""
    parts = _outcome_parts(rule, ruleset)
    if rule.then.missing_data:
        parts.append(f"missing data: {rule.then.missing_data}")
    return "; ".join(parts)


def preferred_modality(rule: Rule, params: dict) -> str | None:
    """The modality a rule prefers, a ``$parameter`` resolved against ``params`` (name -> value):
    the one reading of ``modality.preferred``; None for a rule without a modality."""
    modality = rule.then.modality
    if not modality:
        return None
    pref = modality.get("preferred")
    if isinstance(pref, str) and pref.startswith("$"):
        return params[pref[1:]]
    return pref


@dataclass(frozen=True, slots=True)
class _RulePlan:
    """Everything about one rule that the resolver needs and that does not depend on the patient."""

    head: RuleHead  # the fixed part of its explanation
    patterns: _PatternPlan  # for its explanation's matched facts
    message: _Template
    quoted: bool  # whether the decision shows its message (deferral, caution and injectate rules)
    missing_data: _Template | None  # the missing-data code it reports, if any (a raw template)
    outcome_head: str | None  # its outcome without the missing-data codes, when those vary per firing
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
        self.bound = ruleset.modality_bound_injectates
        self.rules = {r.id: r for r in ruleset.rules}
        self.ref = RulesetRef(ruleset.id, ruleset.version, ruleset.digest)

    def __call__(self, firings: list[Firing], prepared: PreparedFacts, as_of_text: str) -> dict:
        """The decision as the contract's JSON."""
        return resolve(firings, prepared, self, as_of_text).to_json()

    def decide(self, firings: list[Firing], prepared: PreparedFacts, as_of_text: str) -> Decision:
        """The decision as typed objects."""
        return resolve(firings, prepared, self, as_of_text)


def _rule_plan(rule: Rule, ruleset: RuleSet, params: dict) -> _RulePlan:
    head = _static_explanation(rule, ruleset)
    then = rule.then
    missing_data = _Template(then.missing_data, ruleset, human=False) if then.missing_data else None
    outcome_head = None
    if missing_data is not None and missing_data.constant is None:  # e.g. {issue.kind}:{issue.concept}
        outcome_head = "; ".join(_outcome_parts(rule, ruleset) + ["missing data: "])
    return _RulePlan(
        head=head,
        patterns=_pattern_plan(rule),
        message=_Template(then.message, ruleset, rule=rule),
        quoted=bool(then.deferral or then.caution or then.injectates),
        missing_data=missing_data,
        outcome_head=outcome_head,
        preferred=preferred_modality(rule, params) if then.modality else None,
        injectates=tuple((inj["category"], RECOMMENDATIONS.index(inj["recommendation"])) for inj in then.injectates),
    )


def _static_explanation(rule: Rule, ruleset: RuleSet) -> RuleHead:
    """The fixed part of a rule's explanation, with the parameters it uses."""
    return RuleHead(
        rule_id=rule.id,
        rule_version=rule.version,
        title=rule.title,
        category=rule.category,
        outcome=_outcome_text(rule, ruleset),
        rationale=rule.rationale,
        evidence=tuple(Evidence(e.citation, e.strength) for e in rule.evidence),
        parameters=tuple(ParameterUse(p, str(ruleset.params[p].value), ruleset.params[p].layer) for p in rule.params),
    )


def _requested_modality_conflicts(
    modality: dict, prepared: PreparedFacts, resolver: Resolver, firings: list[Firing]
) -> list[dict]:
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
        behind = [  # (the rules behind the modality all have a modality block)
            rid for rid in modality.get("ruleIds", []) if requested in cast(dict, rules[rid].then.modality).get("avoid", ())
        ]
        behind = behind or [
            rid for rid in modality.get("ruleIds", []) if resolver.plans[rid].preferred == modality.get("preferred")
        ]
        reasons = "; ".join(rules[rid].title[:1].lower() + rules[rid].title[1:] for rid in behind)
        suggestion = plain.words(modality["preferred"]) if modality.get("preferred") else "another modality"
        out.append(
            {
                "code": "REQUESTED_MODALITY_CONFLICT",
                "requested": requested,
                "ruleIds": behind,
                "message": [
                    f"The order asks for {plain.words(requested)} guidance; {suggestion} is suggested instead ({reasons})."
                    " This is a suggestion: the order is not blocked."
                ],
            }
        )
    return out


@dataclass(slots=True)
class _Injectate:
    """What the firings say about one injectate category, so far."""

    level: int  # the most restrictive recommendation, as its place in RECOMMENDATIONS
    rule_ids: list[str]  # every rule that spoke about it, once each
    deciding: list[str]  # the rules that recommend ``level``
    message: str | None = None  # set when the resolver, not a rule's message, says why

    def add(self, level: int, rule_id: str) -> None:
        if rule_id not in self.rule_ids:
            self.rule_ids.append(rule_id)
        if level > self.level:
            self.level, self.deciding = level, [rule_id]
        elif level == self.level:
            self.deciding.append(rule_id)


_NOT_SUGGESTED = RECOMMENDATIONS.index("NOT_SUGGESTED")


def _instant(as_of_text: str) -> dt.datetime | None:
    """The decision's instant, for ages and dates in messages (None if it cannot be read)."""
    try:
        return dt.datetime.fromisoformat(as_of_text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _unbound_injectates(
    modality: dict, by_category: dict[str, _Injectate], resolver: Resolver
) -> dict[str, tuple[list[str], str, str]]:
    """Injectates bound to modalities (``modality_bound_injectates``) that the resolved modality
    leaves out: per category, the rules behind that (the ones that avoid its modalities, else the
    ones that chose the preferred modality), the note their explanations get, and the message.

    Only an injectate suggested or cautioned by a rule is changed (to NOT_SUGGESTED); one already
    held back stays as it is, and nothing changes when no modality rule fired."""
    if not modality or not resolver.bound:
        return {}
    retained = {modality.get("preferred"), *modality.get("acceptable", ())}
    avoided = set(modality.get("avoid", ()))
    out = {}
    for category, modalities in resolver.bound.items():
        inj = by_category.get(category)
        if inj is None or inj.level >= _NOT_SUGGESTED or retained.intersection(modalities):
            continue
        rules = [resolver.rules[rid] for rid in modality["ruleIds"]]
        behind = [r.id for r in rules if avoided.intersection(modalities) & set(cast(dict, r.then.modality).get("avoid", ()))]
        behind = behind or [r.id for r in rules if resolver.plans[r.id].preferred == modality.get("preferred")]
        names = " or ".join(plain.words(m) for m in modalities)
        left_out = "is to be avoided" if avoided.issuperset(modalities) else "is not among the suggested guidance"
        what = plain.words(category)
        message = f"{what[:1].upper()}{what[1:]} is not needed: it is only used with {names}, which {left_out} for this patient."
        verb = "avoids" if avoided.issuperset(modalities) else "does not retain"
        note = f"{category} NOT_SUGGESTED: it is only used with {'/'.join(modalities)}, which this decision {verb}"
        out[category] = (behind, note, message)
    return out


def resolve(firings: list[Firing], prepared: PreparedFacts, resolver: Resolver, as_of_text: str) -> Decision:
    ruleset, order, plans = resolver.ruleset, resolver.order, resolver.plans
    now = _instant(as_of_text)
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
    explanations: list[list] = []  # [head, outcome, matched] per firing, in rule order
    for f in firings:
        rule = f.rule
        rid, then, plan = rule.id, rule.then, plans[rule.id]
        if plan.quoted:
            # most messages name no fact: their fixed text, without a call to render
            text = plan.message.constant
            messages[rid] = text if text is not None else plan.message.render(f, prepared, now=now)
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
        codes: dict[str, None] = {}
        missing_data = plan.missing_data  # a template exactly when the rule reports missing data
        if missing_data is not None:
            for pick in _picks(missing_data.aliases, f):
                code = missing_data.render(f, prepared, pick)
                codes[code] = None
                m = missing.get(code)
                if m is None:
                    m = missing[code] = {"code": code, "message": {}, "ruleIds": []}
                if rid not in m["ruleIds"]:
                    m["ruleIds"].append(rid)
                m["message"][plan.message.render(f, prepared, pick, now)] = None
        # the outcome with the codes this firing reported, rendered, when those vary
        outcome = plan.head.outcome if plan.outcome_head is None else plan.outcome_head + ", ".join(codes)
        explanations.append([plan.head, outcome, _matched_entries(f, plan.patterns, prepared)])

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
            m = cast(dict, rule.then.modality)  # mod_rules: the rules with a modality
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
                overridden[rule.id] = [preferred_by.id] if preferred_by else list(contributors)
        acceptable = [m for m in acceptable if m not in avoid and m != preferred]
        if preferred:
            modality["preferred"] = preferred
        if acceptable:
            modality["acceptable"] = acceptable
        if avoid:
            modality["avoid"] = avoid
        modality["ruleIds"] = sorted(contributors, key=order.__getitem__)

    for category, (behind, note, message) in _unbound_injectates(modality, by_category, resolver).items():
        inj = by_category[category]
        inj.level, inj.deciding, inj.message = _NOT_SUGGESTED, behind, message
        inj.rule_ids += [rid for rid in behind if rid not in inj.rule_ids]
        for exp in explanations:  # the rules behind it say so in their explanations
            if exp[0].rule_id in behind:
                exp[1] += "; " + note

    for conflict in _requested_modality_conflicts(modality, prepared, resolver, firings):
        caution = {k: v for k, v in conflict.items() if k != "requested"}
        caution["message"] = dict.fromkeys(caution["message"])
        cautions[conflict["code"] + ":" + conflict["requested"]] = caution

    # injectates: per category the most restrictive level wins, with the messages of the rules at it
    injectates = sorted(  # most restrictive first, then by category (unique, so entries never compare)
        (
            -inj.level,
            category,
            Injectate(
                category,
                RECOMMENDATIONS[inj.level],
                tuple(inj.rule_ids),
                inj.message or " ".join(dict.fromkeys([messages[rid] for rid in inj.deciding])),
            ),
        )
        for category, inj in by_category.items()
    )
    deferral_list = sorted(
        deferrals.values(), key=lambda d: (d["severity"] != "HARD", d["scope"] != "PROCEDURE", d["reason"], d["scope"])
    )

    blob = orjson.dumps([ruleset.digest, as_of_text, prepared.facts], option=orjson.OPT_SORT_KEYS)
    return Decision(
        decision_id="dec-" + hashlib.sha256(blob).hexdigest()[:32],
        as_of=as_of_text,
        ruleset=resolver.ref,
        modality=Modality(
            modality.get("preferred"),
            tuple(modality.get("acceptable", ())),
            tuple(modality.get("avoid", ())),
            tuple(modality["ruleIds"]),
        )
        if modality
        else None,
        injectates=tuple(entry for _, _, entry in injectates),
        deferrals=tuple(
            Deferral(d["reason"], d["severity"], d["scope"], tuple(d["ruleIds"]), " ".join(d["message"])) for d in deferral_list
        ),
        cautions=tuple(Caution(c["code"], tuple(c["ruleIds"]), " ".join(c["message"])) for c in cautions.values()),
        missing_data=tuple(MissingData(m["code"], " ".join(m["message"]), tuple(m["ruleIds"])) for m in missing.values()),
        explanations=tuple(
            Explanation(head, outcome, matched, tuple(overridden[head.rule_id]) if head.rule_id in overridden else None)
            for head, outcome, matched in explanations
        ),
    )
