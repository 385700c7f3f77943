"""The decision as typed objects, and its one serialiser to the contract's JSON.

The resolver (:mod:`.resolve`) builds a :class:`Decision`; :meth:`Decision.to_json` is the only
place that turns one into the contract's decision JSON (shared/domain/contract.md, section 2:
lowerCamelCase members in the contract's order, empty lists and an empty modality left out).
Every consumer of that JSON (CDS Hooks cards, the worklist, batch, the decision log, the
coordinator view, the authoring tools) reads what this method writes; the gRPC server encodes the
typed decision to protobuf itself (``server/convert.py``), and its tests check that both agree.

The objects are immutable: frozen, slotted dataclasses, except the matched facts of an
explanation, the most numerous part (tens per decision), which are a ``NamedTuple`` because a
frozen dataclass costs 2.5 times as much to make. Text stays as the contract writes it (enum
values by name, ``asOf`` in RFC 3339), so the JSON needs no conversion.

A rule's :class:`RuleHead` (its id, version, title, category, outcome, rationale, evidence and
parameters) is made once per rule set and shared by every decision in which the rule fired, so
an encoder may compute what it needs of a head once (keyed by the head's identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class RulesetRef:
    id: str
    version: str
    digest: str


@dataclass(frozen=True, slots=True)
class Evidence:
    citation: str
    strength: str


@dataclass(frozen=True, slots=True)
class ParameterUse:
    """A rule-set parameter a rule used, its value in force as text, and the layer that set it."""

    name: str
    value: str
    layer: str


@dataclass(frozen=True, slots=True, eq=False)
class RuleHead:
    """The fixed part of a rule's explanation, the same in every decision of a rule set."""

    rule_id: str
    rule_version: str
    title: str
    category: str
    outcome: str  # what the rule's then-block decides; a firing may say more (Explanation.outcome)
    rationale: str
    evidence: tuple[Evidence, ...]
    parameters: tuple[ParameterUse, ...]


class MatchedFact(NamedTuple):
    """A fact a rule matched, as auditors read it (``fact``), and its value as text."""

    fact: str
    value: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why one rule contributed: its head, the outcome of this firing, what it matched."""

    head: RuleHead
    outcome: str
    matched: tuple[MatchedFact, ...]
    overridden_by: tuple[str, ...] | None = None  # the rules that overruled its whole contribution, if it was


@dataclass(frozen=True, slots=True)
class Modality:
    preferred: str | None
    acceptable: tuple[str, ...]
    avoid: tuple[str, ...]
    rule_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Injectate:
    category: str
    recommendation: str
    rule_ids: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class Deferral:
    reason: str
    severity: str
    scope: str
    rule_ids: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class Caution:
    code: str
    rule_ids: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class MissingData:
    code: str
    message: str
    rule_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """What the rules say about one injection order for one patient, and why."""

    decision_id: str
    as_of: str  # RFC 3339 in UTC, as the contract writes it
    ruleset: RulesetRef
    modality: Modality | None
    injectates: tuple[Injectate, ...]
    deferrals: tuple[Deferral, ...]
    cautions: tuple[Caution, ...]
    missing_data: tuple[MissingData, ...]
    explanations: tuple[Explanation, ...]

    def to_json(self) -> dict[str, Any]:
        """The contract's decision JSON: a new dict (members in the contract's order, empty
        parts left out), which the caller may change."""
        r = self.ruleset
        out: dict[str, Any] = {
            "decisionId": self.decision_id,
            "asOf": self.as_of,
            "ruleset": {"id": r.id, "version": r.version, "digest": r.digest},
        }
        m = self.modality
        if m is not None:
            modality: dict[str, Any] = {}
            if m.preferred:
                modality["preferred"] = m.preferred
            if m.acceptable:
                modality["acceptable"] = list(m.acceptable)
            if m.avoid:
                modality["avoid"] = list(m.avoid)
            modality["ruleIds"] = list(m.rule_ids)
            out["modality"] = modality
        if self.injectates:
            out["injectates"] = [
                {"category": i.category, "recommendation": i.recommendation, "ruleIds": list(i.rule_ids), "message": i.message}
                for i in self.injectates
            ]
        if self.deferrals:
            out["deferrals"] = [
                {"reason": d.reason, "severity": d.severity, "scope": d.scope, "ruleIds": list(d.rule_ids), "message": d.message}
                for d in self.deferrals
            ]
        if self.cautions:
            out["cautions"] = [{"code": c.code, "ruleIds": list(c.rule_ids), "message": c.message} for c in self.cautions]
        if self.missing_data:
            out["missingData"] = [{"code": d.code, "message": d.message, "ruleIds": list(d.rule_ids)} for d in self.missing_data]
        if self.explanations:
            out["explanations"] = [_explanation_json(e) for e in self.explanations]
        return out


def _explanation_json(e: Explanation) -> dict[str, Any]:
    h = e.head
    out: dict[str, Any] = {
        "ruleId": h.rule_id,
        "ruleVersion": h.rule_version,
        "title": h.title,
        "category": h.category,
        "outcome": e.outcome,
        "rationale": h.rationale,
    }
    if h.evidence:
        out["evidence"] = [{"citation": x.citation, "strength": x.strength} for x in h.evidence]
    out["matched"] = [{"fact": fact, "value": value} for fact, value in e.matched]
    if h.parameters:
        out["parameters"] = [{"name": p.name, "value": p.value, "layer": p.layer} for p in h.parameters]
    if e.overridden_by is not None:
        out["overriddenBy"] = list(e.overridden_by)
    return out
