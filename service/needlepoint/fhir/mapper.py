"""FHIR R4 Bundle -> :class:`~needlepoint.core.record.PatientRecord` (contract.md section 1).

The mapper walks plain JSON dicts: no FHIR model library, and resource types the core does not
need (Claim, Encounter, ExplanationOfBenefit...) are skipped on their ``resourceType`` alone, as
are Observations of codes the caller does not read (``observation_codes``). A large Bundle given
as bytes is read lazily (see "reading only what is read" below): those resources never even
become dicts.

Two kinds of trouble are told apart:

* input that makes the whole request meaningless or is structurally wrong (not JSON, not a
  Bundle, no Patient, an ambiguous injection order, an unknown code in one of Needlepoint's own
  code systems, an impossible number) raises :class:`RecordError` naming the offending field;
* a single value that cannot be trusted (unparseable or imprecise date, a quantity without
  value or unit, an unresolvable reference, a resource with text but no coding) is set aside
  and reported as a :class:`DataIssue`, never read as normal.

Every item carries ``source``, a locator such as ``Bundle.entry[12].resource (Condition/abc)``.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import simdjson

from needlepoint.core.record import (
    ALLERGY_CRITICALITIES,
    ALLERGY_SEVERITIES,
    NO_ORDER_PROBLEM,
    OWN_VOCABULARIES,
    SEXES,
    SYSTEM_URIS,
    Allergy,
    Code,
    Condition,
    DataIssue,
    InjectionOrder,
    Medication,
    Observation,
    ObservationCodes,
    OrderNotForUs,
    PatientRecord,
    PlannedInjectate,
    PlannedSurgery,
    PriorInjection,
    RecordError,
    partial_date_range,
    system_short_name,
)

__all__ = ["record_from_bundle", "record_from_cds_hooks_request"]

JSON = dict[str, Any]

_UCUM_URI = "http://unitsofmeasure.org"
_BUNDLE_TYPES = frozenset({"collection", "searchset", "transaction"})

# Needlepoint's own code systems: a code outside these vocabularies is an error, not a data gap.
_OWN_VOCABULARIES: dict[str, frozenset[str]] = {system: frozenset(codes) for system, codes in OWN_VOCABULARIES.items()}

# Short name and own vocabulary (None for other systems) of each URI in record.SYSTEM_URIS: one
# lookup for the fast paths (_system). Other URIs go through system_short_name.
_KNOWN_SYSTEMS: dict[str, tuple[str, frozenset[str] | None]] = {
    uri: (system_short_name(uri), _OWN_VOCABULARIES.get(system_short_name(uri))) for uri in SYSTEM_URIS
}


def _system(uri: str) -> tuple[str, frozenset[str] | None]:
    """The short name of a code system URI, and its vocabulary when it is one of Needlepoint's own."""
    known = _KNOWN_SYSTEMS.get(uri)
    if known is not None:
        return known
    short = system_short_name(uri)
    return short, _OWN_VOCABULARIES.get(short)

_INJECTION_CPT = frozenset({"20610", "20611", "27093", "27095"})
_HIP_JOINT_SNOMED = "24136001"  # Hip joint structure
_HIP_JOINT_TARGET = "hip-intra-articular"
_LATERALITY_SNOMED = {"7771000": "left", "24028007": "right", "51440002": "both"}

_INACTIVE_CLINICAL = frozenset({"inactive", "remission", "resolved"})
# abatement[x] forms that say a condition ended without saying when
_UNDATED_ABATEMENT = ("abatementString", "abatementAge", "abatementRange")
_ABATEMENT_KEYS = frozenset({"abatementDateTime", "abatementPeriod", "abatementBoolean", *_UNDATED_ABATEMENT})
_EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
_OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected"})
_SEVERITY_RANK = {level: rank for rank, level in enumerate(ALLERGY_SEVERITIES, start=1)}
_CRITICALITIES = frozenset(ALLERGY_CRITICALITIES)
_SEXES = frozenset(SEXES)

# Quantities that may legitimately be negative; any other negative value is impossible.

# Where each resource keeps its clinically relevant instant, in order of preference.
_OBSERVATION_TIMES = (
    ("effectiveDateTime", None),
    ("effectivePeriod", "start"),
    ("effectiveInstant", None),
    ("issued", None),
)
_PROCEDURE_TIMES = (("performedDateTime", None), ("performedPeriod", "start"))
_OCCURRENCE_TIMES = (("occurrenceDateTime", None), ("occurrencePeriod", "start"))

_DATE_TIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")

# The shapes nearly every sender uses: a day ("2025-05-30"), or a time to the second, perhaps
# with milli- or microseconds, and a zone ("2025-05-30T08:15:00+02:00", "...T06:15:00.123Z").
# Only ASCII digits, and hours, minutes, seconds and offsets in range (no 24:00, no leap second,
# no other fraction length): for these, datetime.fromisoformat (C code, on every supported
# Python) gives exactly what the general path of _parse_datetime computes, several times faster.
_COMMON_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{3}|\.[0-9]{6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]))?"
)
_COMMON_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_MIDNIGHT_UTC = dt.time(tzinfo=dt.timezone.utc)


# --- small typed JSON helpers -------------------------------------------------------------------


def _fail(path: str, message: str) -> NoReturn:
    raise RecordError(path, message)


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _shown(value: Any, limit: int = 40) -> str:
    """A JSON value as a message may quote it: a string (cut to ``limit`` characters) or a
    scalar as its repr, an array or object by its JSON type alone. Never recursive, so a value
    nested a thousand levels deep is named, not walked; never long, so a message stays short."""
    if type(value) is str:
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value)} characters)"
    if value is None or type(value) in (bool, int, float):
        return repr(value)
    return _json_type(value)


def _get_list(obj: JSON, key: str, path: str) -> list[Any]:
    """``obj[key]`` as a list; absent or null is an empty list."""
    value = obj.get(key)
    if value is None:
        return []
    if type(value) is not list:
        _fail(f"{path}.{key}", f"expected an array, found {_json_type(value)}")
    return value


def _get_obj(obj: JSON, key: str, path: str) -> JSON | None:
    """``obj[key]`` as an object, or None when absent."""
    value = obj.get(key)
    if value is None or type(value) is dict:
        return value
    _fail(f"{path}.{key}", f"expected an object, found {_json_type(value)}")


def _get_str(obj: JSON, key: str, path: str) -> str | None:
    """``obj[key]`` as a string, or None when absent."""
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    _fail(f"{path}.{key}", f"expected a string, found {_json_type(value)}")


# --- codes --------------------------------------------------------------------------------------


def _at(path: str, key: str | None = None, j: int | None = None) -> str:
    """``path``, ``path.key`` or ``path.key[j]``: callers on a fast path pass the pieces, and the
    path of a value is built only if an error or a slow path needs it."""
    if key is None:
        return path
    return f"{path}.{key}" if j is None else f"{path}.{key}[{j}]"


def _codes(concept: Any, path: str, key: str | None = None, j: int | None = None) -> list[Code]:
    """Every usable coding of a CodeableConcept (at ``_at(path, key, j)``), with short system names.

    Codings without system or code cannot be matched and are left out; a code outside the
    vocabulary of one of Needlepoint's own code systems raises.
    """
    if type(concept) is dict:
        # the fast path (this runs for every coded resource): anything unusual breaks off to the
        # checked path
        codings = concept.get("coding")
        if codings is None:
            return []
        if type(codings) is list:
            codes: list[Code] = []
            for coding in codings:
                key_of = _usual_key(coding)
                if key_of is None:
                    break
                display = coding.get("display")
                codes.append(Code(key_of[0], key_of[1], display if type(display) is str else None))
            else:
                return codes
    elif concept is None:
        return []
    return _checked_codes(concept, _at(path, key, j))


