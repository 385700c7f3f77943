"""A rule set as data: rules, value sets, parameters, observation concepts and aggregates.

:func:`build_ruleset` turns plain documents (already parsed from YAML or JSON by an adapter such
as :mod:`needlepoint.rulesets`) into a validated, immutable :class:`RuleSet`. Every error names
the document and key path. The digest is a sha256 over the canonical JSON of all documents
and the parameter values in force, so it changes whenever anything that can change a decision
changes, and not otherwise.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .conditions import FACT_FIELDS, RESERVED_FIELDS, ParamRef, Pattern, RuleSetError, parse_pattern

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
CODE_SYSTEMS = ("icd10cm", "snomed", "rxnorm", "atc", "loinc", "cpt", "np-target", "np-intent", "np-injectate", "np-flag", "np-obs")
PREFIX_SYSTEMS = ("icd10cm", "atc")  # hierarchical codes that value sets may match by prefix
UNIT_CONVERSIONS = ("fahrenheit_to_celsius", "ifcc_to_ngsp")  # named non-linear conversions
UCUM_TEXT = re.compile(r"[!-~]+")  # UCUM codes are printable ASCII without spaces (use fullmatch)
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")
_RULE_ID = re.compile(r"^[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+$")
_TEMPLATE = re.compile(r"\{([^{}]+)\}")

# Message placeholders (rendered in core/resolve.py):
#   {alias}, {alias.display}   what the matched fact is, in words ("Warfarin Sodium 5 MG Oral Tablet")
#   {alias.field}              a field of it, with a human unit ("3.4", "25 ×10⁹/L", "45 days")
#   {alias.when}               its clinical date ("30 May 2025")
#   {alias.age}                how long before the decision's instant that was ("3 days ago", "in 4 weeks")
#   {alias.when+$param}        its date plus a parameter's days ("28 August 2025")
#   {$param}                   a parameter with its unit ("7 days", "3")
#   {$param.since}             the date that many days before the instant ("26 May 2025")
TEMPLATE_FIELDS = ("display", "when", "age")  # placeholder fields every matched fact has
_PLACEHOLDER = re.compile(r"^(?:\$(?P<param>[A-Za-z_][A-Za-z0-9_]*)(?:\.(?P<pmod>since))?|(?P<alias>[a-z][a-z0-9_]*)(?:\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)(?:\+\$(?P<plus>[A-Za-z_][A-Za-z0-9_]*))?)?)$")


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
    groups: dict[str, "ValueSet"] = field(default_factory=dict)  # named members (e.g. one per agent)

    def contains(self, system: str, code: str) -> bool:
        code = match_key(system, code)  # a record's code, as sent: L03.115 and L03115 are one code
        if code in self.codes.get(system, ()):
            return True
        return any(code.startswith(p) for p in self.prefixes.get(system, ()))

    def size(self) -> int:
        return sum(map(len, self.codes.values())) + sum(map(len, self.prefixes.values()))


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


def _need(mapping: dict, key: str, where: str, kind: type | tuple = str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise RuleSetError(where, f"missing required key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise RuleSetError(f"{where}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _only(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise RuleSetError(where, f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def build_ruleset(documents: dict[str, Any], *, overlay: dict[str, Any] | None = None, overlay_name: str = "") -> RuleSet:
    """Validate and assemble a rule set.

    ``documents`` has keys ``ruleset`` (metadata), ``parameters``, ``value_sets``,
    ``observations``, ``aggregates`` and ``rules`` (a list of ``(source, rule_dict)``), each
    as parsed from its file. ``overlay`` maps parameter names to site values layered on top.
    """
    meta = documents["ruleset"]
    where = "ruleset.yaml"
    _only(meta, {"id", "version", "title", "status", "validation", "description", "requested_modality", "modality_bound_injectates"}, where)
    rs_id = _need(meta, "id", where)
    version = _need(meta, "version", where)
    if not _SEMVER.match(version):
        raise RuleSetError(f"{where}.version", f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    status = meta.get("status", "draft")
    if status not in STATUSES:
        raise RuleSetError(f"{where}.status", f"status must be one of {', '.join(STATUSES)}")
    validation = _need(meta, "validation", where)

    params = _build_params(documents.get("parameters") or {}, rs_id, overlay or {}, overlay_name)
    value_sets = _build_value_sets(documents.get("value_sets") or {})
    observations = _build_observations(documents.get("observations") or {})
    aggregates = _build_aggregates(documents.get("aggregates") or {}, value_sets, params)
    requested = dict(meta.get("requested_modality") or {})
    for modality, vs_id in requested.items():
        _enum(modality, MODALITIES, f"{where}.requested_modality")
        if vs_id not in value_sets:
            raise RuleSetError(f"{where}.requested_modality.{modality}", f"unknown value set {vs_id!r}")
    bound = _modality_bound_injectates(meta.get("modality_bound_injectates"), f"{where}.modality_bound_injectates")
    summary_fields = {a.name for a in aggregates}

    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for source, raw in documents.get("rules") or []:
        rule = _build_rule(raw, source, summary_fields, params, value_sets, observations)
        if rule.id in seen:
            raise RuleSetError(source, f"rule {rule.id} is already defined at {seen[rule.id]}")
        seen[rule.id] = source
        rules.append(rule)
    if not rules:
        raise RuleSetError("rules/", "a rule set needs at least one rule")

    digest_input = {k: v for k, v in documents.items() if k != "rules"}
    digest_input["rules"] = [raw for _, raw in documents.get("rules") or []]
    digest_input["parameters_in_force"] = {n: p.value for n, p in sorted(params.items())}
    layers = (rs_id, overlay_name) if overlay_name else (rs_id,)
    return RuleSet(
        id=rs_id,
        version=version,
        title=_need(meta, "title", where),
        status=status,
        validation=validation,
        description=str(meta.get("description", "")).strip(),
        rules=tuple(rules),
        value_sets=value_sets,
        params=params,
        observations=observations,
        aggregates=tuple(aggregates),
        digest=canonical_digest(digest_input),
        layers=layers,
        requested_modality=requested,
        modality_bound_injectates=bound,
    )


def _modality_bound_injectates(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    """``modality_bound_injectates``: injectate categories that only make sense with some
    modalities (``IODINATED_CONTRAST: FLUOROSCOPY``, or a list). The resolver does not suggest such
    an injectate in a decision whose modality avoids, or does not retain, every one of them."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RuleSetError(where, "a mapping of injectate category to the modality (or list of modalities) it is used with")
    bound = {}
    for category, modalities in raw.items():
        _enum(category, INJECTATE_CATEGORIES, where)
        listed = [modalities] if isinstance(modalities, str) else modalities
        if not isinstance(listed, list) or not listed:
            raise RuleSetError(f"{where}.{category}", f"a modality or a non-empty list of modalities; got {modalities!r}")
        bound[category] = tuple(_enum(m, MODALITIES, f"{where}.{category}") for m in dict.fromkeys(listed))
    return bound


