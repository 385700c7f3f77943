"""The rule-set format, declared once.

Every mapping of the format is a :class:`Record`: its keys, which are required, the closed
vocabulary or pattern of each value, and a description. The builder
(:mod:`needlepoint.rulesets.builder`) checks documents against these records (unknown and missing
keys, enumerations, text, patterns), and :mod:`needlepoint.rulesets.schema` generates the JSON
Schemas for editors from the same records, so the two cannot drift apart. What a record cannot
say (references between files, the condition language, placeholders) the builder checks in code.

The vocabularies themselves belong to the rule-set model (:mod:`needlepoint.core.ruleset`) and to
the record (:mod:`needlepoint.core.record`); this module only says where in the format each is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from needlepoint.core.conditions import ENGINE_RESERVED_NAMES, FACT_FIELDS
from needlepoint.core.record import (
    ALLERGY_CRITICALITIES,
    ALLERGY_SEVERITIES,
    FLAGS,
    INJECTATE_CATEGORIES as INJECTATE_CODES,
    INTENTS,
    SEXES,
    SIDES,
    TARGETS,
)
from needlepoint.core.ruleset import (
    CATEGORIES,
    CODE_SYSTEMS,
    DEFERRAL_REASONS,
    INJECTATE_CATEGORIES,
    MODALITIES,
    PROVENANCE_TAGS,
    RECOMMENDATIONS,
    SCOPES,
    SEVERITIES,
    STATUSES,
    UNIT_CONVERSIONS,
)

from .diagnostics import describe, suggest


def number(value: Any) -> bool:
    """A number in a rule set's YAML: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")
SEMVER_HINT = "a semantic version (MAJOR.MINOR.PATCH; quote it)"
RULE_ID = re.compile(r"^[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+$")
ALIAS = re.compile(r"^[a-z][a-z0-9_]*$")  # rule aliases and aggregate (summary field) names
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PARAM_REF = r"^\$[A-Za-z_][A-Za-z0-9_]*$"
UCUM_TEXT = re.compile(r"[!-~]+")  # UCUM codes are printable ASCII without spaces (use fullmatch)
NONBLANK = {"type": "string", "minLength": 1, "pattern": r"\S"}

# Names an aggregate (a field of the summary fact) or a parameter may not take: the fact kind
# (t), the engine's identity and session fields (id, sid), value-set tags and the fact index.
# An aggregate named id or sid breaks every evaluation; one named t disables every summary rule.
RESERVED_NAMES = ENGINE_RESERVED_NAMES

# Closed vocabularies of string fields of the prepared facts. Every road in (FHIR, protobuf,
# case files) validates them; an allergy without a recorded severity is prepared as "unknown".
VOCABULARIES: dict[tuple[str, str], tuple[str, ...]] = {
    ("patient", "sex"): SEXES,
    ("order", "target"): TARGETS,
    ("order", "side"): SIDES,
    ("order", "intent"): INTENTS,
    ("order", "requested_modality"): MODALITIES,
    ("prior_injection", "target"): TARGETS,
    ("allergy", "severity"): (*ALLERGY_SEVERITIES, "unknown"),  # "unknown": prepared for a severity not recorded
    ("allergy", "criticality"): ALLERGY_CRITICALITIES,
    ("flag", "name"): FLAGS,
}
VOCABULARY_NAMES = {
    ("patient", "sex"): "patient sex",
    ("order", "target"): "injection target",
    ("order", "side"): "side",
    ("order", "intent"): "injection intent",
    ("order", "requested_modality"): "modality",
    ("prior_injection", "target"): "injection target",
    ("allergy", "severity"): "allergy severity",
    ("allergy", "criticality"): "allergy criticality",
    ("flag", "name"): "clinician flag",
}
KIND_DOCS = {
    "patient": "The patient (one fact): age in completed years, sex.",
    "condition": "An active condition; test its code by value set.",
    "medication": "An active medication; test its code by value set.",
    "observation": "The newest usable result per concept (observations.yaml), "
        "in the concept's canonical unit; age_days is its age.",
    "allergy": "A recorded allergy; severity is mild, moderate, severe or unknown.",
    "prior_injection": "A completed injection: days_ago, target, same_target, same_side, agents by value set.",
    "planned_surgery": "A planned procedure: days_until, ipsilateral, code by value set.",
    "order": "The injection being ordered (one fact).",
    "injectate": "A planned injectate; test its code by value set.",
    "flag": "A clinician-asserted flag.",
    "data_issue": "A value that was set aside (unit missing or unknown, implausible, undated).",
    "summary": "Derived numbers, one field per aggregate in aggregates.yaml.",
}
assert set(KIND_DOCS) == set(FACT_FIELDS)
OPERATOR_DOCS = {
    "eq": "equals",
    "ne": "differs from (a missing field passes no test, not even ne)",
    "gt": "greater than",
    "gte": "greater than or equal to",
    "lt": "less than",
    "lte": "less than or equal to",
    "in": "one of the listed values",
    "exists": "true: the field is present; false: it is absent",
}
OUTCOMES = ("modality", "injectates", "deferral", "caution", "missing_data")  # at least one per rule


