"""The one builder: rule-set documents in, the :class:`~needlepoint.core.ruleset.RuleSet` model
out, with every problem as a :class:`~needlepoint.rulesets.diagnostics.Diagnostic`.

The builder reads every document once, checks it against the format
(:mod:`needlepoint.rulesets.format`) and the references between documents (value sets,
parameters, observation concepts, aggregates, message placeholders), and keeps going after a
problem so that one run reports them all, each at its file, line and column. What it could read
it keeps as *entries* (a parameter, a value set, a rule with its parsed patterns...) that carry
the document and key path they were written at; ``needlepoint rules lint`` analyses those. Only a
rule set without errors is assembled into the model.

Codes (shared with lint, which documents them all in :mod:`needlepoint.authoring.lint`): NP000
unreadable file, NP001 structure, NP002 wrong type or value, NP003 unknown value set, NP004
unknown parameter, NP005 unknown fact kind, field, aggregate, concept or placeholder, NP006 a code
that is not text or not ``system#code``, NP011 missing rationale or citation, NP014 a bad
overlay, NP015 a duplicate definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from needlepoint.core.conditions import Pattern
from needlepoint.core.ruleset import (
    CODE_SYSTEMS,
    PREFIX_SYSTEMS,
    UNIT_CONVERSIONS,
    Aggregate,
    ObservationConcept,
    Param,
    RuleSet,
    ValueSet,
    canonical_digest,
    match_key,
)

from . import format as fmt
from .assemble import assemble_rule
from .diagnostics import ERROR, WARNING, Diagnostic, describe, suggest, suggestion_in
from .format import number
from .reader import Document
from .rules import PatternEntry, RuleChecks, RuleEntry
from .sources import Sources


@dataclass
class ParamEntry:
    name: str
    value: Any  # the value in force (a valid overlay value, else the rule set's)
    default: Any
    allowed: tuple | None
    doc: Document
    path: tuple
    spec: dict
    layer: str | None = None  # the overlay that set the value in force; None: the rule set


@dataclass
class ValueSetEntry:
    id: str
    doc: Document
    path: tuple
    codes: dict[str, set[str]] = field(default_factory=dict)  # spelled as match_key gives them
    prefixes: dict[str, list[str]] = field(default_factory=dict)
    # the named members, each (codes, prefixes) as above; codes and prefixes are their union with
    # the value set's own
    groups: dict[str, tuple[dict[str, set[str]], dict[str, list[str]]]] = field(default_factory=dict)
    spec: Any = None
    code_lists: list[tuple[tuple, str, bool]] = field(default_factory=list)  # (path of the list, system, prefixes?)

    def covers(self, system: str, code: str) -> bool:
        return code in self.codes.get(system, ()) or any(code.startswith(p) for p in self.prefixes.get(system, ()))

    def value_set(self, title: str) -> ValueSet:
        """The model's value set (the builder found this entry without error)."""
        groups = {name: _frozen(f"{self.id}/{name}", name, *lists) for name, lists in self.groups.items()}
        return _frozen(self.id, title, self.codes, self.prefixes, groups)


def _frozen(
    vs_id: str, title: str, codes: dict[str, set[str]], prefixes: dict[str, list[str]], groups: dict | None = None
) -> ValueSet:
    return ValueSet(
        id=vs_id,
        title=title,
        codes={system: frozenset(c) for system, c in codes.items()},
        prefixes={system: tuple(p) for system, p in prefixes.items()},
        groups=groups or {},
    )


@dataclass
class ConceptEntry:
    id: str
    doc: Document
    path: tuple
    unit: str | None
    plausible: tuple[float, float] | None
    spec: Any = None
    valid: bool = False


@dataclass
class AggregateEntry:
    name: str
    doc: Document
    path: tuple
    mode: str  # "count" | "criteria"
    size: int  # number of criteria
    patterns: list[PatternEntry] = field(default_factory=list)
    spec: Any = None
    valid: bool = False


@dataclass
class Built:
    """What the builder made of a rule set: the model when there is no error, and in any case
    every diagnostic and every entry it could read."""

    sources: Sources
    diagnostics: list[Diagnostic]
    ruleset: RuleSet | None
    params: dict[str, ParamEntry]
    values: dict[str, Any]
    value_sets: dict[str, ValueSetEntry]
    concepts: dict[str, ConceptEntry]
    aggregates: dict[str, AggregateEntry]
    rules: list[RuleEntry]
    rule_count: int
    used_params: set[str]
    used_value_sets: set[str]