def _build_params(raw: dict, rs_id: str, overlay: dict, overlay_name: str) -> dict[str, Param]:
    params: dict[str, Param] = {}
    for name, spec in raw.items():
        where = f"parameters.yaml.{name}"
        if not isinstance(spec, dict):
            raise RuleSetError(where, "a parameter is a mapping with value, provenance, source and description")
        _only(spec, {"value", "unit", "provenance", "source", "description", "allowed"}, where)
        if "value" not in spec:
            raise RuleSetError(where, "missing required key 'value'")
        provenance = _need(spec, "provenance", where)
        if provenance not in PROVENANCE_TAGS:
            raise RuleSetError(f"{where}.provenance", f"one of {', '.join(PROVENANCE_TAGS)}")
        allowed = tuple(spec["allowed"]) if "allowed" in spec else None
        default = spec["value"]
        value, layer = default, rs_id
        if name in overlay:
            value, layer = overlay[name], overlay_name
            if type(value) is not type(default) and not (isinstance(default, (int, float)) and isinstance(value, (int, float))):
                raise RuleSetError(f"{overlay_name}.{name}", f"expected a value like {default!r}, got {value!r}")
        if allowed is not None and value not in allowed:
            raise RuleSetError(where, f"value {value!r} is not one of {list(allowed)}")
        params[name] = Param(
            name=name,
            value=value,
            default=default,
            unit=spec.get("unit"),
            provenance=provenance,
            source=_need(spec, "source", where),
            description=_need(spec, "description", where),
            allowed=allowed,
            layer=layer,
        )
    unknown = set(overlay) - set(params)
    if unknown:
        raise RuleSetError(overlay_name or "overlay", f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return params


def _code_lists(spec: dict, where: str) -> tuple[dict[str, frozenset[str]], dict[str, tuple[str, ...]]]:
    codes: dict[str, frozenset[str]] = {}
    prefixes: dict[str, tuple[str, ...]] = {}
    for system, entry in spec.items():
        path = f"{where}.{system}"
        if system not in CODE_SYSTEMS:
            raise RuleSetError(path, f"unknown code system; use one of {', '.join(CODE_SYSTEMS)}")
        if isinstance(entry, list):
            entry = {"codes": entry}
        if not isinstance(entry, dict):
            raise RuleSetError(path, "a list of codes, or {codes: [...], prefixes: [...]}")
        _only(entry, {"codes", "prefixes"}, path)
        # keyed as records are looked up (match_key), so a dotted or dotless ICD-10-CM code or
        # prefix in the file matches either spelling in a record
        exact = [match_key(system, str(c)) for c in entry.get("codes", [])]
        pre = [match_key(system, str(c)) for c in entry.get("prefixes", [])]
        if pre and system not in PREFIX_SYSTEMS:
            raise RuleSetError(path, f"prefix matching is only meaningful for {', '.join(PREFIX_SYSTEMS)}")
        codes[system] = frozenset(exact)
        prefixes[system] = tuple(pre)
    return codes, prefixes


def _build_value_sets(raw: dict) -> dict[str, ValueSet]:
    value_sets: dict[str, ValueSet] = {}
    for vs_id, spec in raw.items():
        where = f"valuesets.{vs_id}"
        if not isinstance(spec, dict):
            raise RuleSetError(where, "a value set is a mapping with title and codes or groups")
        _only(spec, {"title", "codes", "groups", "source", "note"}, where)
        title = _need(spec, "title", where)
        groups: dict[str, ValueSet] = {}
        for gname, gspec in (spec.get("groups") or {}).items():
            gcodes, gpre = _code_lists(gspec or {}, f"{where}.groups.{gname}")
            groups[gname] = ValueSet(id=f"{vs_id}/{gname}", title=gname, codes=gcodes, prefixes=gpre)
        codes, prefixes = _code_lists(spec.get("codes") or {}, f"{where}.codes")
        for group in groups.values():  # a value set is the union of its own codes and its groups
            for system, members in group.codes.items():
                codes[system] = codes.get(system, frozenset()) | members
            for system, pre in group.prefixes.items():
                prefixes[system] = prefixes.get(system, ()) + pre
        if not any(codes.values()) and not any(prefixes.values()):
            raise RuleSetError(where, "value set has no codes")
        value_sets[vs_id] = ValueSet(id=vs_id, title=title, codes=codes, prefixes=prefixes, groups=groups)
    return value_sets


def _build_observations(raw: dict) -> dict[str, ObservationConcept]:
    concepts: dict[str, ObservationConcept] = {}
    claimed: dict[str, str] = {}
    for cid, spec in raw.items():
        where = f"observations.yaml.{cid}"
        if not isinstance(spec, dict):
            raise RuleSetError(where, "an observation concept is a mapping")
        _only(spec, {"title", "codes", "unit", "units", "display_units", "plausible"}, where)
        codes = _need(spec, "codes", where, list)
        for code in codes:
            if code in claimed:
                raise RuleSetError(f"{where}.codes", f"{code} already belongs to concept {claimed[code]}")
            claimed[code] = cid
        unit = spec.get("unit")
        units = _unit_conversions(spec, "units", where)
        display_units = _unit_conversions(spec, "display_units", where)
        for text in units:
            if not UCUM_TEXT.fullmatch(text):
                raise RuleSetError(f"{where}.units.{text}", "not a UCUM code (UCUM codes are ASCII without spaces); list display text under display_units")
        for text, conv in display_units.items():
            if text != text.strip():
                raise RuleSetError(f"{where}.display_units.{text}", "display text is matched with surrounding spaces removed, so write it without them")
            if text in units and units[text] != conv:
                raise RuleSetError(f"{where}.display_units.{text}", f"also a UCUM code of this concept converting by {units[text]!r}; one text cannot mean two things")
        if unit is None:
            if units or display_units:
                raise RuleSetError(f"{where}.unit", "accepted units need a canonical unit to convert to")
        elif units.get(unit) != 1:
            raise RuleSetError(f"{where}.units", f"the canonical unit {unit!r} must be an accepted UCUM code with factor 1")
        plausible = spec.get("plausible")
        if plausible is not None:
            ok = isinstance(plausible, list) and len(plausible) == 2 and all(_is_number(x) for x in plausible)
            if not ok or plausible[0] >= plausible[1]:
                raise RuleSetError(f"{where}.plausible", f"[low, high] in the canonical unit with low < high; got {plausible!r}")
        concepts[cid] = ObservationConcept(
            id=cid,
            title=_need(spec, "title", where),
            codes=frozenset(codes),
            unit=unit,
            units=units,
            plausible=tuple(plausible) if plausible else None,
            display_units=display_units,
        )
    return concepts


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unit_conversions(spec: dict, key: str, where: str) -> dict[str, float | str]:
    """``units`` or ``display_units`` of a concept: unit text -> a positive factor to the
    canonical unit, or the name of a non-linear conversion."""
    raw = spec.get(key) or {}
    if not isinstance(raw, dict):
        raise RuleSetError(f"{where}.{key}", "a mapping of unit to a factor or a named conversion")
    for text, conv in raw.items():
        path = f"{where}.{key}.{text}"
        if not isinstance(text, str) or not text:
            raise RuleSetError(path, "a unit is non-empty text")
        if isinstance(conv, str):
            if conv not in UNIT_CONVERSIONS:
                raise RuleSetError(path, f"unknown conversion {conv!r}; known: {', '.join(UNIT_CONVERSIONS)}")
        elif not _is_number(conv) or not 0 < conv < float("inf"):
            raise RuleSetError(path, f"a positive factor to the canonical unit, or a named conversion; got {conv!r}")
    return dict(raw)


def _build_aggregates(raw: dict, value_sets: dict[str, ValueSet], params: dict[str, Param]) -> list[Aggregate]:
    aggregates = []
    for name, spec in raw.items():
        where = f"aggregates.yaml.{name}"
        if name in RESERVED_FIELDS:
            raise RuleSetError(where, f"{name!r} is reserved by the engine ({', '.join(RESERVED_FIELDS)}); choose another summary field name")
        if not isinstance(spec, dict):
            raise RuleSetError(where, "an aggregate is a mapping with count/where or criteria")
        _only(spec, {"count", "where", "criteria", "distinct_groups_of", "description"}, where)
        if ("count" in spec) == ("criteria" in spec):
            raise RuleSetError(where, "an aggregate has exactly one of count (with where) or criteria")
        if "count" in spec:
            kind = _need(spec, "count", where)
            if kind not in FACT_FIELDS or kind == "summary":
                raise RuleSetError(f"{where}.count", f"unknown fact kind {kind!r}")
            patterns = [parse_pattern(name, {kind: spec.get("where") or {}}, f"{where}.where", set())]
        else:
            criteria = _need(spec, "criteria", where, list)
            patterns = [parse_pattern(f"{name}_{i}", c, f"{where}.criteria[{i}]", set()) for i, c in enumerate(criteria)]
            if any(p.negated for p in patterns):
                raise RuleSetError(f"{where}.criteria", "a criterion counts facts that match; it cannot be a not: pattern")
        for pattern in patterns:
            _check_references(pattern, where, params, value_sets)
        groups_of = spec.get("distinct_groups_of")
        if groups_of is not None and (groups_of not in value_sets or not value_sets[groups_of].groups):
            raise RuleSetError(f"{where}.distinct_groups_of", f"{groups_of!r} is not a value set with groups")
        mode = "criteria" if "criteria" in spec else ("distinct_groups" if groups_of else "count")
        aggregates.append(Aggregate(name, tuple(patterns), mode, groups_of, _need(spec, "description", where)))
    return aggregates


def _check_references(pattern: Pattern, where: str, params: dict[str, Param], value_sets: dict[str, ValueSet]) -> list[str]:
    used = []
    for test in pattern.tests:
        if isinstance(test.operand, ParamRef):
            if test.operand.name not in params:
                raise RuleSetError(where, f"unknown parameter ${test.operand.name}")
            used.append(test.operand.name)
        elif test.op == "in" and isinstance(test.operand, str) and test.operand not in value_sets:
            raise RuleSetError(where, f"unknown value set {test.operand!r}")
    return used


def _precedence(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
        raise RuleSetError(where, f"precedence is a whole number from 0 to 1000; got {value!r}")
    return value


def _enum(value: Any, allowed: tuple, where: str) -> str:
    if value not in allowed:
        raise RuleSetError(where, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _build_outcome(raw: dict, where: str, params: dict[str, Param]) -> tuple[Outcome, list[str]]:
    _only(raw, {"modality", "injectates", "deferral", "caution", "missing_data", "message"}, where)
    used: list[str] = []
    modality = raw.get("modality")
    if modality is not None:
        _only(modality, {"preferred", "acceptable", "avoid"}, f"{where}.modality")
        modality = dict(modality)
        pref = modality.get("preferred")
        if isinstance(pref, str) and pref.startswith("$"):
            if pref[1:] not in params:
                raise RuleSetError(f"{where}.modality.preferred", f"unknown parameter {pref}")
            used.append(pref[1:])
        elif pref is not None:
            _enum(pref, MODALITIES, f"{where}.modality.preferred")
        for key in ("acceptable", "avoid"):
            modality[key] = tuple(_enum(m, MODALITIES, f"{where}.modality.{key}") for m in modality.get(key, []))
    injectates = []
    for i, inj in enumerate(raw.get("injectates") or []):
        path = f"{where}.injectates[{i}]"
        _only(inj, {"category", "recommendation"}, path)
        injectates.append(
            {
                "category": _enum(inj.get("category"), INJECTATE_CATEGORIES, f"{path}.category"),
                "recommendation": _enum(inj.get("recommendation"), RECOMMENDATIONS, f"{path}.recommendation"),
            }
        )
    deferral = raw.get("deferral")
    if deferral is not None:
        _only(deferral, {"reason", "severity", "scope"}, f"{where}.deferral")
        deferral = {
            "reason": _enum(deferral.get("reason"), DEFERRAL_REASONS, f"{where}.deferral.reason"),
            "severity": _enum(deferral.get("severity"), SEVERITIES, f"{where}.deferral.severity"),
            "scope": _enum(deferral.get("scope", "PROCEDURE"), SCOPES, f"{where}.deferral.scope"),
        }
    message = _need(raw, "message", where).strip()
    for ref in _TEMPLATE.findall(message):
        placeholder = parse_placeholder(ref)
        if placeholder is None:
            raise RuleSetError(f"{where}.message", f"{{{ref}}} is not a placeholder: {{alias}}, {{alias.field}}, {{alias.when+$param}}, {{$param}} or {{$param.since}}")
        if placeholder.param is not None:
            if placeholder.param not in params:
                raise RuleSetError(f"{where}.message", f"unknown parameter {{{ref}}}")
            if placeholder.modifier and not isinstance(params[placeholder.param].value, (int, float)):
                raise RuleSetError(f"{where}.message", f"{{{ref}}} counts days, but ${placeholder.param} is not a number")
            used.append(placeholder.param)
    if not (modality or injectates or deferral or raw.get("caution") or raw.get("missing_data")):
        raise RuleSetError(where, "an outcome needs at least one of modality, injectates, deferral, caution, missing_data")
    outcome = Outcome(
        modality=modality,
        injectates=tuple(injectates),
        deferral=deferral,
        caution=raw.get("caution"),
        missing_data=raw.get("missing_data"),
        message=message,
    )
    return outcome, used


def _build_rule(raw: Any, source: str, summary_fields: set[str], params: dict[str, Param], value_sets: dict[str, ValueSet], observations: dict) -> Rule:
    if not isinstance(raw, dict):
        raise RuleSetError(source, "a rule is a mapping")
    rid = _need(raw, "id", source)
    where = f"{source} {rid}"
    _only(raw, {"id", "version", "title", "category", "precedence", "exclusive", "when", "when_any", "then", "rationale", "evidence"}, where)
    exclusive = raw.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise RuleSetError(f"{where}.exclusive", f"exclusive is true or false; got {exclusive!r}")
    if not _RULE_ID.match(rid):
        raise RuleSetError(f"{where}.id", "rule ids are upper-case words joined by hyphens, e.g. DEF-INR-HIGH")
    version = _need(raw, "version", where)
    if not _SEMVER.match(version):
        raise RuleSetError(f"{where}.version", f"{version!r} is not a semantic version")
    category = _enum(raw.get("category"), CATEGORIES, f"{where}.category")
    if ("when" in raw) == ("when_any" in raw):
        raise RuleSetError(where, "a rule has exactly one of when (all patterns) or when_any (a list of alternatives)")
    blocks = [raw["when"]] if "when" in raw else raw["when_any"]
    if not isinstance(blocks, list) or not blocks:
        raise RuleSetError(f"{where}.when_any", "a non-empty list of alternatives")
    used: list[str] = []
    alternatives = []
    for i, block in enumerate(blocks):
        path = f"{where}.when" if "when" in raw else f"{where}.when_any[{i}]"
        if not isinstance(block, dict) or not block:
            raise RuleSetError(path, "a mapping of alias to pattern, e.g. {inr: {observation: {concept: inr}}}")
        patterns = []
        for alias, spec in block.items():
            if not re.match(r"^[a-z][a-z0-9_]*$", alias):
                raise RuleSetError(f"{path}.{alias}", "aliases are lower-case identifiers")
            pattern = parse_pattern(alias, spec, f"{path}.{alias}", summary_fields)
            used += _check_references(pattern, f"{path}.{alias}", params, value_sets)
            for test in pattern.tests:
                if pattern.kind == "observation" and test.field == "concept" and test.op == "eq" and test.operand not in observations:
                    raise RuleSetError(f"{path}.{alias}", f"unknown observation concept {test.operand!r}")
            patterns.append(pattern)
        if all(p.negated for p in patterns):
            raise RuleSetError(path, "an alternative needs at least one positive pattern")
        patterns.sort(key=lambda p: p.negated)  # the engine needs negations after positive patterns
        alternatives.append(tuple(patterns))
    outcome, used_in_outcome = _build_outcome(_need(raw, "then", where, dict), f"{where}.then", params)
    aliases = {p.alias: p for alt in alternatives for p in alt if not p.negated}
    for ref in _TEMPLATE.findall(outcome.message + (outcome.missing_data or "")):
        alias = ref.partition(".")[0]
        missing_in = [i for i, alt in enumerate(alternatives) if alias not in {p.alias for p in alt if not p.negated}]
        if not ref.startswith("$") and alias in aliases and missing_in:
            raise RuleSetError(f"{where}.then", f"{{{ref}}} names {alias!r}, which alternative {missing_in[0]} does not match; every alternative must bind it")
        if not ref.startswith("$"):
            placeholder = parse_placeholder(ref)
            fld = placeholder.field if placeholder is not None else ref
            kind = aliases[alias].kind if alias in aliases else None
            known = summary_fields if kind == "summary" else set(FACT_FIELDS.get(kind, ()))
            if placeholder is None or kind is None or (fld and fld not in known and fld not in TEMPLATE_FIELDS):
                raise RuleSetError(f"{where}.then.message", f"{{{ref}}} names no matched fact field")
    evidence = []
    for i, ev in enumerate(raw.get("evidence") or []):
        path = f"{where}.evidence[{i}]"
        _only(ev, {"citation", "strength"}, path)
        evidence.append(Evidence(citation=_need(ev, "citation", path), strength=_need(ev, "strength", path)))
    return Rule(
        id=rid,
        version=version,
        title=_need(raw, "title", where),
        category=category,
        precedence=_precedence(raw.get("precedence", 0), f"{where}.precedence"),
        alternatives=tuple(alternatives),
        then=outcome,
        rationale=_need(raw, "rationale", where).strip(),
        evidence=tuple(evidence),
        params=tuple(dict.fromkeys(used + used_in_outcome)),
        source=source,
        exclusive=exclusive,
    )
