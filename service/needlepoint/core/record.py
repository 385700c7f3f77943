"""The patient record as the core sees it: coded, timestamped facts, nothing else.

Every road in (a FHIR Bundle, the typed protobuf context, a rule-set test case) ends in a
:class:`PatientRecord`. The core never sees FHIR, protobuf or files. Values keep the unit they
arrived with; unit normalisation and everything that depends on the evaluation instant
(ages, intervals) happens later, in :mod:`needlepoint.core.prepare`, so that one record can be
evaluated at any ``as_of``.

Time is kept, not applied: each item carries when it began (``begun``: the earliest instant it
had started or been written) and, where the source says so, when it ended (``ended``). Whether
an item exists and is current at the evaluation instant is decided in one place, the core's
:func:`needlepoint.core.prepare.in_force`, for every kind alike (contract, "Time"). An item whose
status says it ended at an unknown time is not in the record at all: undated, it keeps its
status-based meaning.

``source`` on each item is a human-readable locator of where the item came from (for FHIR:
``Bundle.entry[12].resource``); it is carried into explanations and error messages so that a
reader can find the original data.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Protocol

# The vocabularies every road in checks against, declared once: the FHIR mapper, the typed
# context (needlepoint.intake), the command line (--target/--side/--intent), batch and lint read
# them here.

# Needlepoint's own code systems.
TARGET_SYSTEM = "http://needlepoint.dev/fhir/CodeSystem/injection-target"
INTENT_SYSTEM = "http://needlepoint.dev/fhir/CodeSystem/injection-intent"
INJECTATE_SYSTEM = "http://needlepoint.dev/fhir/CodeSystem/injectate-category"
FLAG_SYSTEM = "http://needlepoint.dev/fhir/CodeSystem/clinical-flag"
OBSERVATION_SYSTEM = "http://needlepoint.dev/fhir/CodeSystem/observation"

# Short names of the code systems the rule sets speak. Adapters translate URIs into these.
SYSTEM_URIS: dict[str, str] = {
    "http://hl7.org/fhir/sid/icd-10-cm": "icd10cm",
    "http://hl7.org/fhir/sid/icd-10": "icd10cm",
    "http://snomed.info/sct": "snomed",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "rxnorm",
    "http://www.whocc.no/atc": "atc",
    "http://loinc.org": "loinc",
    "http://www.ama-assn.org/go/cpt": "cpt",
    "http://unitsofmeasure.org": "ucum",
    TARGET_SYSTEM: "np-target",
    INTENT_SYSTEM: "np-intent",
    INJECTATE_SYSTEM: "np-injectate",
    FLAG_SYSTEM: "np-flag",
    OBSERVATION_SYSTEM: "np-obs",
}
# The canonical URI of each short name: the first URI listed for it (ICD-10-CM for "icd10cm").
SYSTEM_URI_OF: dict[str, str] = {}
for _uri, _short in SYSTEM_URIS.items():
    SYSTEM_URI_OF.setdefault(_short, _uri)

TARGETS = ("hip-intra-articular", "greater-trochanteric-bursa", "iliopsoas-bursa", "gluteal-tendon")
INTENTS = ("diagnostic", "therapeutic", "diagnostic-and-therapeutic", "arthrography")
SIDES = ("left", "right", "both")
SEXES = ("female", "male", "other", "unknown")
INJECTATE_CATEGORIES = (
    "local-anesthetic",
    "corticosteroid",
    "hyaluronic-acid",
    "platelet-rich-plasma",
    "iodinated-contrast",
    "gadolinium-contrast",
)
# Clinician-asserted flags that no other resource carries (contract extension).
FLAGS = (
    "suspected-septic-joint",  # the clinician suspects a septic joint
    "ultrasound-failed",  # a previous ultrasound-guided attempt at this target failed
    "hot-painful-joint",  # acute hot, painful hip on examination
    "non-weight-bearing",  # Kocher criterion: refuses to bear weight
)
# Our own code systems (short name) with every code they hold: a code outside them is bad input
# on every road, never a code that silently matches nothing.
OWN_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "np-target": TARGETS,
    "np-intent": INTENTS,
    "np-injectate": INJECTATE_CATEGORIES,
    "np-flag": FLAGS,
}
# An allergy's worst reaction (FHIR AllergyIntolerance.reaction.severity), mildest first, and its
# criticality.
ALLERGY_SEVERITIES = ("mild", "moderate", "severe")
ALLERGY_CRITICALITIES = ("low", "high", "unable-to-assess")


class RecordItem(Protocol):
    """What every item of a record carries: where it came from, when it began and when it ended
    (None: not known, or an item that does not end by date)."""

    @property
    def source(self) -> str: ...

    @property
    def begun(self) -> dt.datetime | None: ...

    @property
    def ended(self) -> dt.datetime | None: ...


class RecordError(ValueError):
    """Input that cannot be evaluated. ``path`` names the offending field."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class OrderNotForUs(RecordError):
    """Input that carries no order this service decides on (no injection order, or one that is
    not for a hip injection): a refusal like any RecordError, but the common and expected answer
    when a caller sends every order, so the roads need not treat it as a caller's mistake."""