class Reporter:
    """Diagnostics about places in a rule set's documents, worded and placed alike for the
    builder and for lint: the file, line and column, where it is as people read it (the rule's
    source and id in a rules file), the key path, and a suggestion when the message makes one."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.diagnostics: list[Diagnostic] = []

    def add(
        self,
        code: str,
        severity: str,
        doc: Document,
        path: Iterable,
        message: str,
        *,
        key: bool = True,
        at: tuple[int, int] | None = None,
    ) -> None:
        path = tuple(path)
        line, column = at if at is not None else doc.pos(path, key=key)
        self.diagnostics.append(
            Diagnostic(
                code,
                severity,
                doc.file,
                line,
                column,
                self._where(doc, path),
                self._key_path(doc, path),
                message,
                suggestion_in(message),
            )
        )

    def error(
        self, code: str, doc: Document, path: Iterable, message: str, *, key: bool = True, at: tuple[int, int] | None = None
    ) -> None:
        self.add(code, ERROR, doc, path, message, key=key, at=at)

    def warn(self, code: str, doc: Document, path: Iterable, message: str, *, key: bool = True) -> None:
        self.add(code, WARNING, doc, path, message, key=key)

    def _is_rules(self, doc: Document) -> bool:
        return any(doc is d for d in self.sources.rules)

    def _key_path(self, doc: Document, path: tuple) -> str:
        """``when.plt.observation.value.lt``: the key path, within the rule for a rules file."""
        if self._is_rules(doc) and path and isinstance(path[0], int):
            path = path[1:]
        elif len(path) < 2:
            return ""
        return _dotted(path)

    def _where(self, doc: Document, path: tuple) -> str:
        """The document and key path as people read it, e.g. ``parameters.yaml.inr_defer_above``
        or, in a rules file, ``rules/10-bleeding.yaml:12 DEF-INR-HIGH.then``."""
        if self._is_rules(doc) and path and isinstance(path[0], int):
            rule = doc.value[path[0]] if isinstance(doc.value, list) and path[0] < len(doc.value) else None
            rid = rule.get("id") if isinstance(rule, dict) and isinstance(rule.get("id"), str) else ""
            inner = _dotted(path[1:])
            head = f"{self.sources.rule_source(doc, path[0])} {rid}".rstrip()
            return f"{head}.{inner}" if inner else head
        inner = _dotted(path)
        return f"{doc.rel}.{inner}" if inner else doc.rel


class Builder(RuleChecks, Reporter):
    def __init__(self, sources: Sources) -> None:
        Reporter.__init__(self, sources)
        self.params: dict[str, ParamEntry] = {}
        self.values: dict[str, Any] = {}
        self.value_sets: dict[str, ValueSetEntry] = {}
        self.concepts: dict[str, ConceptEntry] = {}
        self.aggregates: dict[str, AggregateEntry] = {}
        self.rules: list[RuleEntry] = []
        self.rule_ids: dict[str, tuple[Document, tuple]] = {}
        self.rule_count = 0
        self.used_value_sets: set[str] = set()
        self.used_params: set[str] = set()
        self.overlay_name = ""

    # -- the run --

    def build(self) -> Built:
        s = self.sources
        for doc in s.all_documents():
            if doc.problem is not None:
                self.diagnostics.append(
                    Diagnostic("NP000", ERROR, doc.file, doc.problem.line, doc.problem.column, doc.rel, "", doc.problem.message)
                )
        if s.missing is not None:
            self.diagnostics.append(
                Diagnostic("NP000", ERROR, s.missing, 1, 1, s.missing, "", "not a rule set: ruleset.yaml is missing")
            )
        if s.meta is not None:
            self.check_meta()
            if s.parameters is not None and s.parameters.loaded:
                self.check_parameters(s.parameters)
            self.values = {name: p.value for name, p in self.params.items()}
            if s.overlay is not None:
                self.check_overlay(s.overlay)  # before anything compares with parameter values
            for doc in s.value_sets:
                self.check_value_sets(doc)
            if s.observations is not None and s.observations.loaded:
                self.check_observations(s.observations)
            if s.aggregates is not None and s.aggregates.loaded:
                self.check_aggregates(s.aggregates)
            self.check_requested_modality()
            for doc in s.rules:
                self.check_rules_file(doc)
            if self.rule_count == 0 and all(d.loaded for d in s.rules) and s.meta.loaded:
                self.error("NP001", s.meta, (), "the rule set has no rules: rules/*.yaml defines none")
        ruleset = None
        if not any(d.severity == ERROR for d in self.diagnostics):
            ruleset = self.assemble()
        return Built(
            s, self.diagnostics, ruleset, self.params, self.values, self.value_sets, self.concepts, self.aggregates,
            self.rules, self.rule_count, self.used_params, self.used_value_sets,
        )  # fmt: skip

    # -- structure helpers --

    def file_mapping(self, doc: Document, shape: str) -> dict | None:
        """A file's top-level mapping (an empty file is an empty mapping), or None once it is
        reported as not one; ``shape`` says what the file maps, e.g. "aggregates.yaml is a mapping
        of summary field name to its definition"."""
        raw = doc.value if doc.value is not None else {}
        if isinstance(raw, dict):
            return raw
        self.error("NP002", doc, (), f"{shape}; got {describe(raw)}", key=False)
        return None

    def mapping(
        self,
        doc: Document,
        path: tuple,
        value: Any,
        record: fmt.Record | None,
        what: str,
        *,
        allowed: Iterable[str] | None = None,
    ) -> bool:
        """Is ``value`` a mapping of ``record`` (or with keys among ``allowed``)? Reports unknown
        and missing keys."""
        if not isinstance(value, dict):
            self.error("NP002", doc, path, f"{what} must be a mapping; got {describe(value)}", key=False)
            return False
        allowed = tuple(allowed) if allowed is not None else record.allowed if record is not None else ()
        for k in value:
            if k not in allowed:
                self.error(
                    "NP001",
                    doc,
                    path + (k,),
                    f"{what}: unknown key {k!r}{suggest(k, allowed)}; allowed: {', '.join(map(str, allowed))}",
                )
        for k in record.required if record is not None else ():
            if k.name not in value:
                self.error(k.missing_code, doc, path, f"{what}: missing required key {k.name!r}", key=False)
        return True

    def check_scalars(self, doc: Document, path: tuple, value: dict, record: fmt.Record, what: str) -> bool:
        """Check the text, true/false and enumerated values of a mapping of ``record`` against
        their keys' schemas; False when any is wrong."""
        ok = True
        for key in record.keys:
            if key.name in value:
                problem = key.problem(value[key.name])
                if problem is not None:
                    self.error("NP002", doc, path + (key.name,), f"{what} {key.name}{problem}", key=False)
                    ok = False
        return ok

    def enum(self, doc: Document, path: tuple, value: Any, allowed: tuple, what: str) -> bool:
        if not isinstance(value, str) or value not in allowed:
            self.error(
                "NP002",
                doc,
                path,
                f"{what}: {describe(value)} is not one of {', '.join(allowed)}{suggest(value, allowed)}",
                key=False,
            )
            return False
        return True

    def param_ref(self, doc: Document, path: tuple, name: str, what: str) -> bool:
        if name not in self.params:
            self.error("NP004", doc, path, f"{what}: unknown parameter ${name}{suggest(name, self.params)}", key=False)
            return False
        self.used_params.add(name)
        return True

    def value_set_ref(self, doc: Document, path: tuple, vs_id: Any, what: str) -> bool:
        if not isinstance(vs_id, str) or vs_id not in self.value_sets:
            self.error("NP003", doc, path, f"{what}: unknown value set {vs_id!r}{suggest(vs_id, self.value_sets)}", key=False)
            return False
        self.used_value_sets.add(vs_id)
        return True

    # -- ruleset.yaml --

    def check_meta(self) -> None:
        doc = self.sources.meta
        if doc is None or not doc.loaded:
            return
        meta = doc.value if doc.value is not None else {}
        if not self.mapping(doc, (), meta, fmt.RULESET, "ruleset.yaml"):
            return
        self.check_scalars(doc, (), meta, fmt.RULESET, "ruleset.yaml")
        requested = meta.get("requested_modality")
        modalities = fmt.RULESET.values("requested_modality")
        if requested is not None and self.mapping(
            doc, ("requested_modality",), requested, None, "requested_modality", allowed=modalities
        ):
            for modality, vs_id in requested.items():
                if not isinstance(vs_id, str):
                    self.error(
                        "NP002",
                        doc,
                        ("requested_modality", modality),
                        f"requested_modality {modality}: a value set id; got {describe(vs_id)}",
                        key=False,
                    )
        bound = meta.get("modality_bound_injectates")
        what = (
            "modality_bound_injectates: a mapping of injectate category to the modality (or list of modalities) it is used with"
        )
        if bound is not None and not isinstance(bound, dict):
            self.error("NP002", doc, ("modality_bound_injectates",), f"{what}; got {describe(bound)}", key=False)
        elif bound is not None:
            categories = fmt.RULESET.values("modality_bound_injectates")
            for category, modalities_of in bound.items():
                bpath = ("modality_bound_injectates", category)
                if category not in categories:
                    self.error(
                        "NP002",
                        doc,
                        bpath,
                        f"modality_bound_injectates: {category!r} is not one of "
                        f"{', '.join(categories)}{suggest(category, categories)}",
                    )
                    continue
                listed = [modalities_of] if isinstance(modalities_of, str) else modalities_of
                what = f"modality_bound_injectates {category}"
                if not isinstance(listed, list) or not listed:
                    self.error(
                        "NP002",
                        doc,
                        bpath,
                        f"{what}: a modality or a non-empty list of modalities; got {describe(modalities_of)}",
                        key=False,
                    )
                    continue
                for i, modality in enumerate(listed):
                    self.enum(
                        doc,
                        bpath + ((i,) if isinstance(modalities_of, list) else ()),
                        modality,
                        fmt.MODALITY.values("preferred"),
                        what,
                    )

    def check_requested_modality(self) -> None:
        doc = self.sources.meta
        if (
            doc is None
            or not doc.loaded
            or not isinstance(doc.value, dict)
            or not isinstance(doc.value.get("requested_modality"), dict)
        ):
            return
        for modality, vs_id in doc.value["requested_modality"].items():
            if isinstance(vs_id, str):
                self.value_set_ref(doc, ("requested_modality", modality), vs_id, f"requested_modality {modality}")

    def reserved(self, doc: Document, path: tuple, name: str, what: str) -> None:
        """Report a parameter or aggregate that takes a name the engine reserves."""
        names = ", ".join(fmt.RESERVED_NAMES)
        self.error("NP002", doc, path, f"{what}: {name!r} is reserved by the engine ({names}); choose another name")

    # -- parameters.yaml --

    def check_parameters(self, doc: Document) -> None:
        raw = self.file_mapping(doc, "parameters.yaml is a mapping of parameter name to its definition")
        if raw is None:
            return
        for name, spec in raw.items():
            path = (name,)
            what = f"parameter {name}"
            if not isinstance(name, str) or not fmt.PARAM_NAME.match(name):
                self.error(
                    "NP002",
                    doc,
                    path,
                    f"{what}: parameter names are identifiers (letters, digits, underscores), so that rules can write ${name}",
                )
            elif name in fmt.RESERVED_NAMES:
                self.reserved(doc, path, name, what)
            if not self.mapping(doc, path, spec, fmt.PARAMETER, what):
                continue
            value = spec.get("value")
            if "value" in spec and not (isinstance(value, (str, bool)) or number(value)):
                self.error(
                    "NP002",
                    doc,
                    path + ("value",),
                    f"{what}: value must be a number, text or true/false; got {describe(value)}",
                    key=False,
                )
            self.check_scalars(doc, path, spec, fmt.PARAMETER, what)
            allowed = spec.get("allowed")
            if "allowed" in spec:
                if not isinstance(allowed, list) or not allowed:
                    self.error("NP002", doc, path + ("allowed",), f"{what}: allowed is a non-empty list of values", key=False)
                    allowed = None
                elif "value" in spec and value not in allowed:
                    self.error(
                        "NP002",
                        doc,
                        path + ("value",),
                        f"{what}: value {value!r} is not one of the allowed values {allowed}",
                        key=False,
                    )
            if "value" in spec and isinstance(name, str):
                self.params[name] = ParamEntry(
                    name, value, value, tuple(allowed) if isinstance(allowed, list) else None, doc, path, spec
                )

    # -- site overlay --

    def check_overlay(self, doc: Document) -> None:
        self.overlay_name = doc.rel.rsplit(".", 1)[0] if doc.file else ""  # a file's stem, unless it names its site
        if not doc.loaded:
            return
        raw = doc.value if doc.value is not None else {}
        if not self.mapping(doc, (), raw, fmt.OVERLAY, "a site overlay"):
            return
        if self.check_scalars(doc, (), raw, fmt.OVERLAY, "overlay") and "site" in raw:
            self.overlay_name = raw["site"]
        params = raw.get("parameters")
        if params is None:
            return
        if not isinstance(params, dict):
            self.error(
                "NP002",
                doc,
                ("parameters",),
                f"overlay parameters is a mapping of parameter name to value; got {describe(params)}",
                key=False,
            )
            return
        for name, value in params.items():
            ppath = ("parameters", name)
            if name not in self.params:
                self.error("NP014", doc, ppath, f"the overlay sets unknown parameter {name!r}{suggest(name, self.params)}")
                continue
            param = self.params[name]
            default = param.default
            same_type = (number(default) and number(value)) or (type(value) is type(default))
            if not same_type:
                self.error(
                    "NP014",
                    doc,
                    ppath,
                    f"parameter {name}: expected {'a number' if number(default) else type(default).__name__} like {default!r}; "
                    f"got {describe(value)}",
                    key=False,
                )
            elif param.allowed is not None and value not in param.allowed:
                self.error(
                    "NP014",
                    doc,
                    ppath,
                    f"parameter {name}: {value!r} is not one of the allowed values {list(param.allowed)}",
                    key=False,
                )
            else:
                self.values[name] = value
                param.value, param.layer = value, self.overlay_name

    # -- valuesets/*.yaml --

    def check_value_sets(self, doc: Document) -> None:
        if not doc.loaded:
            return
        raw = self.file_mapping(doc, "a value-set file is a mapping of value set id to its definition")
        if raw is None:
            return
        for vs_id, spec in raw.items():
            path = (vs_id,)
            what = f"value set {vs_id}"
            if vs_id in self.value_sets:
                other = self.value_sets[vs_id]
                self.error("NP015", doc, path, f"{what} is already defined at {other.doc.rel}:{other.doc.pos(other.path)[0]}")
                continue
            vs = ValueSetEntry(str(vs_id), doc, path, spec=spec)
            self.value_sets[vs_id] = vs
            if not self.mapping(doc, path, spec, fmt.VALUE_SET, what):
                continue
            self.check_scalars(doc, path, spec, fmt.VALUE_SET, what)
            if spec.get("codes") is not None:
                self._code_lists(doc, path + ("codes",), spec["codes"], vs, what)
            groups = spec.get("groups")
            if groups is not None:
                if not isinstance(groups, dict) or not groups:
                    self.error(
                        "NP002", doc, path + ("groups",), f"{what}: groups is a mapping of group name to code lists", key=False
                    )
                else:
                    for gname, gspec in groups.items():
                        group = vs.groups[gname] = ({}, {})
                        self._code_lists(doc, path + ("groups", gname), gspec or {}, vs, f"{what} group {gname}", group)
            if not any(vs.codes.values()) and not any(vs.prefixes.values()):
                self.error("NP002", doc, path, f"{what}: the value set has no codes")

    def _code_lists(
        self,
        doc: Document,
        path: tuple,
        spec: Any,
        vs: ValueSetEntry,
        what: str,
        group: tuple[dict[str, set[str]], dict[str, list[str]]] | None = None,
    ) -> None:
        """Check a mapping of code system to codes, adding them to ``vs`` (and to ``group``, the
        codes and prefixes of one of its named members)."""
        targets = [(vs.codes, vs.prefixes)] + ([group] if group is not None else [])
        if not isinstance(spec, dict):
            self.error(
                "NP002",
                doc,
                path,
                f"{what}: codes are a mapping of code system to a list of codes; got {describe(spec)}",
                key=False,
            )
            return
        for system, entry in spec.items():
            spath = path + (system,)
            if system not in CODE_SYSTEMS:
                self.error(
                    "NP002",
                    doc,
                    spath,
                    f"{what}: unknown code system {system!r}{suggest(system, CODE_SYSTEMS)}; use one of "
                    f"{', '.join(CODE_SYSTEMS)}",
                )
                continue
            lists: list[tuple[tuple, Any, bool]] = []
            if isinstance(entry, list):
                lists.append((spath, entry, False))
            elif isinstance(entry, dict):
                self.mapping(doc, spath, entry, fmt.CODE_LIST, f"{what} {system}")
                if "codes" in entry:
                    lists.append((spath + ("codes",), entry["codes"], False))
                if "prefixes" in entry:
                    if system not in PREFIX_SYSTEMS:
                        self.error(
                            "NP002",
                            doc,
                            spath + ("prefixes",),
                            f"{what}: prefix matching is only meaningful for {', '.join(PREFIX_SYSTEMS)}, not {system}",
                        )
                    else:
                        lists.append((spath + ("prefixes",), entry["prefixes"], True))
            else:
                self.error(
                    "NP002",
                    doc,
                    spath,
                    f"{what} {system}: a list of codes, or {{codes: [...], prefixes: [...]}}; got {describe(entry)}",
                    key=False,
                )
                continue
            for lpath, items, prefix in lists:
                if not isinstance(items, list):
                    self.error("NP002", doc, lpath, f"{what} {system}: a list of codes; got {describe(items)}", key=False)
                    continue
                vs.code_lists.append((lpath, system, prefix))
                for i, item in enumerate(items):
                    if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                        self.error(
                            "NP006", doc, lpath + (i,), f"{what}: a {system} code is text; got {describe(item)}", key=False
                        )
                        continue
                    code = match_key(system, str(item))  # as records are looked up, so L03.115 covers L03115
                    for codes, prefixes in targets:
                        (prefixes.setdefault(system, []).append(code) if prefix else codes.setdefault(system, set()).add(code))

    # -- observations.yaml --

    def check_observations(self, doc: Document) -> None:
        raw = self.file_mapping(doc, "observations.yaml is a mapping of concept id to its definition")
        if raw is None:
            return
        claimed: dict[str, tuple[str, tuple]] = {}
        for cid, spec in raw.items():
            path = (cid,)
            what = f"observation concept {cid}"
            before = len(self.diagnostics)
            if not self.mapping(doc, path, spec, fmt.CONCEPT, what):
                self.concepts[cid] = ConceptEntry(str(cid), doc, path, None, None, spec)
                continue
            self.check_scalars(doc, path, spec, fmt.CONCEPT, what)
            codes = spec.get("codes")
            if "codes" in spec and (not isinstance(codes, list) or not codes):
                self.error(
                    "NP002",
                    doc,
                    path + ("codes",),
                    f"{what}: codes is a non-empty list of system#code, e.g. [loinc#6301-6]",
                    key=False,
                )
            for i, item in enumerate(codes if isinstance(codes, list) else []):
                ipath = path + ("codes", i)
                if not isinstance(item, str) or "#" not in item:
                    self.error(
                        "NP006",
                        doc,
                        ipath,
                        f"{what}: write each code as system#code, e.g. loinc#6301-6; got {describe(item)}",
                        key=False,
                    )
                    continue
                system = item.partition("#")[0]
                if system not in CODE_SYSTEMS:
                    self.error(
                        "NP006", doc, ipath, f"{what}: unknown code system {system!r}{suggest(system, CODE_SYSTEMS)}", key=False
                    )
                    continue
                if item in claimed:
                    other, opath = claimed[item]
                    self.error(
                        "NP015",
                        doc,
                        ipath,
                        f"{what}: {item} already belongs to concept {other} (line {doc.pos(opath, key=False)[0]}); a code names "
                        "one concept",
                        key=False,
                    )
                else:
                    claimed[item] = (str(cid), ipath)
            unit = spec.get("unit")
            if unit is not None and not isinstance(unit, str):
                self.error("NP002", doc, path + ("unit",), f"{what}: unit must be text (UCUM); got {describe(unit)}", key=False)
                unit = None
            units = self.unit_conversions(doc, path, spec, "units", unit, what)
            display_units = self.unit_conversions(doc, path, spec, "display_units", unit, what)
            for u in units or {}:
                if isinstance(u, str) and not fmt.UCUM_TEXT.fullmatch(u):
                    self.error(
                        "NP002",
                        doc,
                        path + ("units", u),
                        f"{what}: {u!r} is not a UCUM code (those are ASCII without spaces); list it under display_units",
                    )
            for u, conv in (display_units or {}).items():
                if not isinstance(u, str):
                    continue
                if u != u.strip():
                    self.error(
                        "NP002",
                        doc,
                        path + ("display_units", u),
                        f"{what}: display unit {u!r}: display text is matched with surrounding spaces removed, so write it "
                        "without them",
                    )
                if units and u in units:
                    if units[u] != conv:
                        self.error(
                            "NP002",
                            doc,
                            path + ("display_units", u),
                            f"{what}: display unit {u!r} is also a UCUM code of this concept converting by {units[u]!r}; one "
                            "text cannot mean two things",
                        )
                    else:
                        self.warn(
                            "NP015",
                            doc,
                            path + ("display_units", u),
                            f"{what}: display unit {u!r} is already accepted as a UCUM code written as text; drop it here",
                        )
            if display_units and unit is None:
                self.error(
                    "NP002",
                    doc,
                    path + ("display_units",),
                    f"{what}: display units need a canonical unit; without unit: the concept is read as coded and numeric "
                    "values are set aside",
                )
            if unit is not None:
                if not units or unit not in units:
                    self.error(
                        "NP002",
                        doc,
                        path + ("unit",),
                        f"{what}: the canonical unit {unit!r} is not among the accepted units, so every value in it would be "
                        "set aside as unit-unknown",
                        key=False,
                    )
                elif units[unit] != 1:
                    self.error(
                        "NP002",
                        doc,
                        path + ("units", unit),
                        f"{what}: the canonical unit {unit!r} must be an accepted UCUM code with factor 1; got "
                        f"{describe(units[unit])}",
                        key=False,
                    )
            elif units:
                self.error(
                    "NP002",
                    doc,
                    path + ("units",),
                    f"{what}: accepted units need a canonical unit; without unit: the concept is read as coded and numeric "
                    "values are set aside",
                )
            plausible = spec.get("plausible")
            pl: tuple[float, float] | None = None
            if plausible is not None:
                if (
                    isinstance(plausible, list)
                    and len(plausible) == 2
                    and all(number(x) for x in plausible)
                    and plausible[0] < plausible[1]
                ):
                    pl = (plausible[0], plausible[1])
                else:
                    self.error(
                        "NP002",
                        doc,
                        path + ("plausible",),
                        f"{what}: plausible is [low, high] with low < high, in the canonical unit; got {plausible!r}",
                        key=False,
                    )
            valid = not any(d.severity == ERROR for d in self.diagnostics[before:])
            self.concepts[cid] = ConceptEntry(str(cid), doc, path, unit, pl, spec, valid)

    def unit_conversions(self, doc: Document, path: tuple, spec: dict, key: str, unit: str | None, what: str) -> dict | None:
        """A concept's ``units`` or ``display_units``: a mapping of unit text to a positive factor
        or a named conversion. Reports what is wrong; returns the mapping, or None if it is not one."""
        conversions = spec.get(key)
        if conversions is None:
            return None
        if not isinstance(conversions, dict):
            self.error(
                "NP002",
                doc,
                path + (key,),
                f"{what}: {key} is a mapping of accepted unit to a factor or a named conversion",
                key=False,
            )
            return None
        for u, conv in conversions.items():
            if not isinstance(u, str) or not u:
                self.error("NP002", doc, path + (key, u), f"{what}: a unit in {key} is non-empty text; got {describe(u)}")
            if isinstance(conv, str):
                if conv not in UNIT_CONVERSIONS:
                    self.error(
                        "NP002",
                        doc,
                        path + (key, u),
                        f"{what}: unknown conversion {conv!r}{suggest(conv, UNIT_CONVERSIONS)}; known: "
                        f"{', '.join(UNIT_CONVERSIONS)}",
                        key=False,
                    )
            elif not number(conv) or not 0 < conv < math.inf:
                self.error(
                    "NP002",
                    doc,
                    path + (key, u),
                    f"{what}: unit {u}: a positive factor to {unit or 'the canonical unit'} or a named conversion; got "
                    f"{describe(conv)}",
                    key=False,
                )
        return conversions

    # -- aggregates.yaml --

    def check_aggregates(self, doc: Document) -> None:
        raw = self.file_mapping(doc, "aggregates.yaml is a mapping of summary field name to its definition")
        if raw is None:
            return
        for name, spec in raw.items():
            path = (name,)
            what = f"aggregate {name}"
            before = len(self.diagnostics)
            if not isinstance(name, str) or not fmt.ALIAS.match(name):
                self.error("NP002", doc, path, f"{what}: summary field names are lower-case identifiers")
            elif name in fmt.RESERVED_NAMES:
                self.reserved(doc, path, name, what)
            agg = AggregateEntry(str(name), doc, path, "count", 0, spec=spec)
            self.aggregates[name] = agg
            if not self.mapping(doc, path, spec, fmt.AGGREGATE, what):
                continue
            self.check_scalars(doc, path, spec, fmt.AGGREGATE, what)
            if ("count" in spec) == ("criteria" in spec):
                self.error("NP001", doc, path, f"{what} has exactly one of count (with where) or criteria")
                continue
            if "count" in spec:
                kind = spec["count"]
                kinds = fmt.COUNTABLE
                if not isinstance(kind, str) or kind not in kinds:
                    self.error(
                        "NP005",
                        doc,
                        path + ("count",),
                        f"{what}: unknown fact kind {kind!r}{suggest(kind, kinds)}; count one of {', '.join(kinds)}",
                        key=False,
                    )
                    continue
                where = spec.get("where")
                tests = self.check_body(doc, path + ("where",), kind, where, set(), what)
                if tests is not None:
                    agg.patterns.append(
                        PatternEntry(Pattern(str(name), kind, tuple(tests)), doc, path + ("where",), path + ("where",), what)
                    )
            else:
                if "where" in spec:
                    self.error("NP001", doc, path + ("where",), f"{what}: where goes with count; criteria are whole patterns")
                criteria = spec["criteria"]
                if not isinstance(criteria, list) or not criteria:
                    self.error("NP002", doc, path + ("criteria",), f"{what}: criteria is a non-empty list of patterns", key=False)
                    continue
                agg.mode, agg.size = "criteria", len(criteria)
                for i, criterion in enumerate(criteria):
                    cpath = path + ("criteria", i)
                    if isinstance(criterion, dict) and "not" in criterion:
                        self.error(
                            "NP002",
                            doc,
                            cpath + ("not",),
                            f"{what}: criterion {i} is negated, but aggregates count facts that match their criteria, so the "
                            "negation would be ignored",
                        )
                        continue
                    pat = self.check_pattern(doc, cpath, criterion, f"{name}_{i}", set(), f"{what} criterion {i}")
                    if pat is not None:
                        agg.patterns.append(pat)
            groups_of = spec.get("distinct_groups_of")
            if groups_of is not None:
                gpath = path + ("distinct_groups_of",)
                if "criteria" in spec:
                    self.error("NP001", doc, gpath, f"{what}: distinct_groups_of goes with count")
                elif self.value_set_ref(doc, gpath, groups_of, what) and not self.value_sets[groups_of].groups:
                    self.error("NP002", doc, gpath, f"{what}: value set {groups_of!r} has no groups to count", key=False)
            agg.valid = not any(d.severity == ERROR for d in self.diagnostics[before:])

    # -- assembly: only for a rule set without errors --

    def assemble(self) -> RuleSet:
        s = self.sources
        assert s.meta is not None  # without ruleset.yaml the rule set has an NP000 error and is not assembled
        meta = s.meta.value or {}
        rs_id = meta["id"]
        params = {
            name: Param(
                name=name,
                value=p.value,
                default=p.default,
                unit=p.spec.get("unit"),
                provenance=p.spec["provenance"],
                source=p.spec["source"],
                description=p.spec["description"],
                allowed=tuple(p.spec["allowed"]) if "allowed" in p.spec else None,
                layer=p.layer if p.layer is not None else rs_id,
            )
            for name, p in self.params.items()
        }
        value_sets = {vs_id: vs.value_set(vs.spec["title"]) for vs_id, vs in self.value_sets.items()}
        observations = {cid: _concept(cid, c.spec) for cid, c in self.concepts.items()}
        aggregates = tuple(
            Aggregate(
                a.name,
                tuple(p.pattern for p in a.patterns),
                "criteria" if a.mode == "criteria" else ("distinct_groups" if a.spec.get("distinct_groups_of") else "count"),
                a.spec.get("distinct_groups_of"),
                a.spec["description"],
            )
            for a in self.aggregates.values()
        )
        rules = tuple(assemble_rule(entry, self.sources.rule_source(entry.doc, entry.path[0])) for entry in self.rules)
        documents = s.documents()
        digest_input = {k: v for k, v in documents.items() if k != "rules"}
        digest_input["rules"] = [raw for _, raw in documents.get("rules") or []]
        digest_input["parameters_in_force"] = {n: p.value for n, p in sorted(params.items())}
        overlay_name = self.overlay_name if s.overlay is not None else ""
        bound = {
            category: tuple(dict.fromkeys([m] if isinstance(m, str) else m))
            for category, m in (meta.get("modality_bound_injectates") or {}).items()
        }
        return RuleSet(
            id=rs_id,
            version=meta["version"],
            title=meta["title"],
            status=meta.get("status", "draft"),
            validation=meta["validation"],
            description=str(meta.get("description", "")).strip(),
            rules=rules,
            value_sets=value_sets,
            params=params,
            observations=observations,
            aggregates=aggregates,
            digest=canonical_digest(digest_input),
            layers=(rs_id, overlay_name) if overlay_name else (rs_id,),
            requested_modality=dict(meta.get("requested_modality") or {}),
            modality_bound_injectates=bound,
        )


def _dotted(path: Iterable) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _concept(cid: str, spec: dict) -> ObservationConcept:
    plausible = spec.get("plausible")
    return ObservationConcept(
        id=cid,
        title=spec["title"],
        codes=frozenset(spec["codes"]),
        unit=spec.get("unit"),
        units=dict(spec.get("units") or {}),
        plausible=tuple(plausible) if plausible else None,
        display_units=dict(spec.get("display_units") or {}),
    )


__all__ = ["AggregateEntry", "Builder", "Built", "ConceptEntry", "ParamEntry", "PatternEntry", "RuleEntry", "ValueSetEntry"]