def _usual_key(coding: JSON) -> tuple[str, str] | None:
    """``(short system, code)`` of a coding of the usual shape (an object with string system and
    code, a code of an own system in its vocabulary); None when anything is unusual, and the
    caller starts over with :func:`_checked_codes`, which skips or names the odd coding exactly
    as it always has. The fast path of :func:`_codes` and :func:`_code_keys`."""
    if type(coding) is not dict:
        return None
    system, code = coding.get("system"), coding.get("code")
    if type(system) is not str or type(code) is not str or not system or not code:
        return None
    short, vocabulary = _system(system)
    if vocabulary is not None and code not in vocabulary:
        return None
    return short, code


def _checked_codes(concept: Any, path: str) -> list[Code]:
    """:func:`_codes` coding by coding, with every check (the path for unusual concepts)."""
    if concept is None:
        return []
    if type(concept) is not dict:
        _fail(path, f"expected a CodeableConcept object, found {_json_type(concept)}")
    codes: list[Code] = []
    for k, coding in enumerate(_get_list(concept, "coding", path)):
        if type(coding) is not dict:
            _fail(f"{path}.coding[{k}]", f"expected a Coding object, found {_json_type(coding)}")
        code = _code(coding, path, k)
        if code is not None:
            codes.append(code)
    return codes


def _code(coding: JSON, path: str, k: int | None = None) -> Code | None:
    """A Coding as a :class:`Code` (at ``path``, or coding ``k`` of the CodeableConcept at ``path``);
    None without system or code, which cannot be matched. Error paths are built only on error."""
    system, code = coding.get("system"), coding.get("code")
    if (system is not None and type(system) is not str) or (code is not None and type(code) is not str):
        where = path if k is None else f"{path}.coding[{k}]"
        _get_str(coding, "system", where)
        _get_str(coding, "code", where)
    if not system or not code:
        return None
    short = system_short_name(system)
    vocabulary = _OWN_VOCABULARIES.get(short)
    if vocabulary is not None and code not in vocabulary:
        where = path if k is None else f"{path}.coding[{k}]"
        _fail(f"{where}.code", f"unknown code {code!r} in {system}; expected one of {', '.join(sorted(vocabulary))}")
    display = coding.get("display")
    return Code(short, code, display if type(display) is str else None)


def _code_keys(
    concept: Any, path: str, key: str | None = None, j: int | None = None
) -> list[tuple[str, str]]:
    """``(system, code)`` of every usable coding, found and checked exactly as :func:`_codes` does,
    for callers that only look at what a concept says (body sites, order details) and keep no Code."""
    if type(concept) is dict:
        codings = concept.get("coding")
        if codings is None:
            return []
        if type(codings) is list:
            keys = []
            for coding in codings:
                key_of = _usual_key(coding)
                if key_of is None:
                    break
                keys.append(key_of)
            else:
                return keys
    elif concept is None:
        return []
    return [(code.system, code.code) for code in _checked_codes(concept, _at(path, key, j))]


def _list_codes(obj: JSON, key: str, path: str) -> list[Code]:
    """The codings of every CodeableConcept in the list ``obj[key]``, flattened."""
    codes: list[Code] = []
    for j, concept in enumerate(_get_list(obj, key, path)):
        codes.extend(_codes(concept, path, key, j))
    return codes


def _status_code(obj: JSON, key: str, path: str) -> str | None:
    """The first code of a status CodeableConcept (clinicalStatus, verificationStatus).

    The binding fixes the code system, so a coding without ``system`` still counts here.
    """
    # Fast path: absent, or an object whose coding list yields a string code (or no code at all).
    # A wrong type anywhere goes to the checked loop below, which names it.
    concept = obj.get(key)
    if concept is None:
        return None
    if type(concept) is dict:
        codings = concept.get("coding")
        if codings is None:
            return None
        if type(codings) is list:
            for coding in codings:
                code = coding.get("code") if type(coding) is dict else None
                if code:
                    if type(code) is str:
                        return code
                    break
            else:
                return None
    concept = _get_obj(obj, key, path)
    for k, coding in enumerate(_get_list(concept, "coding", f"{path}.{key}") if concept else ()):
        code = coding.get("code") if type(coding) is dict else None
        if code:
            return _get_str(coding, "code", f"{path}.{key}.coding[{k}]")
    return None


def _concept_name(codes: Sequence[Code]) -> str:
    """What a DataIssue is about: the LOINC coding if there is one, else the first."""
    for code in codes:
        if code.system == "loinc":
            return str(code)
    return str(codes[0])


def _distinct(codes: Iterable[Code]) -> list[Code]:
    """Codes without repeats of the same system#code (the first, with its display, wins)."""
    seen: dict[tuple[str, str], Code] = {}
    for code in codes:
        seen.setdefault((code.system, code.code), code)
    return list(seen.values())


def _has_code(codes: Iterable[Code], system: str, values: frozenset[str] | set[str]) -> bool:
    return any(code.system == system and code.code in values for code in codes)


# --- dates --------------------------------------------------------------------------------------


class _Unusable(Exception):
    """A value the mapper keeps but cannot read: ``kind`` and ``detail`` become the problem."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class _DateProblem(Exception):
    """A date the mapper has to set aside; ``kind`` is the DataIssue kind."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _in_utc_range(value: dt.datetime) -> dt.datetime:
    """``value``, if it can be converted to UTC: a date-time in year 1 with a positive offset, or
    in year 9999 with a negative one, would fall outside the years datetime can hold, and every
    comparison of instants converts. Only those two years need a look (callers check the year)."""
    try:
        value.astimezone(dt.timezone.utc)
    except OverflowError:
        raise _DateProblem("unparseable-date", "is outside the range of instants that can be read") from None
    return value


@functools.lru_cache(maxsize=64)
def _zone(designator: str | None) -> dt.tzinfo:
    """``Z`` / ``+hh:mm`` as a tzinfo; a missing zone is read as UTC."""
    if designator is None or designator == "Z":
        return dt.timezone.utc
    sign = -1 if designator[0] == "-" else 1
    offset = dt.timedelta(hours=int(designator[1:3]), minutes=int(designator[4:6]))
    return dt.timezone(sign * offset)


def _parse_datetime(text: Any) -> dt.datetime:
    """A FHIR dateTime/instant, precise at least to the day, as an aware datetime.

    A date alone means midnight UTC; a time without zone is read as UTC.
    """
    if type(text) is str and _COMMON_DATE_TIME.fullmatch(text):  # fast path: a common shape
        try:
            if len(text) == 10:  # a date alone: midnight UTC
                return dt.datetime.combine(dt.date.fromisoformat(text), _MIDNIGHT_UTC)
            value = dt.datetime.fromisoformat(text)  # (these shapes all carry a zone)
            return value if 1 < value.year < 9999 else _in_utc_range(value)
        except ValueError:  # e.g. 2025-02-30 (or "Z" before Python 3.11): the general path decides
            pass
    match = _DATE_TIME.fullmatch(text) if type(text) is str else None
    if match is None:
        raise _DateProblem("unparseable-date", "is not a FHIR date-time")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if day is None:
        raise _DateProblem("imprecise-date", "is not precise to the day")
    try:
        micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
        value = dt.datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), micro, _zone(zone)
        )
    except ValueError:
        raise _DateProblem("unparseable-date", "is not a valid calendar date-time") from None
    return value if 1 < value.year < 9999 else _in_utc_range(value)


