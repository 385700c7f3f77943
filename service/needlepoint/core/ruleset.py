"""A rule set as data: rules, value sets, parameters, observation concepts and aggregates.

This is the model only: immutable objects that the evaluator, the compiler and the authoring
tools read, and the vocabularies of the format. It knows nothing of files or YAML. The rule-set
front end (:mod:`needlepoint.rulesets`) reads the files, checks them against the format and builds
this model; its :func:`~needlepoint.rulesets.build_ruleset` is the one way to make a
:class:`RuleSet`. The digest (:func:`canonical_digest`) is a sha256 over the canonical JSON of all
documents and the parameter values in force, so it changes whenever anything that can change a
decision changes, and not otherwise.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .conditions import Pattern
from .record import SYSTEM_URIS


class RuleSetError(ValueError):
    """A rule set that cannot be loaded or compiled. ``where`` names the document and key path
    (``parameters.yaml.inr_defer_above``; for a rule ``rules/10-bleeding.yaml:12 DEF-INR-HIGH.then``).

    The front end raises one error for everything wrong with a rule set: ``diagnostics`` holds
    every error it found (its :class:`~needlepoint.rulesets.diagnostics.Diagnostic` objects, each
    with file, line and column), and the message lists them all; ``where`` and the first line of
    the message are the first of them."""

    def __init__(self, where: str, message: str, diagnostics: tuple = ()):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
        self.diagnostics = tuple(diagnostics)


CATEGORIES = ("modality", "injectate", "deferral", "caution", "data")
MODALITIES = ("FLUOROSCOPY", "ULTRASOUND", "LANDMARK")
INJECTATE_CATEGORIES = (
    "LOCAL_ANESTHETIC",
    "CORTICOSTEROID",
    "HYALURONIC_ACID",
    "PLATELET_RICH_PLASMA",
    "IODINATED_CONTRAST",
    "GADOLINIUM_CONTRAST",
)
RECOMMENDATIONS = ("SUGGESTED", "CAUTION", "NOT_SUGGESTED", "AVOID")  # in increasing restriction
DEFERRAL_REASONS = (
    "JOINT_INFECTION_SUSPECTED",
    "SYSTEMIC_INFECTION",
    "ENTRY_SITE_INFECTION",
    "BLEEDING_RISK",
    "INJECTATE_ALLERGY",
    "RECENT_CORTICOSTEROID_INJECTION",
    "UPCOMING_ARTHROPLASTY",
    "HYPERGLYCEMIA",
    "PREGNANCY",
    "TARGET_MISMATCH",
    "CONSERVATIVE_CARE_INCOMPLETE",
    "PENDING_DATA",
    "PATIENT_DECEASED",
)
SEVERITIES = ("HARD", "SOFT")
SCOPES = ("PROCEDURE",) + INJECTATE_CATEGORIES
PROVENANCE_TAGS = ("V", "V2", "R", "C", "P")
STATUSES = ("draft", "active", "retired")
# the short names of the code systems a value set may list (units are no value-set vocabulary)
CODE_SYSTEMS = tuple(name for name in dict.fromkeys(SYSTEM_URIS.values()) if name != "ucum")
PREFIX_SYSTEMS = ("icd10cm", "atc")  # hierarchical codes that value sets may match by prefix
UNIT_CONVERSIONS = ("fahrenheit_to_celsius", "ifcc_to_ngsp")  # named non-linear conversions
TEMPLATE = re.compile(r"\{([^{}]+)\}")  # a placeholder in a message template

# Message placeholders (rendered in core/resolve.py):
#   {alias}, {alias.display}   what the matched fact is, in words ("Warfarin Sodium 5 MG Oral Tablet")
#   {alias.field}              a field of it, with a human unit ("3.4", "25 ×10⁹/L", "45 days")
#   {alias.when}               its clinical date ("30 May 2025")
#   {alias.age}                how long before the decision's instant that was ("3 days ago", "in 4 weeks")
#   {alias.when+$param}        its date plus a parameter's days ("28 August 2025")
#   {$param}                   a parameter with its unit ("7 days", "3")
#   {$param.since}             the date that many days before the instant ("26 May 2025")
TEMPLATE_FIELDS = ("display", "when", "age")  # placeholder fields every matched fact has
_PLACEHOLDER = re.compile(
    r"^(?:\$(?P<param>[A-Za-z_][A-Za-z0-9_]*)(?:\.(?P<pmod>since))?"  # $param, $param.since
    r"|(?P<alias>[a-z][a-z0-9_]*)(?:\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)"  # alias, alias.field
    r"(?:\+\$(?P<plus>[A-Za-z_][A-Za-z0-9_]*))?)?)$"  # alias.field+$param
)


@dataclass(frozen=True, slots=True)
class Placeholder:
    """One ``{...}`` of a message template, parsed: a parameter (``alias`` None), optionally as
    the date ``since`` that many days before the instant; or a matched fact's ``field`` ("" for
    the fact itself), optionally its date plus the days of parameter ``param`` (``when+$p``)."""

    alias: str | None
    field: str
    param: str | None
    modifier: str | None  # "since" ({$p.since}), "plus" ({a.when+$p}), or None


def parse_placeholder(ref: str) -> Placeholder | None:
    """``ref`` (the text between the braces) as a :class:`Placeholder`, or None if malformed."""
    m = _PLACEHOLDER.match(ref.strip())
    if m is None:
        return None
    if m["param"]:
        return Placeholder(None, "", m["param"], m["pmod"])
    if m["plus"] and m["field"] != "when":
        return None  # only a date can have days added
    return Placeholder(m["alias"], m["field"] or "", m["plus"], "plus" if m["plus"] else None)


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    value: Any
    default: Any
    unit: str | None
    provenance: str
    source: str
    description: str
    allowed: tuple | None = None
    layer: str = ""  # which layer set the value in force: the rule set id, or a site overlay name


@dataclass(frozen=True, slots=True)
class Evidence:
    citation: str
    strength: str


def match_key(system: str, code: str) -> str:
    """The one spelling under which a code is matched against value sets.

    ICD-10-CM is written with a dot after the category (``L03.115``), but many EHRs, claims feeds
    and FHIR servers send the same code without it (``L03115``), and some in lower case. The dot
    always follows the third character, so dropping it loses nothing: the dotless upper-case form
    is the key. Value sets are keyed this way once, when they are built, and a record's codes once,
    when they are looked up; no rule ever sees the difference. Every other system is matched
    exactly as written (RxNorm, SNOMED CT and LOINC codes have one spelling; ATC is upper case).
    """
    if system == "icd10cm":
        return code.replace(".", "").upper()
    return code


@dataclass(frozen=True, slots=True)
class ValueSet:
    id: str
    title: str
    codes: dict[str, frozenset[str]]  # system -> exact codes, each spelled as match_key gives it
    prefixes: dict[str, tuple[str, ...]]  # system -> code prefixes, spelled as match_key gives them
    groups: dict[str, ValueSet] = field(default_factory=dict)  # named members (e.g. one per agent)

    def contains(self, system: str, code: str) -> bool:
        code = match_key(system, code)  # a record's code, as sent: L03.115 and L03115 are one code
        if code in self.codes.get(system, ()):
            return True
        return any(code.startswith(p) for p in self.prefixes.get(system, ()))


@dataclass(frozen=True, slots=True)
class ObservationConcept:
    """A lab or vital concept: which LOINC codes carry it, its canonical unit, how to convert.

    ``units`` are UCUM codes, matched exactly (UCUM is case-sensitive). ``display_units`` are
    free-text units as lab reports show them (``K/uL``), accepted only for a value that carries
    no UCUM code, and only where the text cannot mean anything else."""

    id: str
    title: str
    codes: frozenset[str]  # "system#code"
    unit: str | None  # canonical unit; None for coded results
    units: dict[str, float | str]  # accepted UCUM code -> factor to canonical, or a named conversion
    plausible: tuple[float, float] | None
    display_units: dict[str, float | str] = field(default_factory=dict)  # display text -> the same


@dataclass(frozen=True, slots=True)
class Aggregate:
    """A derived number on the ``summary`` fact. Three forms:

    * ``count: kind`` + ``where``: how many facts of that kind match;
    * the same + ``distinct_groups_of: value-set``: how many of that value set's groups
      (e.g. distinct antithrombotic agents) the matching facts fall into;
    * ``criteria: [pattern, ...]``: how many of the listed patterns match at least one fact
      (scores such as the Kocher criteria, or "is a corticosteroid planned").
    """

    name: str
    patterns: tuple[Pattern, ...]
    mode: str  # "count" | "distinct_groups" | "criteria"
    distinct_groups_of: str | None
    description: str


@dataclass(frozen=True, slots=True)
class Outcome:
    modality: dict | None  # {preferred, acceptable: [...], avoid: [...]}
    injectates: tuple[dict, ...]  # ({category, recommendation}, ...)
    deferral: dict | None  # {reason, severity, scope}
    caution: str | None  # caution code
    missing_data: str | None  # missing-data code
    message: str


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    version: str
    title: str
    category: str
    precedence: int
    alternatives: tuple[tuple[Pattern, ...], ...]
    then: Outcome
    rationale: str
    evidence: tuple[Evidence, ...]
    params: tuple[str, ...]  # parameter names the rule uses (conditions and message)
    source: str  # file:line where the rule is defined
    exclusive: bool = False  # when it fires, its outcome is the whole decision (e.g. a deceased patient)


@dataclass(frozen=True)
class RuleSet:
    id: str
    version: str
    title: str
    status: str
    validation: str
    description: str
    rules: tuple[Rule, ...]
    value_sets: dict[str, ValueSet]
    params: dict[str, Param]
    observations: dict[str, ObservationConcept]
    aggregates: tuple[Aggregate, ...]
    digest: str
    layers: tuple[str, ...] = ()
    requested_modality: dict[str, str] = field(default_factory=dict)  # modality -> value set of order codes
    # injectate category -> the modalities it only makes sense with (IODINATED_CONTRAST: FLUOROSCOPY)
    modality_bound_injectates: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def rule(self, rule_id: str) -> Rule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    def param_values(self) -> dict[str, Any]:
        return {name: p.value for name, p in self.params.items()}


def canonical_digest(documents: dict[str, Any]) -> str:
    blob = orjson.dumps(documents, option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(blob).hexdigest()
