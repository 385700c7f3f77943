"""The discovery document (``GET /cds-services``), derived from the rule set.

A CDS Hooks client satisfies prefetch templates before it calls us, so the templates must ask
for exactly what the rules read. They are computed here from the rule set itself, never written
by hand: every fact kind that a rule or an aggregate tests maps to the FHIR search that carries
it, and every observation concept a rule tests contributes one search by its codes (LOINC and any
other coded system the rule set names), newest first. A new concept in ``observations.yaml`` that a
rule starts to use therefore appears in discovery without anyone touching this module.

Each rule set the engine has loaded is offered as one service id (the rule set id) for both
``order-select`` and ``order-sign``: the spec lets one id serve several hooks, and that is how a
client knows the sign-time cards replace the select-time ones ("update stale guidance").
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from needlepoint.core.conditions import Pattern
from needlepoint.core.record import SYSTEM_URI_OF
from needlepoint.core.ruleset import RuleSet

HOOKS = ("order-select", "order-sign")

# Fact kinds the core builds from the patient's record, and the FHIR searches that carry them,
# each as (prefetch key, template). Kinds that come from the draft order itself (order,
# injectate, flag) or that the core derives (data_issue, summary) need no prefetch.
_KIND_SEARCHES: dict[str, tuple[tuple[str, str], ...]] = {
    "patient": (("patient", "Patient/{{context.patientId}}"),),
    "condition": (("conditions", "Condition?patient={{context.patientId}}&clinical-status=active"),),
    "medication": (
        ("medicationRequests", "MedicationRequest?patient={{context.patientId}}&status=active"),
        ("medicationStatements", "MedicationStatement?patient={{context.patientId}}&status=active"),
    ),
    "allergy": (("allergies", "AllergyIntolerance?patient={{context.patientId}}"),),
    "prior_injection": (("procedures", "Procedure?patient={{context.patientId}}&status=completed"),),
    "planned_surgery": (("plannedServiceRequests", "ServiceRequest?patient={{context.patientId}}&status=active"),),
}

def _patterns(ruleset: RuleSet) -> Iterable[Pattern]:
    """Every pattern of every rule alternative and every aggregate."""
    for rule in ruleset.rules:
        for alternative in rule.alternatives:
            yield from alternative
    for aggregate in ruleset.aggregates:
        yield from aggregate.patterns


def _concepts_of(pattern: Pattern) -> list[str]:
    """The observation concepts an observation pattern names (``concept: inr`` or ``concept: {in: [...]}``)."""
    names: list[str] = []
    for test in pattern.tests:
        if test.field != "concept":
            continue
        if test.op == "eq" and isinstance(test.operand, str):
            names.append(test.operand)
        elif test.op == "in" and isinstance(test.operand, tuple):
            names.extend(str(v) for v in test.operand)
    return names


def kinds_read(ruleset: RuleSet) -> set[str]:
    """The fact kinds the rule set tests, plus ``patient`` (the record needs its Patient always)."""
    return {pattern.kind for pattern in _patterns(ruleset)} | {"patient"}


def observation_concepts_read(ruleset: RuleSet) -> list[str]:
    """The observation concepts the rules and aggregates test, in rule-set order, known ones only."""
    seen: dict[str, None] = {}
    for pattern in _patterns(ruleset):
        if pattern.kind == "observation":
            for name in _concepts_of(pattern):
                if name in ruleset.observations:
                    seen.setdefault(name, None)
    return list(seen)


def _token(code: str) -> str:
    """A FHIR token ``system|code`` for a rule-set code ``short#code``, URL-safe."""
    short, _, value = code.partition("#")
    system = SYSTEM_URI_OF.get(short, short)
    return quote(f"{system}|{value}", safe=":/|.-")


def observation_key(concept: str) -> str:
    """The prefetch key of one observation concept, e.g. ``observations-inr``."""
    return f"observations-{concept}"


def prefetch_templates(ruleset: RuleSet) -> dict[str, str]:
    """Prefetch key -> FHIR query template, for what this rule set reads.

    Only the spec's recommended query subset is used (instance read; type search by patient
    reference, token equality, ``_sort``). Observations are one search per concept with its codes
    as a comma-separated token list (FHIR's OR), sorted newest first, so that the record has the
    values the core chooses from (the newest per concept that is usable); no ``_count`` is set, so
    an unusable newest value never hides an older usable one.
    """
    kinds = kinds_read(ruleset)
    templates: dict[str, str] = {}
    for kind, searches in _KIND_SEARCHES.items():
        if kind in kinds:
            templates.update(searches)
    if "observation" in kinds:
        for concept in observation_concepts_read(ruleset):
            codes = ",".join(_token(code) for code in sorted(ruleset.observations[concept].codes))
            templates[observation_key(concept)] = f"Observation?patient={{{{context.patientId}}}}&code={codes}&_sort=-date"
    return templates


def services(ruleset: RuleSet) -> list[dict]:
    """The discovery entries of one rule set: one per hook, sharing the rule set id as service id."""
    templates = prefetch_templates(ruleset)
    title = f"Needlepoint: {ruleset.title}"
    entries = []
    for hook in HOOKS:
        when = "when a hip injection order is selected" if hook == "order-select" else "when a hip injection order is signed"
        entries.append(
            {
                "hook": hook,
                "id": ruleset.id,
                "title": title,
                "description": (
                    f"Guidance modality, injectate categories and deferral reasons {when}, "
                    f"from rule set {ruleset.id} {ruleset.version} (status {ruleset.status}; not clinically validated). "
                    "Orders that are not hip injections get no cards."
                ),
                "prefetch": dict(templates),
                "usageRequirements": (
                    "Send the injection ServiceRequest (and planned injectate MedicationRequests) in context.draftOrders. "
                    "Prefetch keys that are not supplied are fetched from fhirServer with fhirAuthorization."
                ),
            }
        )
    return entries


def discovery_document(rulesets: Iterable[RuleSet]) -> dict:
    """``{"services": [...]}`` for every rule set served."""
    return {"services": [entry for ruleset in rulesets for entry in services(ruleset)]}