def _parse_date(text: Any) -> dt.date:
    """A FHIR date, complete to the day."""
    if type(text) is str and _COMMON_DATE.fullmatch(text):
        try:
            return dt.date.fromisoformat(text)  # "YYYY-MM-DD" in ASCII digits, read as below
        except ValueError:  # not a calendar date: the general path says so
            pass
    match = _DATE.fullmatch(text) if type(text) is str else None
    if match is None:
        raise _DateProblem("unparseable-date", "is not a FHIR date")
    year, month, day = match.groups()
    if day is None:
        raise _DateProblem("imprecise-date", "is not precise to the day")
    try:
        return dt.date(int(year), int(month), int(day))
    except ValueError:
        raise _DateProblem("unparseable-date", "is not a valid calendar date") from None


def _earliest_instant(value: Any) -> dt.datetime | None:
    """The earliest instant a FHIR date/dateTime allows (a partial date: its first day), or None
    when it cannot be read. For deciding whether a record may have existed yet, never for an
    interval a rule measures."""
    try:
        return _parse_datetime(value)
    except _DateProblem:
        pass
    allowed = partial_date_range(value)
    if allowed is None or allowed[0].year < 1:
        return None
    return dt.datetime.combine(allowed[0], _MIDNIGHT_UTC)


# Where each resource type says when it began or was written, for the core's test of time
# (contract, "Time"): the earliest of these that can be read.
_BEGUN_FIELDS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "Condition": (("onsetDateTime", None), ("onsetPeriod", "start"), ("recordedDate", None)),
    "MedicationRequest": (("authoredOn", None),),
    "MedicationStatement": (("effectiveDateTime", None), ("effectivePeriod", "start"), ("dateAsserted", None)),
    "AllergyIntolerance": (("onsetDateTime", None), ("onsetPeriod", "start"), ("recordedDate", None)),
    "Procedure": (("performedDateTime", None), ("performedPeriod", "start")),
    "ServiceRequest": (("authoredOn", None),),
    "Observation": (("effectiveDateTime", None), ("effectivePeriod", "start"), ("effectiveInstant", None), ("issued", None)),
}


def _begun(resource: JSON, rtype: str) -> dt.datetime | None:
    """When a resource began or was written: the earliest readable instant among its type's
    ``_BEGUN_FIELDS``; None when it has none (an undated record)."""
    found: dt.datetime | None = None
    for key, sub in _BEGUN_FIELDS.get(rtype, ()):
        value = resource.get(key)
        if sub is not None:
            value = value.get(sub) if type(value) is dict else None
        if value is None:
            continue
        instant = _earliest_instant(value)
        if instant is not None and (found is None or instant < found):
            found = instant
    return found


def _exact_instant(resource: JSON, key: str, sub: str | None = None) -> dt.datetime | None:
    """``resource[key]`` (or its ``sub`` field: ``effectivePeriod.end``) as an instant precise to the
    day at least, else None (absent, partial or unreadable)."""
    value = resource.get(key)
    if sub is not None:
        value = value.get(sub) if type(value) is dict else None
    if value is None:
        return None
    try:
        return _parse_datetime(value)
    except _DateProblem:
        return None


# --- bundle entries and references --------------------------------------------------------------


class _Entry:
    """One resource with the path it was found at.

    A resource read lazily from a Bundle's bytes (:func:`_lazy_bundle_entries`) stays a simdjson
    proxy until something reads it: the mapping (which reads only the types and Observations it
    maps) or a reference that resolves to it. ``mapped`` is False for an Observation of codes the
    caller does not read: it is there to be referred to, not mapped."""

    __slots__ = ("path", "type", "full_url", "mapped", "_resource", "_proxy")

    def __init__(
        self, path: str, resource: JSON | None, type: str, full_url: str | None = None, *, mapped: bool = True, proxy: Any = None
    ):
        self.path, self.type, self.full_url, self.mapped = path, type, full_url, mapped
        self._resource, self._proxy = resource, proxy

    @property
    def resource(self) -> JSON:
        resource = self._resource
        if resource is None:
            resource = self._resource = _materialized(self._proxy)
            self._proxy = None
        return resource

    @property
    def rid(self) -> Any:
        """The resource's ``id`` as given (any JSON value), read without materialising a proxy."""
        return (self._resource if self._resource is not None else self._proxy).get("id")

    @property
    def source(self) -> str:
        rid = self.rid
        return f"{self.path} ({self.type}/{rid})" if type(rid) is str else self.path

    @property
    def key(self) -> str | None:
        rid = self.rid
        return f"{self.type}/{rid}" if type(rid) is str and rid else None


def _resource_entry(
    resource: Any, path: str, full_url: str | None = None, observation_codes: ObservationCodes | None = None
) -> _Entry:
    """Check that ``resource`` looks like a FHIR resource and wrap it."""
    if type(resource) is not dict:
        _fail(path, f"expected a resource object, found {_json_type(resource)}")
    rtype = resource.get("resourceType")
    if type(rtype) is not str or not rtype:
        _fail(f"{path}.resourceType", "a resource needs a resourceType")
    return _Entry(path, resource, rtype, full_url, mapped=_is_mapped(rtype, resource, observation_codes))


def _bundle_entries(bundle: Any, path: str, observation_codes: ObservationCodes | None = None) -> list[_Entry]:
    """The resources of a Bundle of type collection, searchset or transaction (type may be absent).
    ``observation_codes``: see :func:`record_from_bundle`."""
    if type(bundle) is not dict:
        _fail(path, f"expected a Bundle object, found {_json_type(bundle)}")
    if bundle.get("resourceType") != "Bundle":
        _fail(f"{path}.resourceType", f"expected 'Bundle', found {_shown(bundle.get('resourceType'))}")
    btype = _get_str(bundle, "type", path)
    if btype is not None and btype not in _BUNDLE_TYPES:
        _fail(f"{path}.type", f"a {btype!r} Bundle is not accepted; use collection, searchset or transaction")
    entries: list[_Entry] = []
    for i, entry in enumerate(_get_list(bundle, "entry", path)):
        # Fast path: an entry object with a resource object that has a resourceType, and a string
        # fullUrl or none. Anything else is checked step by step below.
        if type(entry) is dict:
            resource, full_url = entry.get("resource"), entry.get("fullUrl")
            if type(resource) is dict and (full_url is None or type(full_url) is str):
                rtype = resource.get("resourceType")
                if type(rtype) is str and rtype:
                    mapped = _is_mapped(rtype, resource, observation_codes)
                    entries.append(_Entry(f"{path}.entry[{i}].resource", resource, rtype, full_url, mapped=mapped))
                    continue
        where = f"{path}.entry[{i}]"
        if type(entry) is not dict:
            _fail(where, f"expected an entry object, found {_json_type(entry)}")
        resource = entry.get("resource")
        if resource is not None:  # e.g. a transaction DELETE carries no resource
            full_url = _get_str(entry, "fullUrl", where)
            entries.append(_resource_entry(resource, f"{where}.resource", full_url, observation_codes))
    return entries


# --- reading only what is read --------------------------------------------------------------------

