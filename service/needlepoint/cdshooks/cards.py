"""Decision -> CDS Hooks cards: a pure function of the decision, the rule set and the draft order.

Every part of a decision becomes a card the clinician can act on or dismiss, in the decision's
own order:

* a **deferral** is a ``critical`` card (HARD) or a ``warning`` card (SOFT), with the 3.0
  non-adherence override reasons that fit "proceed anyway". A ``PENDING_DATA`` deferral is the
  pending-data card: each missing value a rule behind it looks for (its negated observation
  patterns, read from the rule set) becomes a suggestion that *creates* the lab order, e.g. a
  ServiceRequest for INR (LOINC 6301-6);
* the **modality** is one card; when the draft order does not already ask for the preferred
  guidance, its suggestions *update* the draft ServiceRequest to the suggested guidance (CPT
  20610 + 77002 for fluoroscopy, 20611 for ultrasound), the preferred one recommended;
* **injectates**: one ``info`` card for those suggested, one card for each that is not;
* **cautions** are ``info`` cards; **missing data** no deferral asks for is one ``info`` card.

Each card names the rule(s) and the facts they matched (``detail``), carries ``source.topic`` (the
rule family: the rule set's category of the rule behind it), a ``links`` entry to the decision's
explanation page, a ``uuid`` and, in ``extension``, the decision id, the rule ids and the order.
UUIDs are derived (uuid5) from the hook instance, the decision id and the card's role, so the
same decision for the same call gives the same cards byte for byte, and feedback on a repeated
call lands on the same card.

The words are the coordinator view's (``needlepoint.views.coordinator``): a deferral card opens
with the same ``Bleeding risk: not now.`` and message the CLI prints and the explanation page
shows, the modality card with the same ``Use fluoroscopy (X-ray); ...`` and ``Because: ...``, an
injectate card with the same ``Corticosteroid (steroid): avoid.``. What only a card has (the
suggestions, the order it would change, the rule and its facts for the clinician) is added here.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from needlepoint.core.ruleset import RuleSet
from needlepoint.views.coordinator import deferral_item, injectate_item, modality_item, titles_by_rule

JSON = dict[str, Any]

CPT = "http://www.ama-assn.org/go/cpt"
LOINC = "http://loinc.org"
RULE_FAMILY_SYSTEM = "http://needlepoint.dev/fhir/CodeSystem/rule-family"
NON_ADHERENCE = "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes"
EXT_DECISION = "dev.needlepoint.decisionId"
EXT_RULES = "dev.needlepoint.ruleIds"
EXT_ORDER = "dev.needlepoint.order"
_NAMESPACE = uuid.UUID("4b0c0c49-3a49-4c4e-9d3a-6e65656470a1")  # Needlepoint's card-id namespace
MAX_SUMMARY = 139  # the spec wants fewer than 140 characters

# The rule set's rule categories, shown as the card topic.
_FAMILY_DISPLAY = {
    "deferral": "Reasons to defer",
    "data": "Data needed before the procedure",
    "modality": "Guidance modality",
    "injectate": "Injectates",
    "caution": "Cautions",
}

# Override reasons (3.0 example code system, exact displays) offered when a clinician proceeds
# despite a card.
_DEFERRAL_OVERRIDES = (
    ("action-completed", "Recommended action was already completed"),
    ("patient-ineligible", "Patient does not meet eligibility for recommended action"),
    ("risk-benefit-ratio", "Recipient assessment of risk/benefit ratio"),
    ("expert-contradicts", "Advice from expert contradicts the recommended action"),
    ("policy-contradicts", "Institutional policy/guideline contradicts the recommended action"),
)
_GUIDANCE_OVERRIDES = (
    ("service-not-available", "Treatment or service is not practically available"),
    ("prefers-alternative", "Patient prefers an alternative approach or treatment"),
    ("action-unsuccessful", "Recommended action was previously unsuccessful"),
    ("policy-contradicts", "Institutional policy/guideline contradicts the recommended action"),
)
_INJECTATE_OVERRIDES = (
    ("risk-benefit-ratio", "Recipient assessment of risk/benefit ratio"),
    ("patient-ineligible", "Patient does not meet eligibility for recommended action"),
    ("expert-contradicts", "Advice from expert contradicts the recommended action"),
)

# The CPT codes an order carries for each guidance (AAPC: fluoroscopy-guided = 20610 + 77002;
# ultrasound-guided = 20611 alone; landmark = 20610 alone). Hip arthrography (27093/27095)
# includes fluoroscopy and never takes 77002.
_GUIDANCE_CPT: dict[str, tuple[tuple[str, str], ...]] = {
    "FLUOROSCOPY": (
        ("20610", "Arthrocentesis, aspiration and/or injection, major joint or bursa"),
        ("77002", "Fluoroscopic guidance for needle placement"),
    ),
    "ULTRASOUND": (("20611", "Arthrocentesis, aspiration and/or injection, major joint or bursa, with ultrasound guidance"),),
    "LANDMARK": (("20610", "Arthrocentesis, aspiration and/or injection, major joint or bursa"),),
}
_GUIDANCE_CODES = frozenset({"20610", "20611", "77002"})
_ARTHROGRAPHY = frozenset({"27093", "27095"})
_MODALITY_WORDS = {"FLUOROSCOPY": "fluoroscopy", "ULTRASOUND": "ultrasound", "LANDMARK": "landmark (no imaging)"}


@dataclass(frozen=True)
class OrderContext:
    """The draft order a decision is about, and what a suggestion needs to refer to the patient.

    ``reference`` is how the order is named in the request (``ServiceRequest/id``); ``resource``
    the draft ServiceRequest as the client sent it (suggestions update a copy, never it).
    """

    reference: str
    resource: JSON
    patient_id: str
    encounter_id: str | None = None


def shorten(text: str, limit: int = MAX_SUMMARY) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, with an ellipsis if cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "…"


def first_sentence(text: str) -> str:
    """The text up to its first full stop followed by a space (or all of it)."""
    head, sep, _ = text.partition(". ")
    return head + "." if sep else text


def _coding(system: str, code: str, display: str) -> JSON:
    return {"system": system, "code": code, "display": display}


def _md(text: Any) -> str:
    """Text safe inside Markdown: no HTML, no emphasis or link syntax from data."""
    out = str(text)
    for ch in "\\`*_[]<>#|":
        out = out.replace(ch, "\\" + ch)
    return out


class CardBuilder:
    """Renders one decision about one order. Pure: same inputs, same cards."""

    def __init__(
        self,
        decision: Mapping[str, Any],
        ruleset: RuleSet,
        order: OrderContext,
        *,
        hook_instance: str,
        explanation_url: str,
        source_url: str | None = None,
    ) -> None:
        self.decision = decision
        self.ruleset = ruleset
        self.order = order
        self.hook_instance = hook_instance
        self.explanation_url = explanation_url
        self.source_url = source_url
        self.decision_id = str(decision.get("decisionId", ""))
        self.explanations = {e["ruleId"]: e for e in decision.get("explanations", ()) if "ruleId" in e}
        rs = decision.get("ruleset", {})
        self.label = f"Needlepoint · {rs.get('id', ruleset.id)} {rs.get('version', ruleset.version)}"

    # -- the whole set

    def cards(self) -> list[JSON]:
        cards: list[JSON] = []
        deferrals = list(self.decision.get("deferrals", ()))
        covered_missing: set[int] = set()
        for i, deferral in enumerate(deferrals):
            cards.append(self._deferral(i, deferral, covered_missing))
        modality = self.decision.get("modality")
        if modality and modality.get("preferred"):
            cards.append(self._modality(modality))
        cards.extend(self._injectates(self.decision.get("injectates", ())))
        for i, caution in enumerate(self.decision.get("cautions", ())):
            cards.append(self._caution(i, caution))
        leftover = [m for i, m in enumerate(self.decision.get("missingData", ())) if i not in covered_missing]
        if leftover:
            cards.append(self._missing(leftover))
        return cards

    # -- common parts

    def _uuid(self, role: str) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.hook_instance}|{self.decision_id}|{self.order.reference}|{role}"))

    def _family(self, rule_ids: Sequence[str], default: str) -> str:
        for rule_id in rule_ids:
            category = self.explanations.get(rule_id, {}).get("category")
            if category in _FAMILY_DISPLAY:
                return category
        return default

    def _card(
        self,
        role: str,
        *,
        summary: str,
        indicator: str,
        rule_ids: Sequence[str],
        family: str,
        lead: str,
        overrides: Iterable[tuple[str, str]] = (),
        suggestions: list[JSON] | None = None,
        selection: str | None = None,
    ) -> JSON:
        source: JSON = {
            "label": self.label,
            "topic": _coding(RULE_FAMILY_SYSTEM, family, _FAMILY_DISPLAY.get(family, family)),
        }
        if self.source_url:
            source["url"] = self.source_url
        card: JSON = {
            "uuid": self._uuid(role),
            "summary": shorten(summary),
            "detail": self._detail(lead, rule_ids),
            "indicator": indicator,
            "source": source,
        }
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = selection or "at-most-one"
        reasons = [_coding(NON_ADHERENCE, code, display) for code, display in overrides]
        if reasons:
            card["overrideReasons"] = reasons
        anchor = f"#rule-{rule_ids[0]}" if rule_ids else ""
        card["links"] = [{"label": "Why: the decision explained", "url": f"{self.explanation_url}{anchor}", "type": "absolute"}]
        extension: JSON = {EXT_DECISION: self.decision_id, EXT_ORDER: self.order.reference}
        if rule_ids:
            extension[EXT_RULES] = list(rule_ids)
        card["extension"] = extension
        return card

    def _detail(self, lead: str, rule_ids: Sequence[str]) -> str:
        """Markdown: the message, then each rule with its title, the facts it matched and its sources."""
        lines = [_md(lead)]
        for rule_id in rule_ids:
            explanation = self.explanations.get(rule_id)
            if explanation is None:
                lines.append(f"\n**Rule** {_md(rule_id)}")
                continue
            lines.append(
                f"\n**Rule** {_md(rule_id)} {_md(explanation.get('ruleVersion', ''))}: {_md(explanation.get('title', ''))}"
            )
            matched = explanation.get("matched", ())
            if matched:
                lines.append("\n**Facts**")
                lines.extend(f"- {_md(m.get('fact', ''))}: {_md(m.get('value', ''))}" for m in matched)
            evidence = explanation.get("evidence", ())
            if evidence:
                lines.append(
                    "\n**Evidence**: " + "; ".join(_md(f"{e.get('citation', '')} ({e.get('strength', '')})") for e in evidence)
                )
        return "\n".join(lines).strip()

    # -- deferrals and pending data

    def _deferral(self, index: int, deferral: Mapping[str, Any], covered: set[int]) -> JSON:
        reason, severity = deferral.get("reason", ""), deferral.get("severity", "")
        rule_ids = list(deferral.get("ruleIds", ()))
        message = deferral.get("message", "")
        said = deferral_item(deferral)  # "Bleeding risk: not now." - the coordinator's words
        summary = f"{said.headline} {first_sentence(message)}"
        suggestions: list[JSON] = []
        if reason == "PENDING_DATA":
            for i, item in enumerate(self.decision.get("missingData", ())):
                if set(item.get("ruleIds", ())) & set(rule_ids):
                    covered.add(i)
            suggestions = self._lab_suggestions(rule_ids, index)
        card = self._card(
            f"deferral-{index}-{reason}",
            summary=summary,
            indicator="critical" if severity == "HARD" else "warning",
            rule_ids=rule_ids,
            family=self._family(rule_ids, "deferral"),
            lead=" ".join([said.headline, *said.details]),
            overrides=_DEFERRAL_OVERRIDES,
            suggestions=suggestions,
            # alternatives for one rule (pregnancy status or an hCG test): one is enough;
            # tests several rules need are independent
            selection="any" if len({s["_rule"] for s in suggestions}) > 1 else "at-most-one",
        )
        return self._strip(card)

    @staticmethod
    def _strip(card: JSON) -> JSON:
        """Remove the builder's private bookkeeping from suggestions."""
        for suggestion in card.get("suggestions", ()):
            suggestion.pop("_rule", None)
        return card

    def _lab_suggestions(self, rule_ids: Sequence[str], index: int) -> list[JSON]:
        """One 'order this test' suggestion per observation concept a rule behind a PENDING_DATA
        deferral looks for and did not find (its negated observation patterns)."""
        suggestions: list[JSON] = []
        seen: set[str] = set()
        for rule_id in rule_ids:
            try:
                rule = self.ruleset.rule(rule_id)
            except KeyError:
                continue
            for alternative in rule.alternatives:
                for pattern in alternative:
                    if not (pattern.negated and pattern.kind == "observation"):
                        continue
                    for test in pattern.tests:
                        if test.field == "concept" and test.op == "eq" and test.operand in self.ruleset.observations:
                            concept = self.ruleset.observations[test.operand]
                            loinc = sorted(c.partition("#")[2] for c in concept.codes if c.startswith("loinc#"))
                            if concept.id in seen or not loinc:
                                continue
                            seen.add(concept.id)
                            code = _preferred_loinc(loinc)
                            suggestions.append(self._lab_order(concept.id, concept.title, code, rule_id, index))
        return suggestions

    def _lab_order(self, concept: str, title: str, loinc: str, rule_id: str, index: int) -> JSON:
        resource: JSON = {
            "resourceType": "ServiceRequest",
            "status": "draft",
            "intent": "order",
            "category": [{"coding": [_coding("http://snomed.info/sct", "108252007", "Laboratory procedure")]}],
            "code": {"coding": [_coding(LOINC, loinc, title)], "text": title},
            "subject": {"reference": f"Patient/{self.order.patient_id}"},
            "reasonCode": [{"text": f"Needed before the hip injection ({self.order.reference}); rule {rule_id}"}],
        }
        if self.order.encounter_id:
            resource["encounter"] = {"reference": f"Encounter/{self.order.encounter_id}"}
        return {
            "label": f"Order {title} (LOINC {loinc})",
            "uuid": self._uuid(f"deferral-{index}-lab-{concept}"),
            "actions": [
                {"type": "create", "description": f"Create a draft {title} order (LOINC {loinc}).", "resource": resource}
            ],
            "_rule": rule_id,
        }

    # -- modality

    def _requested_modalities(self) -> set[str]:
        """The guidance the draft order already asks for, by the rule set's own order-code value sets."""
        codes = [(c.get("system"), c.get("code")) for c in _codings(self.order.resource.get("code"))]
        requested = set()
        for modality, value_set_id in self.ruleset.requested_modality.items():
            value_set = self.ruleset.value_sets.get(value_set_id)
            if value_set and any(
                system == CPT and isinstance(code, str) and value_set.contains("cpt", code) for system, code in codes
            ):
                requested.add(modality)
        return requested

    def _modality(self, modality: Mapping[str, Any]) -> JSON:
        preferred = modality["preferred"]
        acceptable = [m for m in modality.get("acceptable", ()) if m != preferred]
        avoid = list(modality.get("avoid", ()))
        rule_ids = list(modality.get("ruleIds", ()))
        requested = self._requested_modalities()
        said = modality_item(dict(modality), titles_by_rule(dict(self.decision)))  # the coordinator's words
        parts = [said.headline, *said.details] if said is not None else []
        if preferred in requested:
            return self._card(
                "modality",
                summary=f"Guidance: {_MODALITY_WORDS.get(preferred, preferred)}, as ordered.",
                indicator="info",
                rule_ids=rule_ids,
                family=self._family(rule_ids, "modality"),
                lead=" ".join(parts),
            )
        suggestions = []
        for modality_code in [preferred, *acceptable]:
            suggestion = self._guidance_update(modality_code, recommended=modality_code == preferred)
            if suggestion is not None:
                suggestions.append(suggestion)
        ordered = ", ".join(_MODALITY_WORDS.get(m, m) for m in sorted(requested)) or "no guidance stated"
        avoided = bool(requested & set(avoid))
        summary = f"Suggest {_MODALITY_WORDS.get(preferred, preferred)} guidance (ordered: {ordered})."
        return self._card(
            "modality",
            summary=summary,
            indicator="warning" if avoided else "info",
            rule_ids=rule_ids,
            family=self._family(rule_ids, "modality"),
            lead=" ".join(parts) + f" The order asks for: {ordered}.",
            overrides=_GUIDANCE_OVERRIDES,
            suggestions=suggestions,
            selection="at-most-one",
        )

    def _guidance_update(self, modality: str, *, recommended: bool) -> JSON | None:
        """A suggestion that updates the draft ServiceRequest to ``modality``'s CPT codes."""
        wanted = _GUIDANCE_CPT.get(modality)
        resource = self.order.resource
        if not wanted or not isinstance(resource.get("id"), str):
            return None  # an order without an id cannot be updated in place
        updated = copy.deepcopy(resource)
        concept = code if isinstance(code := updated.get("code"), dict) else {}
        kept = [c for c in _codings(concept) if not (c.get("system") == CPT and c.get("code") in _GUIDANCE_CODES)]
        arthrography = any(c.get("system") == CPT and c.get("code") in _ARTHROGRAPHY for c in kept)
        if arthrography and modality == "FLUOROSCOPY":
            added: list[JSON] = []  # the arthrography code already implies fluoroscopy
        else:
            added = [_coding(CPT, code, display) for code, display in wanted]
        codes_text = " + ".join(c["code"] for c in added) or "arthrography code unchanged"
        new_concept = {k: v for k, v in concept.items() if k not in ("coding", "text")}
        new_concept["coding"] = kept + added
        new_concept["text"] = f"Hip injection, {_MODALITY_WORDS.get(modality, modality)} guidance"
        updated["code"] = new_concept
        word = _MODALITY_WORDS.get(modality, modality)
        suggestion: JSON = {
            "label": f"Change to {word} guidance (CPT {codes_text})",
            "uuid": self._uuid(f"modality-{modality}"),
            "actions": [
                {
                    "type": "update",
                    "description": f"Update {self.order.reference} to {word} guidance (CPT {codes_text}).",
                    "resource": updated,
                }
            ],
        }
        if recommended:
            suggestion["isRecommended"] = True
        return suggestion

    # -- injectates, cautions, missing data

    def _injectates(self, injectates: Iterable[Mapping[str, Any]]) -> list[JSON]:
        cards = []
        suggested = [i for i in injectates if i.get("recommendation") == "SUGGESTED"]
        if suggested:
            rule_ids = list(dict.fromkeys(r for i in suggested for r in i.get("ruleIds", ())))
            lead = " ".join(" ".join([item.headline, *item.details]) for item in map(injectate_item, suggested))
            cards.append(
                self._card(
                    "injectates-suggested",
                    summary=" ".join(injectate_item(dict(i)).headline for i in suggested),
                    indicator="info",
                    rule_ids=rule_ids,
                    family=self._family(rule_ids, "injectate"),
                    lead=lead,
                )
            )
        for item in injectates:
            recommendation = item.get("recommendation")
            if recommendation == "SUGGESTED":
                continue
            rule_ids = list(item.get("ruleIds", ()))
            message = item.get("message", "")
            said = injectate_item(dict(item))  # "Iodinated contrast (X-ray dye): avoid." - the coordinator's words
            cards.append(
                self._card(
                    f"injectate-{item.get('category')}",
                    summary=f"{said.headline} {first_sentence(message)}",
                    indicator="critical" if recommendation == "AVOID" else "warning",
                    rule_ids=rule_ids,
                    family=self._family(rule_ids, "injectate"),
                    lead=" ".join([said.headline, *said.details]),
                    overrides=_INJECTATE_OVERRIDES,
                )
            )
        return cards

    def _caution(self, index: int, caution: Mapping[str, Any]) -> JSON:
        rule_ids = list(caution.get("ruleIds", ()))
        message = caution.get("message", "")
        return self._card(
            f"caution-{index}-{caution.get('code')}",
            summary=f"Caution: {first_sentence(message)}",
            indicator="info",
            rule_ids=rule_ids,
            family=self._family(rule_ids, "caution"),
            lead=message,
        )

    def _missing(self, items: Sequence[Mapping[str, Any]]) -> JSON:
        rule_ids = list(dict.fromkeys(r for m in items for r in m.get("ruleIds", ())))
        messages = [str(m.get("message", "")).strip() for m in items if m.get("message")]
        lead = " ".join(messages)  # the coordinator's "Records to check or complete", message by message
        codes = ", ".join(str(m.get("code", "")) for m in items)
        return self._card(
            "missing-data",
            summary=f"Records to check or complete: {first_sentence(messages[0]) if messages else codes}",
            indicator="info",
            rule_ids=rule_ids,
            family=self._family(rule_ids, "data"),
            lead=lead,
        )


def _codings(concept: Any) -> list[JSON]:
    """The Coding objects of a CodeableConcept (anything else: none)."""
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return []
    return [c for c in concept["coding"] if isinstance(c, dict)]


def _preferred_loinc(loinc: Sequence[str]) -> str:
    """The LOINC code a lab order uses for a concept: the lowest-numbered of its codes, which for
    the rule set's concepts is the long-standing laboratory code (INR 6301-6, platelets 777-3,
    hCG 2106-3) rather than a later point-of-care or method variant."""
    return min(loinc, key=lambda code: (int(code.split("-")[0]) if code.split("-")[0].isdigit() else 1 << 30, code))


def cards_from_decision(
    decision: Mapping[str, Any],
    ruleset: RuleSet,
    order: OrderContext,
    *,
    hook_instance: str,
    explanation_url: str,
    source_url: str | None = None,
) -> list[JSON]:
    """The cards for one decision about one draft order (see the module docstring)."""
    builder = CardBuilder(
        decision, ruleset, order, hook_instance=hook_instance, explanation_url=explanation_url, source_url=source_url
    )
    return builder.cards()
