"""JSON Schemas (draft 2020-12) of the rule-set files, generated from the format description.

The records of :mod:`needlepoint.rulesets.format` give every mapping's keys, required keys,
vocabularies and descriptions; the condition language comes from the fact kinds and fields of
:mod:`needlepoint.core.conditions`. ``rulesets/schema/`` holds the generated files (each rule
file names its schema on line 1, and ``.vscode/settings.json`` maps the rest), and a test keeps
them equal to what this module generates. Regenerate them with
``needlepoint rules schema rulesets/schema``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from needlepoint.core.conditions import FACT_FIELDS, OPERATORS
from needlepoint.core.ruleset import CODE_SYSTEMS, PREFIX_SYSTEMS

from . import format as fmt

_SCHEMA = "https://json-schema.org/draft/2020-12/schema"


def _pattern_defs(kinds: Iterable[str]) -> dict:
    kinds = list(kinds)
    docs = fmt.OPERATOR_DOCS
    assert set(docs) == set(OPERATORS)
    number = {"anyOf": [{"type": "number"}, {"$ref": "#/$defs/param"}]}
    defs: dict[str, Any] = {
        "param": {
            "type": "string",
            "pattern": fmt.PARAM_REF,
            "description": "A site parameter from parameters.yaml, e.g. $inr_defer_above.",
        },
        "number": number,
        "numberTest": {
            "description": "A number, $parameter, or {operator: value}.",
            "anyOf": [
                {"$ref": "#/$defs/number"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        **{
                            op: {"$ref": "#/$defs/number", "description": docs[op]}
                            for op in ("eq", "ne", "gt", "gte", "lt", "lte")
                        },
                        "in": {"type": "array", "minItems": 1, "items": {"type": "number"}, "description": docs["in"]},
                        "exists": {"type": "boolean", "description": docs["exists"]},
                    },
                },
            ],
        },
        "boolTest": {
            "description": "true, false, $parameter, or {eq|ne: value, exists: bool}.",
            "anyOf": [
                {"type": "boolean"},
                {"$ref": "#/$defs/param"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "eq": {"anyOf": [{"type": "boolean"}, {"$ref": "#/$defs/param"}], "description": docs["eq"]},
                        "ne": {"anyOf": [{"type": "boolean"}, {"$ref": "#/$defs/param"}], "description": docs["ne"]},
                        "in": {"type": "array", "minItems": 1, "items": {"type": "boolean"}, "description": docs["in"]},
                        "exists": {"type": "boolean", "description": docs["exists"]},
                    },
                },
            ],
        },
        "codesTest": {
            "description": "Coded fields are tested by value-set membership only: {in: value-set-id}.",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "in": {"type": "string", "minLength": 1, "description": "a value set id (valuesets/*.yaml)"},
                "exists": {"type": "boolean", "description": docs["exists"]},
            },
        },
    }

    def string_test(name: str, values: tuple[str, ...] | None) -> str:
        literal = {"type": "string", "enum": list(values)} if values else {"type": "string"}
        defs[name] = {
            "description": "A value, $parameter, or {eq|ne: value, in: [values], exists: bool}."
            + (f" Values: {', '.join(values)}." if values else ""),
            "anyOf": [
                literal,
                {"$ref": "#/$defs/param"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "eq": {"anyOf": [literal, {"$ref": "#/$defs/param"}], "description": docs["eq"]},
                        "ne": {"anyOf": [literal, {"$ref": "#/$defs/param"}], "description": docs["ne"]},
                        "in": {"type": "array", "minItems": 1, "items": literal, "description": docs["in"]},
                        "exists": {"type": "boolean", "description": docs["exists"]},
                    },
                },
            ],
        }
        return name

    string_test("stringTest", None)
    for kind in kinds:
        if kind == "summary":
            defs["fields-summary"] = {
                "description": fmt.KIND_DOCS[kind],
                "type": ["object", "null"],
                "propertyNames": {"pattern": fmt.ALIAS.pattern},
                "additionalProperties": {"$ref": "#/$defs/numberTest"},
            }
            continue
        properties = {}
        for fld, ftype in FACT_FIELDS[kind].items():
            if ftype == "string":
                vocab = fmt.VOCABULARIES.get((kind, fld))
                ref = string_test(f"stringTest-{kind}-{fld}", vocab) if vocab else "stringTest"
            else:
                ref = {"number": "numberTest", "bool": "boolTest", "codes": "codesTest"}[ftype]
            properties[fld] = {"$ref": f"#/$defs/{ref}"}
        defs[f"fields-{kind}"] = {
            "description": fmt.KIND_DOCS[kind],
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": properties,
        }
    kind_props = {kind: {"$ref": f"#/$defs/fields-{kind}"} for kind in kinds}
    defs["positivePattern"] = {
        "description": "One fact kind mapped to its field tests, "
            "e.g. {observation: {concept: inr, value: {gt: $inr_defer_above}}}.",
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": kind_props,
    }
    defs["pattern"] = {
        "description": "A pattern, or not: a pattern (no fact may match it).",
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {"not": {"$ref": "#/$defs/positivePattern"}, **kind_props},
    }
    return defs


def _rules_schema() -> dict:
    defs = _pattern_defs(FACT_FIELDS)
    defs["alternative"] = {
        "description": "Aliases mapped to patterns; all must hold.",
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": fmt.ALIAS.pattern},
        "additionalProperties": {"$ref": "#/$defs/pattern"},
    }
    defs["then"] = fmt.THEN.schema()
    defs["evidence"] = fmt.EVIDENCE.schema()
    defs["rule"] = fmt.RULE.schema()
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint rules file (rulesets/<id>/rules/*.yaml)",
        "description": "A list of rules. Generated by needlepoint.rulesets.schema; `needlepoint rules lint` checks what a "
            "schema cannot (references, codes, rules that never fire, bands).",
        "type": ["array", "null"],
        "items": {"$ref": "#/$defs/rule"},
        "$defs": defs,
    }


def _code_item(system: str, prefix: bool) -> dict:
    if system in fmt.CODE_VOCABULARIES:
        return {"type": "string", "enum": list(fmt.CODE_VOCABULARIES[system])}
    pattern = (fmt.PREFIX_PATTERNS if prefix else fmt.CODE_PATTERNS).get(system)
    item: dict[str, Any] = {"type": "string"} if prefix else {"type": ["string", "integer"]}
    if pattern:
        item["pattern"] = pattern
    return item


def _valuesets_schema() -> dict:
    systems = {}
    for system in CODE_SYSTEMS:
        codes = {"type": "array", "items": _code_item(system, False)}
        long_form = {"codes": codes}
        if system in PREFIX_SYSTEMS:
            long_form["prefixes"] = {
                "type": "array",
                "items": _code_item(system, True),
                "description": "codes that start with one of these match",
            }
        systems[system] = {"anyOf": [codes, {"type": "object", "additionalProperties": False, "properties": long_form}]}
    code_lists = {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": systems}
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint value sets (rulesets/<id>/valuesets/*.yaml)",
        "type": ["object", "null"],
        "additionalProperties": {"$ref": "#/$defs/valueSet"},
        "$defs": {"codeLists": code_lists, "valueSet": fmt.VALUE_SET.schema()},
    }


def _parameters_schema() -> dict:
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint site parameters (rulesets/<id>/parameters.yaml)",
        "type": ["object", "null"],
        "propertyNames": {"pattern": fmt.PARAM_NAME.pattern, "not": {"enum": list(fmt.RESERVED_NAMES)}},
        "additionalProperties": fmt.PARAMETER.schema(),
    }


def _observations_schema() -> dict:
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint observation concepts (rulesets/<id>/observations.yaml)",
        "type": ["object", "null"],
        "additionalProperties": fmt.CONCEPT.schema(),
    }


def _aggregates_schema() -> dict:
    kinds = [k for k in FACT_FIELDS if k != "summary"]
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint aggregates (rulesets/<id>/aggregates.yaml)",
        "type": ["object", "null"],
        "propertyNames": {"pattern": fmt.ALIAS.pattern, "not": {"enum": list(fmt.RESERVED_NAMES)}},
        "additionalProperties": {"$ref": "#/$defs/aggregate"},
        "$defs": {**_pattern_defs(kinds), "aggregate": fmt.AGGREGATE.schema()},
    }


def _ruleset_schema() -> dict:
    return {"$schema": _SCHEMA, "title": "Needlepoint rule set (rulesets/<id>/ruleset.yaml)", **fmt.RULESET.schema()}


def _overlay_schema() -> dict:
    return {"$schema": _SCHEMA, "title": "Needlepoint site overlay", **fmt.OVERLAY.schema()}


def json_schemas() -> dict[str, dict]:
    """The JSON Schemas (draft 2020-12) of the rule-set files, by file name."""
    return {
        "rules.schema.json": _rules_schema(),
        "ruleset.schema.json": _ruleset_schema(),
        "parameters.schema.json": _parameters_schema(),
        "observations.schema.json": _observations_schema(),
        "aggregates.schema.json": _aggregates_schema(),
        "valuesets.schema.json": _valuesets_schema(),
        "overlay.schema.json": _overlay_schema(),
    }


def schema_text(schema: dict) -> str:
    """A schema as its committed file holds it."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(schema_text(schema), encoding="utf-8")
        written.append(path)
    return written