# A Bundle from an EHR's FHIR server is mostly what no rule reads. In the Synthea records, claims,
# explanations of benefit and encounters are over half of the bytes, and nearly all Observations
# are of codes no rule names. Turning all of it into Python objects with orjson, and freeing them
# again, was most of a large bundle's cost (about 1.2 of 2 ms). simdjson checks the whole
# document as strictly as orjson (see _lazy_bundle_entries for the one difference) but builds
# nothing until it is asked: the mapping asks for the resources it maps, and a resource it does not
# map is built only if a reference leads to it. From 11 KiB of Synthea entries on, reading lazily
# took half the time or less; but a small order-time bundle, all of whose resources are read,
# took 20 % longer (73 against 61 µs, 4.6 KiB), as building a resource from simdjson costs more
# than orjson's one pass. Bundles from this size on are read lazily.
LAZY_READ_BYTES = 16 * 1024


def _is_mapped(rtype: str, resource: Any, observation_codes: ObservationCodes | None) -> bool:
    """Whether a resource of type ``rtype`` is mapped, for a caller that reads ``observation_codes``
    (None: every Observation)."""
    return observation_codes is None or rtype != "Observation" or _reads(resource, observation_codes)


def _reads(resource: Any, codes: ObservationCodes) -> bool:
    """Whether an Observation (a dict or a simdjson proxy) is read by a caller that reads only
    ``codes``: unless its ``code`` has codings, each of the usual shape (an object with a system
    and a code, both non-empty strings, a code of an own system in its vocabulary), none of which
    is in ``codes``. An Observation whose code cannot be told at a glance is read, and the mapping
    names whatever is wrong with it, as it would without the filter."""
    concept = resource.get("code")
    if not isinstance(concept, _OBJECTS):
        return True
    codings = concept.get("coding")
    if not isinstance(codings, _ARRAYS) or not len(codings):
        return True
    for coding in codings:
        if not isinstance(coding, _OBJECTS):
            return True
        system, code = coding.get("system"), coding.get("code")
        if type(system) is not str or type(code) is not str or not system or not code:
            return True
        short, vocabulary = _system(system)
        if (short, code) in codes or (vocabulary is not None and code not in vocabulary):
            return True
    return False


_OBJECTS = (dict, simdjson.Object)
_ARRAYS = (list, simdjson.Array)


def _lazy_bundle_entries(raw: bytes, path: str, observation_codes: ObservationCodes | None) -> list[_Entry] | None:
    """The entries of a Bundle's JSON bytes, as :func:`_bundle_entries` finds them, each resource
    left a simdjson proxy until it is read (:attr:`_Entry.resource`). None when the bytes are not
    valid JSON to simdjson, or not a Bundle of the usual shape: the caller then reads them with
    orjson, which words every error as it always has.

    simdjson refuses what orjson refuses (invalid UTF-8, lone surrogates, control characters,
    numbers out of range, trailing content, too deep a nesting), and more (integers beyond 64
    bits, which orjson reads as floats): those go to orjson. It skips a UTF-8 byte order mark,
    which orjson refuses: that goes to orjson too.

    The one difference is a name repeated in one object, which FHIR JSON forbids and RFC 8259
    leaves to the parser: the proxy's lookups find its first occurrence, orjson keeps its last.
    Where a repeated name is cheap to see, the Bundle is read whole instead, as orjson reads it:
    a Bundle object that repeats one of its names (here), and a resource that is read
    (:func:`_materialized`: its dict has fewer names than its proxy). Looking into every entry and
    every resource not read would cost about as much as reading lazily saves, so there the first
    occurrence decides: which resource an entry holds, whether a resource not read is of a type the
    mapping reads (its ``resourceType``), whether an Observation is of a code read (its ``code``),
    and which resource a reference finds (its ``id``)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        doc = simdjson.Parser().parse(raw)
    except (ValueError, RuntimeError):  # invalid JSON (UnicodeDecodeError is a ValueError), big integers
        return None
    if type(doc) is not simdjson.Object or doc.get("resourceType") != "Bundle" or len(set(doc.keys())) != len(doc):
        return None
    btype = doc.get("type")
    if btype is not None and (type(btype) is not str or btype not in _BUNDLE_TYPES):
        return None
    items = doc.get("entry")
    if items is None:
        return []
    if type(items) is not simdjson.Array:
        return None
    entries: list[_Entry] = []
    for i, entry in enumerate(items):
        if type(entry) is not simdjson.Object:
            return None
        resource = entry.get("resource")
        if resource is None:
            continue  # e.g. a transaction DELETE
        full_url = entry.get("fullUrl")
        if type(resource) is not simdjson.Object or (full_url is not None and type(full_url) is not str):
            return None
        rtype = resource.get("resourceType")
        if type(rtype) is not str or not rtype:
            return None
        mapped = _is_mapped(rtype, resource, observation_codes)
        entries.append(_Entry(f"{path}.entry[{i}].resource", None, rtype, full_url, mapped=mapped, proxy=resource))
    return entries


class _RepeatedName(Exception):
    """A resource read lazily repeats a name: the Bundle is to be read whole (see
    :func:`_lazy_bundle_entries`)."""


def _materialized(proxy: Any) -> JSON:
    """A resource read lazily, as the dict orjson makes of it (as_dict builds in C, not by
    recursing in Python: the 1,022 levels simdjson lets a resource have). Raises _RepeatedName when
    the dict has fewer names than the proxy (as orjson does, it kept the last of a repeated one)."""
    resource = proxy.as_dict()
    if len(resource) != len(proxy):
        raise _RepeatedName
    return resource


class _Index:
    """Resolves ``urn:uuid:``, ``Type/id``, absolute and ``#contained`` references (built lazily)."""

    def __init__(self, entries: Sequence[_Entry]):
        self._entries = entries
        self._by_reference: dict[str, _Entry] | None = None

    def _build(self) -> dict[str, _Entry]:
        index: dict[str, _Entry] = {}
        for entry in self._entries:
            if entry.full_url:
                index.setdefault(entry.full_url, entry)
            rid = entry.rid
            if type(rid) is str and rid:  # entry.key, spelled out: this runs for every entry
                index.setdefault(f"{entry.type}/{rid}", entry)
        return index

    def resolve(self, reference: str, container: _Entry | None = None) -> _Entry | None:
        """The entry ``reference`` points to, or None."""
        if reference.startswith("#"):
            return self._contained(reference[1:], container) if container is not None else None
        if self._by_reference is None:
            self._by_reference = self._build()
        found = self._by_reference.get(reference)
        if found is None and "/" in reference:
            parts = reference.split("/_history/", maxsplit=1)[0].rstrip("/").split("/")
            found = self._by_reference.get("/".join(parts[-2:])) if len(parts) >= 2 else None
        return found

    @staticmethod
    def _contained(rid: str, container: _Entry) -> _Entry | None:
        for k, resource in enumerate(_get_list(container.resource, "contained", container.path)):
            if type(resource) is dict and resource.get("id") == rid:
                return _resource_entry(resource, f"{container.path}.contained[{k}]")
        return None


def _reference(ref: Any, path: str) -> str | None:
    """The ``reference`` string of a Reference object (None for a display-only reference)."""
    if type(ref) is not dict:
        _fail(path, f"expected a Reference object, found {_json_type(ref)}")
    return _get_str(ref, "reference", path) or None


# --- the mapping --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Site:
    """What a list of bodySite concepts says."""

    target: str | None = None
    side: str | None = None
    declared: bool = False  # the target came from the injection-target code system