# Its words when there is no injection order at all (at ``order``): the same from the core and
# from the mapper's early look at a bundle's own orders.
NO_ORDER_PROBLEM = "no injection order: add a draft ServiceRequest for the injection, or give the target, side and intent"


@dataclass(frozen=True, slots=True)
class Code:
    system: str  # a short name from SYSTEM_URIS, or the raw URI when unknown
    code: str
    display: str | None = field(default=None, compare=False)  # for people; never matched

    def __str__(self) -> str:
        return f"{self.system}#{self.code}"


@dataclass(slots=True)
class Condition:
    """A diagnosis or problem. ``begun``: the earliest instant it may have existed (its onset or
    its recording, whichever came first); ``since``: the exact instant an episode is timed from
    (the onset, else the recording), None when neither is known to the day; ``ended``: its
    abatement, if recorded."""

    codes: list[Code]
    source: str = ""
    begun: dt.datetime | None = None
    since: dt.datetime | None = None
    ended: dt.datetime | None = None


@dataclass(slots=True)
class Medication:
    """A medication the patient takes: a MedicationRequest or MedicationStatement that is active,
    or that ended at a known instant (then current only before it). ``begun``: authored,
    started or asserted, whichever came first."""

    codes: list[Code]
    source: str = ""
    begun: dt.datetime | None = None
    ended: dt.datetime | None = None


@dataclass(slots=True)
class Observation:
    """A lab or vital sign. ``value`` is numeric, or ``value_code`` for coded results (e.g.
    pregnancy status).

    A numeric value's unit comes in two parts, both as received. ``unit`` is the UCUM code, and
    only that: it is None when the sender gave no code in the UCUM system. ``unit_display`` is
    the free-text unit the sender showed (FHIR ``Quantity.unit``), e.g. ``K/uL``; it may be
    anything, so the core trusts it only where the rule set lists it as unambiguous, and only
    when there is no UCUM code (a UCUM code, when present, decides alone).

    ``problem`` is ``(kind, detail)`` when an adapter could not read the value or its date (a
    censored ``<20``, a string value, an unparseable date). The adapter does not know which
    concepts matter, so it keeps the observation; the core names the problem in missingData
    only when a rule set uses the concept, and never applies a threshold to it."""

    codes: list[Code]
    effective: dt.datetime | None
    value: float | None = None
    unit: str | None = None
    value_code: Code | None = None
    source: str = ""
    problem: tuple[str, str] | None = None
    unit_display: str | None = None

    @property
    def begun(self) -> dt.datetime | None:
        return self.effective

    ended = None  # a result does not end; it ages


@dataclass(slots=True)
class Allergy:
    codes: list[Code]
    severity: str | None = None  # mild | moderate | severe (the worst reaction), or None if unknown
    criticality: str | None = None  # low | high | unable-to-assess
    source: str = ""
    begun: dt.datetime | None = None  # recorded or began, whichever came first

    ended = None  # an allergy does not end by date; a resolved one is not in the record