@dataclass(frozen=True)
class Key:
    """One key of a record. ``schema`` is the JSON Schema of its value; ``values`` the closed
    vocabulary the builder checks it against (also in the schema). A required key that is
    missing is reported with ``missing_code`` by the builder, or only by lint when
    ``policy`` (the schema still requires it, so editors ask for it)."""

    name: str
    schema: dict
    required: bool = False
    values: tuple[str, ...] = ()
    missing_code: str = "NP001"
    policy: bool = False
    hint: str = ""  # what a value matching the schema's pattern is, in words
    checked: bool = True  # False: the builder checks this key in its own way (a reference, another code)

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` as this key's value, for a key whose schema is a string,
        a boolean or an enumeration; None when it is right, or when the schema is of another
        kind (the builder checks those in code). Worded to follow "<what> <key>"."""
        if not self.checked:
            return None
        schema, types = self.schema, self.schema.get("type")
        if types == ["string", "null"] and value is None:
            return None
        if types in ("string", ["string", "null"]):
            if "enum" in schema:
                if not isinstance(value, str) or value not in schema["enum"]:
                    return f": {describe(value)} is not one of {', '.join(schema['enum'])}{suggest(value, schema['enum'])}"
            elif not isinstance(value, str):
                return f" must be {'non-empty ' if schema.get('minLength') else ''}text; got {describe(value)}"
            elif schema.get("minLength") and not value.strip():
                return f" must be non-empty text; got {describe(value)}"
            elif self.hint and not re.match(schema["pattern"], value):
                return f": {describe(value)} is not {self.hint}"
        elif types == "boolean" and not isinstance(value, bool):
            return f" is true or false; got {describe(value)}"
        return None


@dataclass(frozen=True)
class Record:
    """A mapping of the format: its keys in order and what else its schema says."""

    name: str
    keys: tuple[Key, ...]
    extra: dict | None = None  # further schema keywords (oneOf, anyOf, ...) placed after the keys

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    @property
    def required(self) -> tuple[Key, ...]:
        """The keys the builder requires."""
        return tuple(k for k in self.keys if k.required and not k.policy)

    def key(self, name: str) -> Key:
        return next(k for k in self.keys if k.name == name)

    def values(self, name: str) -> tuple[str, ...]:
        return self.key(name).values

    def schema(self, *, nullable: bool = False, order: tuple[str, ...] | None = None) -> dict:
        """The JSON Schema of the record: an object with exactly these keys."""
        names = order or self.allowed
        out: dict[str, Any] = {"type": ["object", "null"] if nullable else "object"}
        required = [k.name for k in self.keys if k.required]
        if required:
            out["required"] = required
        out["additionalProperties"] = False
        out.update(self.extra or {})
        out["properties"] = {n: self.key(n).schema for n in names}
        return out


def enum(values: tuple[str, ...], description: str | None = None) -> dict:
    out: dict[str, Any] = {"type": "string", "enum": list(values)}
    if description:
        out["description"] = description
    return out


def text(description: str | None = None) -> dict:
    return {**NONBLANK, "description": description} if description else NONBLANK


_MODALITY = enum(MODALITIES)
_PARAM = {"$ref": "#/$defs/param"}
_SCALAR = {"type": ["number", "string", "boolean"]}

RULESET = Record(
    "ruleset.yaml",
    (
        Key("id", text(), required=True),
        Key("version", {"type": "string", "pattern": SEMVER.pattern}, required=True, hint=SEMVER_HINT),
        Key("title", text(), required=True),
        Key("status", enum(STATUSES), values=STATUSES),
        Key("validation", text("Who validated the rule set, or that nobody has."), required=True),
        Key("description", {"type": "string"}),
        Key(
            "requested_modality",
            {
                "type": "object",
                "propertyNames": {"enum": list(MODALITIES)},
                "additionalProperties": {"type": "string", "minLength": 1},
                "description": "Modality -> value set of order codes that mean the clinician chose it.",
            },
            values=MODALITIES,
        ),
        Key(
            "modality_bound_injectates",
            {
                "type": "object",
                "propertyNames": {"enum": list(INJECTATE_CATEGORIES)},
                "additionalProperties": {"oneOf": [_MODALITY, {"type": "array", "items": _MODALITY, "minItems": 1}]},
                "description": "Injectate category -> the modality (or modalities) it is only used with, e.g. "
                    "IODINATED_CONTRAST: FLUOROSCOPY."
                " A decision whose modality avoids or does not retain them does not suggest the injectate.",
            },
            values=INJECTATE_CATEGORIES,
        ),
    ),
)

PARAMETER = Record(
    "parameter",
    (
        Key("value", _SCALAR, required=True),
        Key("unit", {"type": ["string", "null"], "description": "UCUM unit"}),
        Key(
            "provenance",
            enum(
                PROVENANCE_TAGS, "V published and read, V2 secondary, R recalled, C local convention (needs sign-off), P payer."
            ),
            required=True,
            values=PROVENANCE_TAGS,
        ),
        Key("source", NONBLANK, required=True),
        Key("description", NONBLANK, required=True),
        Key("allowed", {"type": "array", "minItems": 1, "items": _SCALAR}),
    ),
)

CODE_LIST = Record("code list", (Key("codes", {}), Key("prefixes", {})))

VALUE_SET = Record(
    "value set",
    (
        Key("title", NONBLANK, required=True),
        Key("codes", {"$ref": "#/$defs/codeLists"}),
        Key(
            "groups",
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {"$ref": "#/$defs/codeLists"},
                "description": "Named members (e.g. one per agent); the value set is their union.",
            },
        ),
        Key("source", {"type": "string"}),
        Key("note", {"type": "string"}),
    ),
    extra={"anyOf": [{"required": ["codes"]}, {"required": ["groups"]}]},
)

_CONVERSION = {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "enum": list(UNIT_CONVERSIONS)}]}
assert all(re.fullmatch(r"[a-z0-9-]+", s) for s in CODE_SYSTEMS)  # nothing to escape (JS regexes reject needless escapes)
_SYSTEM_CODE = f"^({'|'.join(CODE_SYSTEMS)})#\\S+$"

CONCEPT = Record(
    "observation concept",
    (
        Key("title", NONBLANK, required=True),
        Key(
            "codes",
            {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "pattern": _SYSTEM_CODE},
                "description": "system#code, e.g. loinc#6301-6",
            },
            required=True,
        ),
        Key(
            "unit",
            {"type": "string", "description": "Canonical unit that rules compare in; omit for coded results."},
            checked=False,
        ),
        Key(
            "units",
            {
                "type": "object",
                "propertyNames": {"pattern": "^[!-~]+$"},
                "additionalProperties": _CONVERSION,
                "description": "Accepted UCUM codes, matched exactly (case-sensitive), each with its factor to the canonical "
                    "unit or a named conversion.",
            },
        ),
        Key(
            "display_units",
            {
                "type": "object",
                "propertyNames": {"minLength": 1, "pattern": "^\\S(.*\\S)?$"},
                "additionalProperties": _CONVERSION,
                "description": "Free-text units as lab reports show them (FHIR Quantity.unit, e.g. K/uL), read only for a value "
                    "without a UCUM code; list only text that cannot mean anything else for the concept.",
            },
        ),
        Key(
            "plausible",
            {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": {"type": "number"},
                "description": "[low, high] in the canonical unit; values outside are set aside.",
            },
        ),
    ),
)

COUNTABLE = tuple(k for k in FACT_FIELDS if k != "summary")  # the fact kinds an aggregate may count

AGGREGATE = Record(
    "aggregate",
    (
        Key("count", enum(COUNTABLE, "Count facts of this kind that pass where."), checked=False),  # NP005
        Key("where", {"type": ["object", "null"]}),
        Key(
            "criteria",
            {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/positivePattern"},
                "description": "Count the patterns that match at least one fact.",
            },
        ),
        Key(
            "distinct_groups_of",
            {"type": "string", "description": "Count the distinct groups of this value set the matching facts fall into."},
            checked=False,
        ),  # NP003
        Key("description", NONBLANK, required=True),
    ),
    extra={
        "oneOf": [{"required": ["count"]}, {"required": ["criteria"]}],
        "allOf": [
            {
                "if": {"required": ["count"], "properties": {"count": {"const": kind}}},
                "then": {"properties": {"where": {"$ref": f"#/$defs/fields-{kind}"}}},
            }
            for kind in COUNTABLE
        ],
    },
)

MODALITY = Record(
    "modality",
    (
        Key("preferred", {"anyOf": [_MODALITY, _PARAM]}, values=MODALITIES),
        Key("acceptable", {"type": "array", "items": _MODALITY}, values=MODALITIES),
        Key("avoid", {"type": "array", "items": _MODALITY}, values=MODALITIES),
    ),
)

INJECTATE = Record(
    "injectate",
    (
        Key("category", enum(INJECTATE_CATEGORIES), required=True, values=INJECTATE_CATEGORIES),
        Key("recommendation", enum(RECOMMENDATIONS), required=True, values=RECOMMENDATIONS),
    ),
)

DEFERRAL = Record(
    "deferral",
    (
        Key("reason", enum(DEFERRAL_REASONS), required=True, values=DEFERRAL_REASONS),
        Key("severity", enum(SEVERITIES, "HARD: not now; SOFT: only after clinician review."), required=True, values=SEVERITIES),
        Key("scope", enum(SCOPES, "PROCEDURE, or the injectate category it blocks (default PROCEDURE)."), values=SCOPES),
    ),
)

THEN = Record(
    "then",
    (
        Key(
            "modality",
            {
                "description": "Resolved by rule precedence; every avoid accumulates.",
                "type": "object",
                "minProperties": 1,
                **{k: v for k, v in MODALITY.schema().items() if k != "type"},
            },
        ),
        Key(
            "injectates",
            {
                "description": "Per category the most restrictive recommendation wins.",
                "type": "array",
                "minItems": 1,
                "items": INJECTATE.schema(),
            },
        ),
        Key("deferral", DEFERRAL.schema()),
        Key("caution", text("A caution code, e.g. PLATELETS_BORDERLINE.")),
        Key("missing_data", text("A missing-data code; may name {alias.field}.")),
        Key("message", text("Shown to people; {alias.field} and {$parameter} are filled in."), required=True),
    ),
    extra={"anyOf": [{"required": [k]} for k in OUTCOMES]},
)

EVIDENCE = Record(
    "evidence",
    (
        Key("citation", NONBLANK, required=True, missing_code="NP011", checked=False),
        Key("strength", text("Kind of source and provenance tag, e.g. 'consensus guideline [V]'."), required=True),
    ),
)

RULE = Record(
    "rule",
    (
        Key(
            "id",
            {
                "type": "string",
                "pattern": RULE_ID.pattern,
                "description": "Upper-case words joined by hyphens, e.g. DEF-INR-HIGH.",
            },
            required=True,
            hint="a rule id: upper-case words joined by hyphens, e.g. DEF-INR-HIGH",
        ),
        Key(
            "version",
            {"type": "string", "pattern": SEMVER.pattern, "description": "Semantic version of this rule."},
            required=True,
            hint=SEMVER_HINT,
        ),
        Key("title", NONBLANK, required=True),
        Key("category", enum(CATEGORIES), required=True, values=CATEGORIES),
        Key("precedence", {"type": "integer", "description": "Modality resolution: the higher wins (default 0)."}),
        Key(
            "exclusive",
            {
                "type": "boolean",
                "description": "When this rule fires its outcome is the whole decision: "
                    "no other rule's outcome is added (default false).",
            },
        ),
        Key("when", {"$ref": "#/$defs/alternative"}),
        Key(
            "when_any",
            {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/alternative"},
                "description": "Alternatives; the rule fires once per alternative that holds.",
            },
        ),
        Key("then", {"$ref": "#/$defs/then"}, required=True),
        Key("rationale", NONBLANK, required=True, missing_code="NP011", checked=False),
        Key(
            "evidence",
            {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/evidence"}},
            required=True,
            missing_code="NP011",
            policy=True,
        ),
    ),
    extra={"oneOf": [{"required": ["when"]}, {"required": ["when_any"]}]},
)

OVERLAY = Record(
    "a site overlay",
    (
        Key("site", NONBLANK),
        Key("parameters", {"type": "object", "propertyNames": {"pattern": PARAM_NAME.pattern}, "additionalProperties": _SCALAR}),
    ),
)

MIN_PRECEDENCE, MAX_PRECEDENCE = 0, 1000

# --- the shape of a code in each system (lint checks codes against these; the schemas use them) --

# ICD-10-CM: a letter, two digits (the third may be A or B: C4A, M1A, Z3A), then up to four
# characters, with or without the dot EHRs often leave out (L03.115 and L03115 are the same code
# and match the same records; see core.ruleset.match_key). U is allowed as the first letter for
# U07.1 and U09.9. A trailing dot with nothing after it (M16.) is neither spelling.
CODE_PATTERNS: dict[str, str] = {
    "icd10cm": r"^[A-Z][0-9][0-9AB](\.?[0-9A-TV-Z]{1,4})?$",
    "loinc": r"^[0-9]{1,5}-[0-9]$",
    "rxnorm": r"^[1-9][0-9]*$",
    "atc": r"^[A-Z]([0-9]{2}([A-Z]([A-Z]([0-9]{2})?)?)?)?$",
    "snomed": r"^[1-9][0-9]{5,17}$",
    "cpt": r"^[0-9]{4}[0-9FTU]$",
    "np-obs": r"^[a-z0-9]+(-[a-z0-9]+)*$",
}
PREFIX_PATTERNS: dict[str, str] = {
    "icd10cm": r"^[A-Z]([0-9]([0-9AB](\.?[0-9A-TV-Z]{1,4})?)?)?$",
    "atc": CODE_PATTERNS["atc"],
}
CODE_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "np-target": TARGETS,
    "np-intent": INTENTS,
    "np-injectate": INJECTATE_CODES,
    "np-flag": FLAGS,
}
CODE_SHAPES = {
    "icd10cm": "a letter, two characters and optionally 1-4 more, with or without the dot "
        "(M16.11 or M1611; prefixes may be shorter: M16, M25.55)",
    "loinc": "digits, a hyphen and a check digit (6301-6)",
    "rxnorm": "an RxCUI: digits only (855332)",
    "atc": "an ATC level: B, B01, B01A, B01AA or B01AA03",
    "snomed": "an SCTID: 6-18 digits, no leading zero (239872002)",
    "cpt": "four digits and a digit or F, T or U (77002, 0001U)",
    "np-obs": "lower-case words joined by hyphens",
}