class _Mapper:
    """One pass over the entries, one method per resource type."""

    def __init__(self, entries: Sequence[_Entry], root: str):
        self.entries = entries
        self.root = root
        self.index = _Index(entries)
        self.record = PatientRecord()
        self.patient: _Entry | None = None
        self.service_requests: list[_Entry] = []

    def run(self, order_refs: Sequence[tuple[str, str]], *, own_order: bool = False) -> PatientRecord:
        """The record. With ``own_order`` (a Bundle that must carry its own hip injection order),
        its draft orders are looked at first: see :meth:`_refuse_if_not_for_us`."""
        if own_order:
            self._refuse_if_not_for_us()
        for entry in self.entries:
            handler = _HANDLERS.get(entry.type)
            if handler is not None and entry.mapped:
                handler(self, entry)
        if self.patient is None:
            _fail(self.root, "no Patient resource; the record has no patient to evaluate")
        order = self._select_order(order_refs)
        for entry in self.service_requests:
            if entry is not order and entry.resource.get("status") == "active":
                self._planned_surgery(entry)
        if order is not None:
            self.record.order = self._order(order)
        return self.record

    def _refuse_if_not_for_us(self) -> None:
        """Raise OrderNotForUs, before anything else is mapped (or, read lazily, even built), when
        the Bundle's draft orders give no decision: the order :meth:`_select_order` chooses from
        them is none (at ``order``), or its bodySite names no hip injection target (at
        ``order.target``). Anything these steps cannot read (several injection orders, a
        bodySite without a coding) is left to the full mapping, which names it."""
        self.service_requests = [entry for entry in self.entries if entry.type == "ServiceRequest"]
        try:
            order = self._select_order(())
            target = self._site_reading(order, order=True)[0] if order is not None else None
        except RecordError:
            return
        finally:
            self.service_requests = []  # the handlers collect them again
        if order is None:
            raise OrderNotForUs("order", NO_ORDER_PROBLEM)
        if target is None:
            raise OrderNotForUs("order.target", NOT_HIP_PROBLEM)

    # -- bookkeeping

    def _issue(self, kind: str, concept: str, detail: str, source: str, entry: _Entry | None = None) -> None:
        """Record a DataIssue; about a resource (``entry``), it carries when that resource began,
        so that an evaluation before then does not report it."""
        begun = _begun(entry.resource, entry.type) if entry is not None else None
        self.record.data_issues.append(DataIssue(kind=kind, concept=concept, detail=detail, source=source, begun=begun))

    def _uncoded(self, entry: _Entry, what: str, key: str = "code") -> None:
        """Report a resource whose ``key`` concept has no usable coding: text alone is never enough."""
        concept = entry.resource.get(key)
        text = concept.get("text") if type(concept) is dict else None
        shown = f" ({text!r})" if type(text) is str else ""
        self._issue("uncoded", entry.type, f"{what}{shown} has no usable coding and was set aside.", entry.source, entry)

    def _first_instant(self, entry: _Entry, fields: Sequence[tuple[str, str | None]]) -> dt.datetime | None:
        """The first present instant among ``fields`` (None if there is none). Raises
        _Unusable naming the field when the first present one cannot be read."""
        resource = entry.resource
        for key, sub in fields:
            value = resource.get(key)
            name = key
            if value is not None and sub is not None:
                period = _get_obj(resource, key, entry.path)
                value, name = (period or {}).get(sub), f"{key}.{sub}"
            if value is None:
                continue
            try:
                return _parse_datetime(value)
            except _DateProblem as problem:
                raise _Unusable(problem.kind, f"{name} {_shown(value)} {problem.reason}; the value was set aside.") from None
        return None

    def _instant(
        self, entry: _Entry, fields: Sequence[tuple[str, str | None]], codes: Sequence[Code]
    ) -> tuple[bool, dt.datetime | None]:
        """The first present instant among ``fields``; (False, None) after reporting a bad one
        (its concept: the first of ``codes``)."""
        try:
            return True, self._first_instant(entry, fields)
        except _Unusable as problem:
            self._issue(problem.kind, str(codes[0]), problem.detail, entry.source, entry)
            return False, None

    # -- resources

    def _patient(self, entry: _Entry) -> None:
        if self.patient is not None:
            if entry.key is not None and entry.key == self.patient.key:
                return
            _fail(entry.path, f"a second Patient besides {self.patient.source}; a Bundle describes one patient")
        self.patient = entry
        resource, path = entry.resource, entry.path
        birth = resource.get("birthDate")
        if birth is not None:
            try:
                self.record.birth_date = _parse_date(birth)
            except _DateProblem as problem:
                allowed = partial_date_range(birth) if problem.kind == "imprecise-date" else None
                if allowed is not None:  # a valid partial date: the core works with the range
                    self.record.birth_range = allowed
                else:
                    detail = "birthDate is not a valid FHIR date; age is unknown."  # (a birth date is not quoted: it identifies)
                    self._issue("unparseable-date", "Patient.birthDate", detail, entry.source)
        self._deceased(entry)
        gender = _get_str(resource, "gender", path)
        if gender in _SEXES:
            self.record.sex = gender
        elif gender is not None:
            detail = f"gender {_shown(gender)} is not a FHIR administrative gender; sex is unknown."
            self._issue("unknown-code", "Patient.gender", detail, entry.source)

    def _deceased(self, entry: _Entry) -> None:
        """``deceasedBoolean`` / ``deceasedDateTime``. A death whose date cannot be read is still a
        death: the patient is taken as deceased, and the unreadable date is named."""
        resource = entry.resource
        flag = resource.get("deceasedBoolean")
        if flag is not None and type(flag) is not bool:
            _fail(f"{entry.path}.deceasedBoolean", f"expected true or false, found {_json_type(flag)}")
        when = resource.get("deceasedDateTime")
        if when is None:
            self.record.deceased = flag is True
            return
        self.record.deceased = True
        try:
            self.record.deceased_at = _parse_datetime(when)
        except _DateProblem as problem:
            earliest = _earliest_instant(when)  # a partial date: deceased from the first day it allows,
            if earliest is not None:  # so that no one who may have died is given a go-ahead
                self.record.deceased_at = earliest
            else:
                detail = f"deceasedDateTime {problem.reason}; the patient is taken as deceased."  # (not quoted: it identifies)
                self._issue(problem.kind, "Patient.deceasedDateTime", detail, entry.source)

    def _condition(self, entry: _Entry) -> None:
        """A Condition, with its onset, recording and abatement. One that is resolved or inactive
        is kept only when its abatement is dated (it was current before then); undated, its
        status says it is over."""
        resource, path = entry.resource, entry.path
        ended = None
        if not _ABATEMENT_KEYS.isdisjoint(resource):  # (most conditions have no abatement: one C-level check)
            ended = (
                _exact_instant(resource, "abatementDateTime")
                or _exact_instant(resource, "abatementPeriod", "end")
                or _exact_instant(resource, "abatementPeriod", "start")
            )
            if ended is None and (resource.get("abatementBoolean") is True or any(k in resource for k in _UNDATED_ABATEMENT)):
                return  # it abated at a time that is not given
        if ended is None and _status_code(resource, "clinicalStatus", path) in _INACTIVE_CLINICAL:
            return
        if _status_code(resource, "verificationStatus", path) in _EXCLUDED_VERIFICATION:
            return
        codes = _codes(resource.get("code"), path, "code")
        if not codes:
            return self._uncoded(entry, "Condition")
        # an episode is timed from an exact onset, else an exact recording date; a partial date
        # gives no interval (never guessed), though it does say the condition may exist already
        since = (
            _exact_instant(resource, "onsetDateTime")
            or _exact_instant(resource, "onsetPeriod", "start")
            or _exact_instant(resource, "recordedDate")
        )
        self.record.conditions.append(
            Condition(codes, entry.source, begun=_begun(resource, entry.type), since=since, ended=ended)
        )

    def _medication_request(self, entry: _Entry) -> None:
        status = _get_str(entry.resource, "status", entry.path)
        if status not in ("active", "draft"):
            return
        codes = self._medication_codes(entry)
        if not codes:
            return
        if status == "active":
            self.record.medications.append(Medication(codes, entry.source, begun=_begun(entry.resource, entry.type)))
        else:
            self.record.planned_injectates.append(PlannedInjectate(codes, entry.source))

    def _medication_statement(self, entry: _Entry) -> None:
        """An active statement, or a finished one whose end is dated (current before then)."""
        resource = entry.resource
        status = _get_str(resource, "status", entry.path)
        ended = _exact_instant(resource, "effectivePeriod", "end")
        if status != "active" and not (status in ("completed", "stopped") and ended is not None):
            return
        codes = self._medication_codes(entry)
        if codes:
            self.record.medications.append(Medication(codes, entry.source, begun=_begun(resource, entry.type), ended=ended))

    def _medication_codes(self, entry: _Entry) -> list[Code]:
        """medicationCodeableConcept, or the code of the Medication that medicationReference names."""
        resource, path = entry.resource, entry.path
        if "medicationCodeableConcept" in resource:
            codes = _codes(resource["medicationCodeableConcept"], path, "medicationCodeableConcept")
        elif "medicationReference" in resource:
            reference = resource["medicationReference"]
            medication = self._follow(entry, reference, f"{path}.medicationReference", "medication")
            if medication is None:
                return []
            codes = _codes(medication.resource.get("code"), medication.path, "code")
        else:
            codes = []
        if not codes:
            self._uncoded(entry, f"the medication of this {entry.type}", "medicationCodeableConcept")
        return codes

    def _follow(self, entry: _Entry, ref: Any, path: str, what: str) -> _Entry | None:
        """Resolve a Reference found in ``entry``; report it when it points nowhere."""
        reference = ref.get("reference") if type(ref) is dict else None
        if type(reference) is not str:
            reference = _reference(ref, path)  # absent, or not a string (which raises, naming it)
        target = self.index.resolve(reference, entry) if reference else None
        if target is None:
            shown = repr(reference) if reference else "without a reference string"
            detail = f"the {what} reference {shown} resolves to no resource in the request; it was set aside."
            self._issue("unresolved-reference", entry.type, detail, entry.source, entry)
        return target

    def _observation(self, entry: _Entry) -> None:
        resource, path = entry.resource, entry.path
        if _get_str(resource, "status", path) not in _OBSERVATION_STATUSES:
            return
        codes = _codes(resource.get("code"), path, "code")
        if not codes:
            return self._uncoded(entry, "Observation")
        observations, source = self.record.observations, entry.source
        try:
            effective = self._first_instant(entry, _OBSERVATION_TIMES)
        except _Unusable as unusable:
            observations.append(Observation(codes, None, source=source, problem=(unusable.kind, unusable.detail)))
            return
        if "valueQuantity" in resource:
            try:
                value, unit, display = self._quantity(entry)
            except _Unusable as unusable:
                observations.append(Observation(codes, effective, source=source, problem=(unusable.kind, unusable.detail)))
            else:
                observations.append(Observation(codes, effective, value, unit, source=source, unit_display=display))
        elif "valueCodeableConcept" in resource:
            values = _codes(resource["valueCodeableConcept"], path, "valueCodeableConcept")
            if values:
                observations.append(Observation(codes, effective, value_code=values[0], source=source))
            else:
                concept = _concept_name(codes)
                problem = ("uncoded", f"the coded {concept} result has no usable coding; it was set aside.")
                observations.append(Observation(codes, effective, source=source, problem=problem))
        elif any(key.startswith("value") for key in resource):
            kinds = ", ".join(key for key in resource if key.startswith("value"))
            concept = _concept_name(codes)
            problem = (
                "value-unsupported",
                f"the {concept} result is given as {kinds}; only valueQuantity and valueCodeableConcept are read.",
            )
            observations.append(Observation(codes, effective, source=source, problem=problem))
        elif "component" not in resource and "hasMember" not in resource:  # panels carry no value
            reason = _codes(resource.get("dataAbsentReason"), path, "dataAbsentReason")
            why = f" (dataAbsentReason {reason[0].code})" if reason else ""
            concept = _concept_name(codes)
            problem = ("value-missing", f"the {concept} Observation carries no value{why}.")
            observations.append(Observation(codes, effective, source=source, problem=problem))

    def _quantity(self, entry: _Entry) -> tuple[float, str | None, str | None]:
        """valueQuantity as (value, UCUM code, display unit). Raises _Unusable for a value that
        cannot be used. A missing or unknown unit or a negative value is not judged here: the core
        does that per concept.

        Both units are kept as received, because they are trusted differently: ``code`` is a UCUM
        code only when ``system`` says so (UCUM is case-sensitive, so it is never altered), while
        ``unit`` is free text for people (``K/uL`` is kelvin per microlitre in UCUM, but a
        thousand per microlitre on a lab report). A ``code`` without the UCUM system is neither
        (FHIR requires a system beside a code), so it is not kept."""
        quantity = _get_obj(entry.resource, "valueQuantity", entry.path) or {}
        value = quantity.get("value")
        if value is None:
            raise _Unusable("value-missing", "valueQuantity has no value; it was set aside.")
        if type(value) is bool or not isinstance(value, (int, float)):
            raise _Unusable("value-unparseable", f"valueQuantity.value {value!r} is not a number; it was set aside.")
        number = float(value)
        if not math.isfinite(number):
            _fail(f"{entry.path}.valueQuantity.value", f"{value!r} is not a finite number")
        comparator = quantity.get("comparator")
        if comparator is not None and type(comparator) is not str:
            _get_str(quantity, "comparator", f"{entry.path}.valueQuantity")  # raises, naming the field
        if comparator:
            raise _Unusable("value-censored", f"the value is censored ({comparator}{value}), not exact; it was set aside.")
        code, unit = quantity.get("code"), quantity.get("unit")
        if (code is not None and type(code) is not str) or (unit is not None and type(unit) is not str):
            path = f"{entry.path}.valueQuantity"
            _get_str(quantity, "code", path)  # one of these two raises, naming the field
            _get_str(quantity, "unit", path)
        ucum = code if code and quantity.get("system") == _UCUM_URI else None
        return number, ucum, unit or None

    def _allergy(self, entry: _Entry) -> None:
        resource, path = entry.resource, entry.path
        if _status_code(resource, "clinicalStatus", path) in _INACTIVE_CLINICAL:
            return
        if _status_code(resource, "verificationStatus", path) in _EXCLUDED_VERIFICATION:
            return
        codes = _codes(resource.get("code"), path, "code")
        if not codes:
            return self._uncoded(entry, "AllergyIntolerance")
        rank, severity = 0, None
        for k, reaction in enumerate(_get_list(resource, "reaction", path)):
            if type(reaction) is not dict:
                _fail(f"{path}.reaction[{k}]", f"expected a reaction object, found {_json_type(reaction)}")
            level = reaction.get("severity")
            if level is None:
                continue
            if type(level) is not str:
                _get_str(reaction, "severity", f"{path}.reaction[{k}]")  # raises, naming the field
            if _SEVERITY_RANK.get(level, 0) > rank:
                rank, severity = _SEVERITY_RANK[level], level
        criticality = _get_str(resource, "criticality", path)
        self.record.allergies.append(
            Allergy(
                codes=codes,
                severity=severity,
                criticality=criticality if criticality in _CRITICALITIES else None,
                source=entry.source,
                begun=_begun(resource, entry.type),
            )
        )

    def _procedure(self, entry: _Entry) -> None:
        """A completed injection: CPT 20610/20611/27093/27095, a site in the injection-target
        system, or a SNOMED-coded procedure at the hip joint with injected agents."""
        resource, path = entry.resource, entry.path
        if _get_str(resource, "status", path) != "completed":
            return
        codes = _codes(resource.get("code"), path, "code")
        if not codes:
            return self._uncoded(entry, "Procedure")
        by_cpt = _has_code(codes, "cpt", _INJECTION_CPT)
        if not by_cpt and not resource.get("bodySite"):
            return
        site = self._site(entry, order=False)
        agents = self._agents(entry) if by_cpt or site.target else []
        # (the SNOMED test last: it matters only when neither the CPT code nor the target decides)
        if not (by_cpt or site.declared or (site.target and agents and any(c.system == "snomed" for c in codes))):
            return
        _, performed = self._instant(entry, _PROCEDURE_TIMES, codes)
        self.record.prior_injections.append(
            PriorInjection(codes, performed, site.target, site.side, agents, entry.source)
        )

    def _agents(self, entry: _Entry) -> list[Code]:
        """What was injected: usedCode codings and the codes of Medication/Substance usedReferences."""
        resource, path = entry.resource, entry.path
        agents = _list_codes(resource, "usedCode", path)
        for k, ref in enumerate(_get_list(resource, "usedReference", path)):
            used = self._follow(entry, ref, f"{path}.usedReference[{k}]", "usedReference")
            if used is not None and used.type in ("Medication", "Substance"):
                agents.extend(_codes(used.resource.get("code"), used.path, "code"))
        return _distinct(agents)

    def _site(self, entry: _Entry, *, order: bool) -> _Site:
        """Target and laterality from bodySite (laterality as a coding or a bodySite extension).

        For the injection order a bodySite without any coding is an error.
        """
        target, sides, declared = self._site_reading(entry, order=order)
        side = None
        if len(sides) == 1:
            side = sides.pop()
        elif sides:
            detail = f"bodySite gives conflicting laterality ({', '.join(sorted(sides))}); the side is unknown."
            self._issue("conflicting-laterality", entry.type, detail, entry.source, entry)
        return _Site(target, side, declared)

    @staticmethod
    def _site_reading(entry: _Entry, *, order: bool) -> tuple[str | None, set[str], bool]:
        """What bodySite says, without recording anything: the target (None: none named), the
        sides named, and whether the target was declared as an injection target."""
        resource, path = entry.resource, entry.path
        targets: set[str] = set()
        sides: set[str] = set()
        hip_joint = False
        for j, concept in enumerate(_get_list(resource, "bodySite", path)):
            keys = _code_keys(concept, path, "bodySite", j)
            if order and not keys:
                _fail(f"{path}.bodySite[{j}]", "the injection target has no coding; text alone cannot be read")
            if concept and concept.get("extension") is not None:  # (a truthy concept is an object here)
                where = f"{path}.bodySite[{j}]"
                for k, extension in enumerate(_get_list(concept, "extension", where)):
                    if type(extension) is dict:
                        value = extension.get("valueCodeableConcept")
                        keys += _code_keys(value, f"{where}.extension[{k}].valueCodeableConcept")
                        coding = extension.get("valueCoding")
                        if type(coding) is dict and (found := _code(coding, f"{where}.extension[{k}].valueCoding")):
                            keys.append((found.system, found.code))
            for system, code in keys:
                if system == "np-target":
                    targets.add(code)
                elif system == "snomed":
                    hip_joint = hip_joint or code == _HIP_JOINT_SNOMED
                    if code in _LATERALITY_SNOMED:
                        sides.add(_LATERALITY_SNOMED[code])
        if len(targets) > 1:
            _fail(f"{path}.bodySite", f"names several injection targets ({', '.join(sorted(targets))})")
        declared = bool(targets)
        return targets.pop() if targets else (_HIP_JOINT_TARGET if hip_joint else None), sides, declared

    def _service_request(self, entry: _Entry) -> None:
        self.service_requests.append(entry)  # sorted into order / planned surgery once all are seen

    def _planned_surgery(self, entry: _Entry) -> None:
        codes = _codes(entry.resource.get("code"), entry.path, "code")
        if not codes:
            return self._uncoded(entry, "ServiceRequest")
        _, date = self._instant(entry, _OCCURRENCE_TIMES, codes)
        side = self._site(entry, order=False).side
        self.record.planned_surgeries.append(
            PlannedSurgery(codes, date, side, entry.source, begun=_begun(entry.resource, entry.type))
        )

    def _operation_outcome(self, entry: _Entry) -> None:
        """Errors a FHIR server or CDS client reported instead of data."""
        for k, issue in enumerate(_get_list(entry.resource, "issue", entry.path)):
            if type(issue) is dict and issue.get("severity") in ("fatal", "error"):
                details = issue.get("details")
                text = issue.get("diagnostics") or (details.get("text") if type(details) is dict else None)
                detail = f"the source reported an error instead of data: {text or issue.get('code') or 'no details'}."
                self._issue("source-error", "OperationOutcome", detail, f"{entry.path}.issue[{k}]")

    # -- the injection order

    def _select_order(self, refs: Sequence[tuple[str, str]]) -> _Entry | None:
        """The ServiceRequest being ordered: the one named by ``refs``, else the one draft."""
        if refs:
            chosen: list[_Entry] = []
            for path, reference in refs:
                found = self.index.resolve(reference)
                if found is None:
                    _fail(path, f"{reference!r} names no resource in the request")
                if found.type != "ServiceRequest":
                    _fail(path, f"{reference!r} is a {found.type}, not a ServiceRequest")
                if all(found is not other for other in chosen):
                    chosen.append(found)
        else:
            chosen = [e for e in self.service_requests if e.resource.get("status") == "draft"]
        if len(chosen) <= 1:
            return chosen[0] if chosen else None
        injections = [entry for entry in chosen if _is_injection_request(entry)]
        if len(injections) > 1:
            names = ", ".join(entry.source for entry in injections)
            _fail(injections[1].path, f"several injection orders ({names}) and no order reference to choose one")
        return injections[0] if injections else None

    def _order(self, entry: _Entry) -> InjectionOrder:
        resource, path = entry.resource, entry.path
        site = self._site(entry, order=True)
        intents: list[str] = []
        for j, detail in enumerate(_get_list(resource, "orderDetail", path)):
            for system, code in _code_keys(detail, path, "orderDetail", j):
                if system == "np-intent" and code not in intents:
                    intents.append(code)
                elif system == "np-flag" and code not in self.record.flags:
                    self.record.flags.append(code)
        if len(intents) > 1:
            _fail(f"{path}.orderDetail", f"names several injection intents ({', '.join(intents)})")
        reasons = _list_codes(resource, "reasonCode", path)
        for k, ref in enumerate(_get_list(resource, "reasonReference", path)):
            reason = self._follow(entry, ref, f"{path}.reasonReference[{k}]", "reasonReference")
            if reason is not None:
                reasons.extend(_codes(reason.resource.get("code"), reason.path, "code"))
        return InjectionOrder(
            target=site.target,
            side=site.side,
            intent=intents[0] if intents else None,
            codes=_codes(resource.get("code"), path, "code"),
            reasons=_distinct(reasons),
            source=entry.source,
        )