@dataclass(slots=True)
class PriorInjection:
    """A completed injection procedure, with the agents injected."""

    codes: list[Code]
    performed: dt.datetime | None
    target: str | None = None  # one of TARGETS when known
    side: str | None = None  # one of SIDES when known
    agents: list[Code] = field(default_factory=list)
    source: str = ""

    @property
    def begun(self) -> dt.datetime | None:
        return self.performed

    ended = None


@dataclass(slots=True)
class PlannedSurgery:
    """A planned operation: ``date`` is when it is planned for, ``begun`` when it was ordered."""

    codes: list[Code]
    date: dt.datetime | None
    side: str | None = None
    source: str = ""
    begun: dt.datetime | None = None

    ended = None


@dataclass(slots=True)
class InjectionOrder:
    """The injection being ordered."""

    target: str | None
    side: str | None
    intent: str | None
    codes: list[Code] = field(default_factory=list)  # CPT procedure codes if the clinician chose
    reasons: list[Code] = field(default_factory=list)  # indication codes
    source: str = ""


@dataclass(slots=True)
class PlannedInjectate:
    """A planned agent: a drug code, or an injectate category code (np-injectate)."""

    codes: list[Code]
    source: str = ""


@dataclass(slots=True)
class DataIssue:
    """A value the adapter had to set aside (unparseable date, unknown unit...). Never dropped
    silently: it reaches the decision's missingData through the rule set's data rules."""

    kind: str  # e.g. "unit-unknown", "unparseable-date", "value-missing"
    concept: str  # what the value was meant to be, e.g. "loinc#6301-6"
    detail: str
    source: str = ""
    begun: dt.datetime | None = None  # when the record it is about began; unknown: always shown
    ended: dt.datetime | None = None  # when that record ended, if it did


@dataclass(slots=True)
class PatientRecord:
    """Everything known about one patient. ``birth_date`` is exact; a partial birth date
    (``2014-03``) is kept as the range of days it allows, ``birth_range``, with ``birth_date``
    None. ``deceased`` is True when the record says the patient died; ``deceased_at`` is when,
    if it says."""

    birth_date: dt.date | None = None
    sex: str | None = None
    birth_range: tuple[dt.date, dt.date] | None = None
    deceased: bool = False
    deceased_at: dt.datetime | None = None
    conditions: list[Condition] = field(default_factory=list)
    medications: list[Medication] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    allergies: list[Allergy] = field(default_factory=list)
    prior_injections: list[PriorInjection] = field(default_factory=list)
    planned_surgeries: list[PlannedSurgery] = field(default_factory=list)
    order: InjectionOrder | None = None
    planned_injectates: list[PlannedInjectate] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    data_issues: list[DataIssue] = field(default_factory=list)

    def with_order(self, order: InjectionOrder) -> PatientRecord:
        """A copy whose injection order is replaced (the CLI's --target/--side/--intent)."""
        from dataclasses import replace

        return replace(self, order=order)


_PARTIAL_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2}))?")


def partial_date_range(text: object) -> tuple[dt.date, dt.date] | None:
    """A partial FHIR date (``2014`` or ``2014-03``) as the first and last day it allows; None
    for anything else (a full date, a date-time, a month that does not exist). The one reading of
    partial dates for every road in: a birth date given so is kept as this range (see
    :class:`PatientRecord`)."""
    match = _PARTIAL_DATE.fullmatch(text) if type(text) is str else None
    if match is None:
        return None
    year, month = int(match.group(1)), match.group(2)
    try:
        if month is None:
            return dt.date(year, 1, 1), dt.date(year, 12, 31)
        first = dt.date(year, int(month), 1)
    except ValueError:
        return None
    if first.month == 12:  # (not via the 1st of next January: there is no year 10000)
        return first, dt.date(year, 12, 31)
    return first, dt.date(year, first.month + 1, 1) - dt.timedelta(days=1)


# The (system short name, code) pairs of the Observation codes a reader keeps: those of the
# concepts some rule reads (Evaluator.observation_codes); adapters leave other Observations unmapped.
ObservationCodes = frozenset[tuple[str, str]]


def system_short_name(uri: str | None) -> str:
    if not uri:
        return ""
    return SYSTEM_URIS.get(uri, uri)