def _is_injection_request(entry: _Entry) -> bool:
    """Whether a ServiceRequest looks like an injection order (CPT code, target or intent)."""
    resource, path = entry.resource, entry.path
    if _has_code(_codes(resource.get("code"), path, "code"), "cpt", _INJECTION_CPT):
        return True
    if any(code.system == "np-target" for code in _list_codes(resource, "bodySite", path)):
        return True
    return any(code.system == "np-intent" for code in _list_codes(resource, "orderDetail", path))


_HANDLERS: dict[str, Callable[[_Mapper, _Entry], None]] = {
    "Patient": _Mapper._patient,
    "Condition": _Mapper._condition,
    "MedicationRequest": _Mapper._medication_request,
    "MedicationStatement": _Mapper._medication_statement,
    "Observation": _Mapper._observation,
    "AllergyIntolerance": _Mapper._allergy,
    "Procedure": _Mapper._procedure,
    "ServiceRequest": _Mapper._service_request,
    "OperationOutcome": _Mapper._operation_outcome,
}


# --- public API ---------------------------------------------------------------------------------


def _parse_json(raw: bytes | bytearray | memoryview | str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        _fail("Bundle", f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}")


def record_from_bundle(
    bundle: JSON | bytes | str, *, order_ref: str | None = None, observation_codes: ObservationCodes | None = None
) -> PatientRecord:
    """Map a FHIR R4 Bundle (parsed, or raw JSON bytes/str) to a :class:`PatientRecord`.

    ``order_ref`` (``ServiceRequest/abc`` or a ``urn:uuid:`` fullUrl) names the injection order;
    without it the order is the one draft ServiceRequest (among several drafts, the one that
    looks like an injection). ``observation_codes``, when given, are the (system, code) pairs of
    the Observations the caller reads (an evaluator's rule set: ``Evaluator.observation_codes``):
    an Observation all of whose codings are of other codes is not mapped, as resource types the
    core does not need are not (see :func:`_reads`). Raises :class:`RecordError` for unusable input.
    """
    refs = [("order_ref", order_ref)] if order_ref is not None else []
    return _map_bundle(bundle, observation_codes, refs, own_order=False)


def _map_bundle(
    bundle: JSON | bytes | str, observation_codes: ObservationCodes | None, refs: list[tuple[str, str]], *, own_order: bool
) -> PatientRecord:
    """:func:`record_from_bundle`, or with ``own_order`` :func:`record_from_bundle_with_hip_order`."""
    try:
        try:
            return _map_entries(_entries_of(bundle, observation_codes), refs, own_order)
        except _RepeatedName:  # read lazily, a resource repeated a name: read it as orjson does
            return _map_entries(_entries_of(bundle, observation_codes, lazily=False), refs, own_order)
    except RecursionError:  # the JSON depth guard: see _too_deep
        _too_deep("Bundle")


def _map_entries(entries: list[_Entry], refs: list[tuple[str, str]], own_order: bool) -> PatientRecord:
    return _Mapper(entries, "Bundle").run(refs, own_order=own_order)


def _entries_of(
    bundle: JSON | bytes | str, observation_codes: ObservationCodes | None, *, lazily: bool = True
) -> list[_Entry]:
    """The entries of a Bundle given parsed or as JSON bytes (from bytes, read lazily unless
    ``lazily`` is False: see LAZY_READ_BYTES)."""
    if lazily and type(bundle) is bytes and len(bundle) >= LAZY_READ_BYTES:
        entries = _lazy_bundle_entries(bundle, "Bundle", observation_codes)
        if entries is not None:
            return entries
    data = _parse_json(bundle) if isinstance(bundle, (bytes, bytearray, memoryview, str)) else bundle
    return _bundle_entries(data, "Bundle", observation_codes)


def _too_deep(path: str) -> NoReturn:
    """The JSON depth guard. orjson reads at most 1024 levels, and the mapper itself never walks
    a value recursively: a value it quotes goes through :func:`_shown`, which names an array or
    object by its type. Should any step still recurse on a deeply nested value (a repr, a
    comparison), the RecursionError is bad input, not a fault of the service."""
    _fail(path, "a value is nested too deeply to be read")


def record_from_cds_hooks_request(request: JSON, *, observation_codes: ObservationCodes | None = None) -> PatientRecord:
    """Map a CDS Hooks order-select/order-sign request body to a :class:`PatientRecord`
    (``observation_codes``: as for :func:`record_from_bundle`).

    The record is built from ``context.draftOrders`` and every prefetch value that is a Bundle or
    a resource (null means no data); ``context.selections`` naming ServiceRequests choose the
    order. Without a Patient in the request, a bare one is made from ``context.patientId`` and a
    ``resource-missing`` DataIssue says that age and sex are unknown.
    """
    if type(request) is not dict:
        _fail("request", f"expected a CDS Hooks request object, found {_json_type(request)}")
    context = request.get("context")
    if type(context) is not dict:
        _fail("context", f"expected an object, found {_json_type(context)}")
    entries: list[_Entry] = []
    if context.get("draftOrders") is not None:
        entries += _bundle_entries(context["draftOrders"], "context.draftOrders", observation_codes)
    prefetch = request.get("prefetch")
    if prefetch is not None and type(prefetch) is not dict:
        _fail("prefetch", f"expected an object, found {_json_type(prefetch)}")
    for key, value in (prefetch or {}).items():
        if value is None:
            continue
        path = f"prefetch.{key}"
        if type(value) is dict and value.get("resourceType") == "Bundle":
            entries += _bundle_entries(value, path, observation_codes)
        else:
            entries.append(_resource_entry(value, path, observation_codes=observation_codes))
    entries = _unique(entries)

    stub = not any(entry.type == "Patient" for entry in entries)
    if stub:
        patient_id = context.get("patientId")
        if type(patient_id) is not str or not patient_id:
            _fail("context.patientId", "no Patient in the request and no patientId to name one")
        entries.append(_Entry("context.patientId", {"resourceType": "Patient", "id": patient_id}, "Patient"))

    refs: list[tuple[str, str]] = []
    for k, selection in enumerate(_get_list(context, "selections", "context")):
        if type(selection) is not str:
            _fail(f"context.selections[{k}]", f"expected a 'Type/id' string, found {_json_type(selection)}")
        if selection.startswith("ServiceRequest/"):
            refs.append((f"context.selections[{k}]", selection))

    record = _Mapper(entries, "request").run(refs)
    if stub:
        detail = "the request carries no Patient resource (prefetch absent or null); age and sex are unknown."
        record.data_issues.append(DataIssue("resource-missing", "Patient", detail, "context.patientId"))
    return record


def _unique(entries: Iterable[_Entry]) -> list[_Entry]:
    """Drop later copies of a resource already seen (a draft order echoed by a prefetch search)."""
    seen: set[str] = set()
    unique: list[_Entry] = []
    for entry in entries:
        key = entry.key
        if key is None or key not in seen:
            unique.append(entry)
            if key is not None:
                seen.add(key)
    return unique


# --- the cheap "not for us" answer --------------------------------------------------------------

NOT_HIP_PROBLEM = (
    "the draft order names no hip injection target (bodySite): it is not a hip injection order, so there is nothing to evaluate"
)


def record_from_bundle_with_hip_order(
    bundle: JSON | bytes | str, *, observation_codes: ObservationCodes | None = None
) -> PatientRecord:
    """:func:`record_from_bundle` for a Bundle that must carry its own hip injection order (no
    order is given beside it). Its draft ServiceRequests are looked at first
    (:meth:`_Mapper._refuse_if_not_for_us`): with no order, ``OrderNotForUs`` at ``order``; when the
    order names no hip injection target (no injection-target code, no SNOMED hip joint), at
    ``order.target``; either way before the rest of the record is mapped, since no decision could
    come of it."""
    return _map_bundle(bundle, observation_codes, [], own_order=True)


