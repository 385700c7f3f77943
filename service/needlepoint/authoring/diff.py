"""``needlepoint rules diff OLD NEW --cases DIR``: the impact of a rule-set change on real cases.

Every case under DIR is evaluated under both versions, at the same instant, and the two decisions
are compared field by field. The report says how many decisions changed and in which field, case by
case with the rules that fired differently, and grouped by rule, as Markdown, HTML or JSON, so that
it can be attached to a change review. Exit code 0 when no decision changed, 1 when some did (or a
case evaluates under one version only), 2 when the diff cannot run (bad arguments, a rule set that
does not load).

**Versions.** OLD and NEW are each a rule-set directory (``rulesets/hip-injection``), the id of a
bundled rule set (``hip-injection``), or either of them followed by ``:`` and a site overlay file
(``rulesets/hip-injection:sites/north.yaml``). ``--old-overlay FILE`` / ``--new-overlay FILE`` say
the same. So a site overlay is diffed against its base with
``needlepoint rules diff hip-injection hip-injection:north.yaml --cases DIR``.

**Inputs** (DIR is searched recursively; a single file is accepted too; hidden files are ignored):

* ``*.json``: a FHIR R4 Bundle; a CDS Hooks request (an object with ``hook`` and ``context``);
  or one evaluate request, in the form of an NDJSON line below.
* ``*.yaml`` / ``*.yml``: rule-set test cases (:mod:`needlepoint.casefile`); each case is evaluated
  at its own ``as_of`` unless ``--as-of`` is given (relative dates such as ``days_before`` stay
  resolved against the case's own ``as_of``). Their ``expect`` is ignored.
* ``*.ndjson`` / ``*.jsonl``: an export of past requests, one JSON object a line::

      {"correlationId": "r-1", "asOf": "2025-06-02T09:00:00Z", "fhirBundle": {"resourceType": "Bundle", ...}}

  ``fhirBundle`` is a Bundle object, the Bundle's JSON text, or base64 (the protobuf JSON mapping
  of ``EvaluateRequest``, whose other fields are read too: ``context`` instead of ``fhirBundle``,
  and ``order``, which overrides the patient's order as the server does). ``correlationId`` and
  ``asOf`` are optional. A line may also be a bare Bundle or a CDS Hooks request; blank lines are
  ignored.

Other files, files that cannot be read, and JSON or YAML files that are none of the above are
skipped and listed in a note. An input that is recognised but cannot be evaluated (a Bundle
without a Patient, a case with an unknown code, a line that is not JSON) is an *error case*,
listed in the report; it never stops the run.

**Instant.** ``--as-of T`` evaluates every case at T. Otherwise a case uses its own instant (a
test case's ``as_of``, a request's ``asOf``), and inputs without one use the instant the run
started; both versions always see the same instant.

**Order.** ``--target/--side/--intent`` supply the injection order, or its missing fields, for
FHIR inputs (Bundles, CDS Hooks requests, exported requests); a field the input has is kept.
Test cases are used as written.

**What is compared.** Modality (preferred, acceptable, avoid), injectates (category ->
recommendation), deferrals (``REASON`` or ``REASON/SCOPE`` -> severity), caution codes and
missing-data codes. Decision ids, the rule set's version and digest, messages and explanation
texts are not. For each changed case the report names the rules that fired differently (only
under OLD, only under NEW, or under both with different matched facts) and, for each changed
item, the rules responsible: the rules behind the item (its ``ruleIds``) that fired differently
or whose definition changed between the versions. A case whose rules fired differently without
changing the decision is listed separately. Above the cases, the report lists what changed in the
rule set itself (parameters, rules, value sets, observation concepts, aggregates).

**Speed.** Cases are evaluated by ``--jobs`` worker processes (default: one per CPU), each loading
both rule sets once; inputs are sent in chunks of about equal size. A progress bar is drawn on
standard error when it is a terminal and the run is long (``--progress`` / ``--no-progress``
force it either way); never on standard output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from needlepoint.casefile import load_cases
from needlepoint.cli_options import order_options, parse_instant
from needlepoint.core.conditions import RuleSetError
from needlepoint.core.evaluator import Evaluator, format_instant
from needlepoint.core.record import PatientRecord, RecordError
from needlepoint.core.ruleset import RuleSet
from needlepoint.corpus import input_files as _input_files
from needlepoint.corpus import request_kind as _request_kind
from needlepoint.corpus import with_order_defaults as _with_order_defaults
from needlepoint.fhir.mapper import record_from_bundle, record_from_cds_hooks_request
from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset
from needlepoint.workpool import ProgressBar, can_spawn as _can_spawn, run_pool

FIELDS = ("modality", "injectates", "deferrals", "cautions", "missingData")
JSON_SUFFIXES = frozenset({".json"})
YAML_SUFFIXES = frozenset({".yaml", ".yml"})
NDJSON_SUFFIXES = frozenset({".ndjson", ".jsonl"})

EXIT_SAME = 0
EXIT_CHANGED = 1
EXIT_CANNOT_RUN = 2

# Inputs smaller than this are evaluated in this process: starting workers would cost more.
IN_PROCESS_BYTES = 128 * 1024
# A progress bar is worth drawing (on a terminal) from this much input on.
PROGRESS_BYTES = 512 * 1024


class DiffError(Exception):
    """The diff cannot run: a bad version, a rule set that does not load, no cases directory."""


# -- versions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One side of the diff: a rule-set directory, optionally under a site overlay."""

    directory: Path
    overlay: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.directory}:{self.overlay}" if self.overlay else str(self.directory)


def _ruleset_directory(text: str) -> Path | None:
    path = Path(text)
    if path.is_dir():
        return path
    if "/" not in text and os.sep not in text:
        bundled = bundled_rulesets_dir() / text
        if (bundled / "ruleset.yaml").is_file():
            return bundled
    return None


def parse_version(text: str, overlay: Path | None = None) -> Version:
    """``DIR``, ``ID`` (a bundled rule set) or either with ``:OVERLAY``; ``overlay`` is the
    ``--old-overlay`` / ``--new-overlay`` option. Raises DiffError."""
    directory = _ruleset_directory(text)
    overlay_text = None
    if directory is None and ":" in text:
        head, overlay_text = text.rsplit(":", 1)
        directory = _ruleset_directory(head)
    if directory is None:
        raise DiffError(f"{text}: not a rule-set directory, a bundled rule set id, or DIR:OVERLAY.yaml")
    if overlay_text is not None:
        if overlay is not None:
            raise DiffError(f"{text}: an overlay is given twice (in the argument and as an option)")
        overlay = Path(overlay_text)
    if overlay is not None and not overlay.is_file():
        raise DiffError(f"{overlay}: the overlay file does not exist")
    return Version(directory, overlay)


def load_version(version: Version) -> RuleSet:
    try:
        return load_ruleset(version.directory, overlay=version.overlay)
    except (RuleSetError, OSError) as exc:
        raise DiffError(f"{version.label}: the rule set does not load: {exc}") from None


# -- what changed in the rule set itself ----------------------------------------------------------


def _text(value: Any) -> str:
    """A value for people: lists joined, None -> an em dash."""
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "—"
    return str(value)


@dataclass
class ParamChange:
    name: str
    old: Any
    new: Any
    old_layer: str | None
    new_layer: str | None


@dataclass
class RulesetChanges:
    parameters: list[ParamChange] = field(default_factory=list)
    rules_added: list[str] = field(default_factory=list)
    rules_removed: list[str] = field(default_factory=list)
    rules_modified: list[str] = field(default_factory=list)
    value_sets: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    aggregates: list[str] = field(default_factory=list)
    # Rules whose behaviour may differ: added, removed or edited, or using a changed parameter,
    # value set, observation concept or aggregate.
    affected: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.parameters or self.rules_added or self.rules_removed or self.rules_modified
                    or self.value_sets or self.observations or self.aggregates)  # fmt: skip


def rule_order(old: RuleSet, new: RuleSet) -> dict[str, int]:
    """Rule id -> position: NEW's rules in file order, then those only OLD has."""
    return {rid: i for i, rid in enumerate(dict.fromkeys([*(r.id for r in new.rules), *(r.id for r in old.rules)]))}


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def ruleset_changes(old: RuleSet, new: RuleSet) -> RulesetChanges:
    """The differences between two loaded rule sets that can change a decision."""
    changes = RulesetChanges()
    for name in sorted(old.params.keys() | new.params.keys()):
        po, pn = old.params.get(name), new.params.get(name)
        if po is None or pn is None or po.value != pn.value:
            changes.parameters.append(
                ParamChange(name, po.value if po else None, pn.value if pn else None, po.layer if po else None, pn.layer if pn else None)
            )
    old_rules, new_rules = {r.id: r for r in old.rules}, {r.id: r for r in new.rules}
    changes.rules_added = [r for r in new_rules if r not in old_rules]
    changes.rules_removed = [r for r in old_rules if r not in new_rules]
    changes.rules_modified = [
        rid for rid, rule in new_rules.items()
        if rid in old_rules and dataclasses.replace(rule, source="") != dataclasses.replace(old_rules[rid], source="")
    ]  # fmt: skip
    changes.value_sets = _changed_keys(old.value_sets, new.value_sets)
    changes.observations = _changed_keys(old.observations, new.observations)
    old_aggs, new_aggs = {a.name: a for a in old.aggregates}, {a.name: a for a in new.aggregates}
    changes.aggregates = _changed_keys(old_aggs, new_aggs)

    params = {p.name for p in changes.parameters}
    value_sets, concepts, aggregates = set(changes.value_sets), set(changes.observations), set(changes.aggregates)

    def touches(patterns: Iterable) -> bool:
        for pattern in patterns:
            for test in pattern.tests:
                if test.op == "in" and isinstance(test.operand, str) and test.operand in value_sets:
                    return True
                if pattern.kind == "observation" and test.field == "concept" and test.operand in concepts:
                    return True
                if pattern.kind == "summary" and test.field in aggregates:
                    return True
        return False

    aggregates |= {a.name for a in new.aggregates if touches(a.patterns)}  # fed by a changed value set
    affected = set(changes.rules_added) | set(changes.rules_removed) | set(changes.rules_modified)
    for rule in (*new.rules, *old.rules):
        if params & set(rule.params) or touches(p for alternative in rule.alternatives for p in alternative):
            affected.add(rule.id)
    changes.affected = sorted(affected, key=rule_order(old, new).__getitem__)
    return changes


# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A file to read, or a run of lines of an NDJSON file (``offset`` bytes in, from line
    ``first_line``, ``lines`` lines)."""

    kind: str  # "json" | "yaml" | "ndjson"
    path: str
    rel: str
    size: int
    offset: int = 0
    first_line: int = 1
    lines: int = 0

    @property
    def label(self) -> str:
        if self.kind != "ndjson":
            return self.rel
        return f"{self.rel}:{self.first_line}-{self.first_line + self.lines - 1}"


def _ndjson_pieces(path: Path, rel: str, target: int) -> Iterator[WorkItem]:
    """The file in runs of whole lines of about ``target`` bytes."""
    with path.open("rb") as fh:
        offset, first, lines, size = 0, 1, 0, 0
        for raw in fh:
            lines += 1
            size += len(raw)
            if size >= target:
                yield WorkItem("ndjson", str(path), rel, size, offset, first, lines)
                offset, first, lines, size = offset + size, first + lines, 0, 0
        if lines:
            yield WorkItem("ndjson", str(path), rel, size, offset, first, lines)


def scan(root: Path, jobs: int) -> tuple[list[list[WorkItem]], list[tuple[str, str]], int]:
    """The inputs under ``root`` in chunks of about equal size (several per worker, so that the
    workers finish together), the files skipped with the reason, and the total size in bytes."""
    found: list[tuple[str, Path, str, int]] = []
    skipped: list[tuple[str, str]] = []
    for path, rel in _input_files(root):
        suffix = path.suffix.lower()
        kind = "json" if suffix in JSON_SUFFIXES else "yaml" if suffix in YAML_SUFFIXES else "ndjson" if suffix in NDJSON_SUFFIXES else None
        if kind is None:
            skipped.append((rel, "not an input format (.json, .yaml, .yml, .ndjson, .jsonl)"))
            continue
        try:
            size = path.stat().st_size
        except OSError as exc:
            skipped.append((rel, f"cannot be read: {exc.strerror or exc}"))
            continue
        found.append((kind, path, rel, size))
    total = sum(size for *_, size in found)
    target = max(16 * 1024, min(2 * 1024 * 1024, total // max(1, jobs * 6)))
    items: list[WorkItem] = []
    for kind, path, rel, size in found:
        if kind == "ndjson":
            try:
                items.extend(_ndjson_pieces(path, rel, target))
            except OSError as exc:
                skipped.append((rel, f"cannot be read: {exc.strerror or exc}"))
        else:
            items.append(WorkItem(kind, str(path), rel, size))
    chunks: list[list[WorkItem]] = []
    chunk: list[WorkItem] = []
    weight = 0
    for item in items:
        chunk.append(item)
        weight += item.size
        if weight >= target:
            chunks.append(chunk)
            chunk, weight = [], 0
    if chunk:
        chunks.append(chunk)
    return chunks, skipped, total


# -- comparing two decisions ----------------------------------------------------------------------


@dataclass(slots=True)
class Change:
    """One item of a decision field that differs: ``old`` -> ``new`` (None: absent)."""

    field: str
    item: str
    old: Any
    new: Any
    rules: tuple[str, ...]  # the rules responsible


@dataclass(slots=True)
class FiringDiff:
    """A rule that fired differently. ``how``: ``old only``, ``new only``, ``matched facts
    differ`` or ``overridden differently``; ``old``/``new``: the matched facts (for ``matched
    facts differ``, only those not matched under the other version)."""

    rule: str
    how: str
    old: tuple[str, ...]
    new: tuple[str, ...]


@dataclass(slots=True)
class CaseOutcome:
    key: tuple  # sort key: (file, line or index)
    case: str  # where the case is: file, file[index] or file:line
    name: str
    as_of: str
    changes: list[Change] = field(default_factory=list)
    firings: list[FiringDiff] = field(default_factory=list)
    old_error: str | None = None
    new_error: str | None = None

    @property
    def status(self) -> str:
        """``error``, ``changed`` (the decision), ``firings`` (only the rules that fired) or
        ``same``."""
        if self.old_error or self.new_error:
            return "error"
        if self.changes:
            return "changed"
        return "firings" if self.firings else "same"


@dataclass
class ChunkResult:
    outcomes: list[CaseOutcome]  # every case that is not the same under both versions
    same: int
    skipped: list[tuple[str, str]]
    size: int
    old_seconds: float = 0.0
    new_seconds: float = 0.0


def _project(decision: dict) -> dict[str, dict[str, tuple[Any, tuple[str, ...]]]]:
    """The compared part of a decision: field -> item -> (value, ruleIds)."""
    out: dict[str, dict[str, tuple[Any, tuple[str, ...]]]] = {f: {} for f in FIELDS}
    modality = decision.get("modality") or {}
    rule_ids = tuple(modality.get("ruleIds", ()))
    if modality.get("preferred"):
        out["modality"]["preferred"] = (modality["preferred"], rule_ids)
    for key in ("acceptable", "avoid"):
        if modality.get(key):
            out["modality"][key] = (tuple(sorted(modality[key])), rule_ids)
    for i in decision.get("injectates", ()):
        out["injectates"][i["category"]] = (i["recommendation"], tuple(i.get("ruleIds", ())))
    for d in decision.get("deferrals", ()):
        key = d["reason"] if d["scope"] == "PROCEDURE" else f"{d['reason']}/{d['scope']}"
        out["deferrals"][key] = (d["severity"], tuple(d.get("ruleIds", ())))
    for name, part in (("cautions", "cautions"), ("missingData", "missingData")):
        for entry in decision.get(part, ()):
            previous = out[name].get(entry["code"], (None, ()))[1]
            out[name][entry["code"]] = ("present", previous + tuple(r for r in entry.get("ruleIds", ()) if r not in previous))
    return out


def _matched(explanation: dict) -> tuple[str, ...]:
    return tuple(f"{m['fact']} = {m['value']}" for m in explanation.get("matched", ()))


def firing_diffs(old: dict, new: dict, order: dict[str, int]) -> list[FiringDiff]:
    """The rules that fired under one version only, or under both with different matched facts
    or a different ``overriddenBy``."""
    before = {e["ruleId"]: e for e in old.get("explanations", ())}
    after = {e["ruleId"]: e for e in new.get("explanations", ())}
    diffs = []
    for rid in sorted(before.keys() | after.keys(), key=lambda r: (order.get(r, len(order)), r)):
        if rid not in after:
            diffs.append(FiringDiff(rid, "old only", _matched(before[rid]), ()))
        elif rid not in before:
            diffs.append(FiringDiff(rid, "new only", (), _matched(after[rid])))
        else:
            mo, mn = _matched(before[rid]), _matched(after[rid])
            if set(mo) != set(mn):
                diffs.append(FiringDiff(rid, "matched facts differ", tuple(m for m in mo if m not in mn), tuple(m for m in mn if m not in mo)))
            elif before[rid].get("overriddenBy") != after[rid].get("overriddenBy"):
                diffs.append(FiringDiff(rid, "overridden differently", tuple(before[rid].get("overriddenBy", ())), tuple(after[rid].get("overriddenBy", ()))))
    return diffs


def _rule_fields(ruleset: RuleSet) -> dict[str, set[str]]:
    """The decision fields each rule can change."""
    out: dict[str, set[str]] = {}
    for rule in ruleset.rules:
        then, fields = rule.then, set()
        if then.modality:
            fields |= {"modality", "cautions"}  # a requested-modality conflict is a caution
        if then.injectates:
            fields.add("injectates")
        if then.deferral:
            fields.add("deferrals")
        if then.caution:
            fields.add("cautions")
        if then.missing_data:
            fields.add("missingData")
        out[rule.id] = fields
    return out


def compare(old: dict, new: dict, order: dict[str, int], affected: frozenset[str], rule_fields: dict[str, set[str]]) -> tuple[list[Change], list[FiringDiff]]:
    """Field-by-field changes between two decisions, each with the rules responsible, and the
    rules that fired differently."""
    firings = firing_diffs(old, new, order)
    po, pn = _project(old), _project(new)
    if all({k: v for k, (v, _) in po[f].items()} == {k: v for k, (v, _) in pn[f].items()} for f in FIELDS):
        return [], firings
    differing = {f.rule for f in firings}
    fired = {e["ruleId"] for e in (*old.get("explanations", ()), *new.get("explanations", ()))}
    suspects = differing | (affected & fired)
    changes = []
    for name in FIELDS:
        items_old, items_new = po[name], pn[name]
        for item in sorted(items_old.keys() | items_new.keys()):
            vo, ro = items_old.get(item, (None, ()))
            vn, rn = items_new.get(item, (None, ()))
            if vo == vn:
                continue
            behind = dict.fromkeys((*ro, *rn))
            rules = [r for r in behind if r in suspects]
            if not rules:  # the item's own rules did not change: whatever did and can touch the field
                rules = [r for r in sorted(suspects, key=lambda r: order.get(r, len(order))) if name in rule_fields.get(r, ())]
            changes.append(Change(name, item, vo, vn, tuple(sorted(rules or behind, key=lambda r: (order.get(r, len(order)), r)))))
    return changes, firings


# -- reading inputs and evaluating (in the workers) -----------------------------------------------


@dataclass(frozen=True)
class Options:
    as_of: dt.datetime | None  # --as-of: every case at this instant
    default_as_of: dt.datetime  # for inputs that carry no instant
    order: tuple[str | None, str | None, str | None] | None  # --target/--side/--intent
    affected: frozenset[str]


def _from_request(obj: dict) -> tuple[PatientRecord, dt.datetime | None, str]:
    """An exported EvaluateRequest (protobuf JSON mapping; ``fhirBundle`` may also be a Bundle
    object or its JSON text): the record with the request's order override, its asOf and
    correlation id."""
    from google.protobuf import json_format

    from needlepoint.server import convert
    from needlepoint.v1 import decision_service_pb2

    rest = dict(obj)
    bundle = rest.get("fhirBundle")
    if isinstance(bundle, dict) or (isinstance(bundle, str) and bundle.lstrip().startswith("{")):
        del rest["fhirBundle"]  # a Bundle object or its JSON text; base64 is left to the mapping
    else:
        bundle = None
    try:
        request = json_format.ParseDict(rest, decision_service_pb2.EvaluateRequest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise RecordError("request", f"not an evaluate request: {exc}") from None
    if bundle is not None:
        record = record_from_bundle(bundle)
    elif request.WhichOneof("patient") == "fhir_bundle":
        record = record_from_bundle(request.fhir_bundle)
    elif request.WhichOneof("patient") == "context":
        record = convert.record_from_context(request.context)
    else:
        raise RecordError("patient", "one of fhirBundle or context is required")
    if request.HasField("order"):
        record = convert.apply_order_override(record, request.order)
    as_of = convert.timestamp_to_datetime(request.as_of, "asOf") if request.HasField("as_of") else None
    return record, as_of, request.correlation_id


class Comparer:
    """Both versions loaded once; reads work items and compares their cases."""

    def __init__(self, old: RuleSet, new: RuleSet, options: Options):
        self.old, self.new = Evaluator(old), Evaluator(new)
        self.options = options
        self.order = rule_order(old, new)
        self.rule_fields = _rule_fields(old)
        for rid, fields in _rule_fields(new).items():
            self.rule_fields.setdefault(rid, set()).update(fields)

    def close(self) -> None:
        self.old.close()
        self.new.close()

    def run(self, chunk: list[WorkItem]) -> ChunkResult:
        result = ChunkResult([], 0, [], sum(item.size for item in chunk))
        for item in chunk:
            try:
                cases = list(self._cases(item, result.skipped))
            except Exception as exc:  # noqa: BLE001 - a fault here costs this input, not the run
                cases = [((item.rel, 0), item.label, "", None, None, f"cannot read the input: {type(exc).__name__}: {exc}")]
            for key, where, name, record, as_of, problem in cases:
                outcome = self._compare(key, where, name, record, as_of, problem, result)
                if outcome.status == "same":
                    result.same += 1
                else:
                    result.outcomes.append(outcome)
        return result

    def _instant(self, own: dt.datetime | None) -> dt.datetime:
        return self.options.as_of or own or self.options.default_as_of

    def _cases(self, item: WorkItem, skipped: list[tuple[str, str]]) -> Iterator[tuple]:
        """(sort key, where, name, record, as_of, problem) per case; a problem (text) instead of a
        record for an input that cannot be evaluated."""
        path = Path(item.path)
        if item.kind == "yaml":
            yield from self._yaml_cases(path, item, skipped)
        elif item.kind == "json":
            try:
                obj = orjson.loads(path.read_bytes())
            except OSError as exc:
                skipped.append((item.rel, f"cannot be read: {exc.strerror or exc}"))
                return
            except orjson.JSONDecodeError as exc:
                skipped.append((item.rel, f"not valid JSON: {exc}"))
                return
            if _request_kind(obj) is None:
                skipped.append((item.rel, "not a FHIR Bundle, a CDS Hooks request or an evaluate request"))
                return
            yield self._one((item.rel, 0), item.rel, obj)
        else:
            with path.open("rb") as fh:
                fh.seek(item.offset)
                for k in range(item.lines):
                    raw = fh.readline()
                    line = item.first_line + k
                    if not raw.strip():
                        continue
                    where = f"{item.rel}:{line}"
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError as exc:
                        yield (item.rel, line), where, "", None, None, f"line {line}: not valid JSON: {exc}"
                        continue
                    yield self._one((item.rel, line), where, obj)

    def _one(self, key: tuple, where: str, obj: Any) -> tuple:
        kind = _request_kind(obj)
        try:
            own, name = None, ""
            if kind == "bundle":
                record = record_from_bundle(obj)
            elif kind == "cds-hooks":
                record = record_from_cds_hooks_request(obj)
            elif kind == "request":
                record, own, name = _from_request(obj)
            else:
                raise RecordError("line", "not a FHIR Bundle, a CDS Hooks request or an evaluate request")
            record = _with_order_defaults(record, self.options.order)
        except RecordError as exc:
            return key, where, "", None, None, str(exc)
        return key, where, name, record, self._instant(own), None

    def _yaml_cases(self, path: Path, item: WorkItem, skipped: list[tuple[str, str]]) -> Iterator[tuple]:
        try:
            cases = load_cases(path)
        except OSError as exc:
            skipped.append((item.rel, f"cannot be read: {exc.strerror or exc}"))
            return
        except UnicodeDecodeError:
            skipped.append((item.rel, "cannot be read: not UTF-8 text"))
            return
        except yaml.YAMLError as exc:
            skipped.append((item.rel, f"not valid YAML: {getattr(exc, 'problem', None) or exc}"))
            return
        except RecordError as exc:
            if _looks_like_cases(path):
                yield (item.rel, 0), item.rel, "", None, None, f"the case file cannot be read: {exc}"
            else:
                skipped.append((item.rel, "not a file of rule-set test cases (a list of cases with name, patient and expect)"))
            return
        for i, case in enumerate(cases):
            yield (item.rel, i), f"{item.rel}[{i}]", case.name, case.record, self._instant(case.as_of), None

    def _compare(self, key, where, name, record, as_of, problem, result: ChunkResult) -> CaseOutcome:
        outcome = CaseOutcome(key, where, str(name or ""), format_instant(as_of) if as_of else "")
        if problem is not None:
            outcome.old_error = outcome.new_error = problem
            return outcome
        decisions = []
        for side, evaluator in (("old", self.old), ("new", self.new)):
            started = time.perf_counter()
            try:
                decisions.append(evaluator.evaluate(record, as_of))
            except RecordError as exc:
                decisions.append(None)
                setattr(outcome, f"{side}_error", str(exc))
            except Exception as exc:  # noqa: BLE001 - a fault of the version, reported per case
                decisions.append(None)
                setattr(outcome, f"{side}_error", f"internal error: {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - started
            if side == "old":
                result.old_seconds += elapsed
            else:
                result.new_seconds += elapsed
        if decisions[0] is not None and decisions[1] is not None:
            outcome.changes, outcome.firings = compare(decisions[0], decisions[1], self.order, self.options.affected, self.rule_fields)
        return outcome


def _looks_like_cases(path: Path) -> bool:
    """Whether a YAML file that load_cases refused is a case file with a bad case (an error to
    report) rather than some other YAML file (to skip)."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, list) and any(isinstance(c, dict) and "name" in c and ("patient" in c or "expect" in c) for c in content)


def _comparer(state: tuple) -> Comparer:
    """A worker process's Comparer, from the parent's (old, new, options)."""
    old, new, options = state
    return Comparer(old, new, options)


def _run_pool(chunks: list[list[WorkItem]], jobs: int, state: tuple, on_result) -> None:
    """Evaluate the chunks on ``jobs`` spawned workers (:func:`needlepoint.workpool.run_pool`):
    a worker that dies costs the chunks in flight, reported as error cases."""
    run_pool(chunks, jobs, state, _comparer, on_result, lambda chunk, why: on_result(_crashed(chunk, why)))


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class VersionInfo:
    label: str
    id: str
    version: str
    digest: str
    layers: tuple[str, ...]


@dataclass
class RuleSummary:
    rule: str
    title: str
    fired_differently: int = 0  # cases
    how: Counter = field(default_factory=Counter)  # how it fired differently -> cases
    decisions_changed: int = 0  # changed cases where it is responsible for a change
    fields: Counter = field(default_factory=Counter)  # field -> cases where it changed it


@dataclass
class DiffReport:
    old: VersionInfo
    new: VersionInfo
    changes: RulesetChanges
    cases_dir: str
    as_of: str | None  # --as-of
    default_as_of: str
    outcomes: list[CaseOutcome]  # every case not the same under both versions, in input order
    same: int
    skipped: list[tuple[str, str]]
    titles: dict[str, str]
    order: dict[str, int]
    jobs: int
    seconds: float
    old_seconds: float
    new_seconds: float

    def of(self, status: str) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def total(self) -> int:
        return self.same + len(self.outcomes)

    @property
    def changed(self) -> list[CaseOutcome]:
        return self.of("changed")

    @property
    def one_sided_errors(self) -> list[CaseOutcome]:
        """Cases that evaluate under one version and fail under the other: a change too."""
        return [o for o in self.of("error") if (o.old_error is None) != (o.new_error is None)]

    @property
    def exit_code(self) -> int:
        return EXIT_CHANGED if self.changed or self.one_sided_errors else EXIT_SAME

    def field_counts(self) -> dict[str, int]:
        counts = Counter(name for o in self.changed for name in {c.field for c in o.changes})
        return {name: counts[name] for name in FIELDS if counts[name]}

    def transitions(self) -> list[tuple[str, str, Any, Any, int]]:
        """(field, item, old, new, cases), most frequent first."""
        counts = Counter((c.field, c.item, c.old, c.new) for o in self.changed for c in o.changes)
        return [(*key, n) for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], FIELDS.index(kv[0][0]), kv[0][1]))]

    def by_rule(self) -> list[RuleSummary]:
        rules: dict[str, RuleSummary] = {}

        def summary(rid: str) -> RuleSummary:
            return rules.setdefault(rid, RuleSummary(rid, self.titles.get(rid, "")))

        for o in self.outcomes:
            for f in o.firings:
                s = summary(f.rule)
                s.fired_differently += 1
                s.how[f.how] += 1
            responsible: dict[str, set[str]] = {}
            for c in o.changes:
                for rid in c.rules:
                    responsible.setdefault(rid, set()).add(c.field)
            for rid, fields in responsible.items():
                s = summary(rid)
                s.decisions_changed += 1
                s.fields.update(fields)
        return sorted(rules.values(), key=lambda s: (-s.decisions_changed, -s.fired_differently, self.order.get(s.rule, len(self.order)), s.rule))


def _version_info(version: Version, ruleset: RuleSet) -> VersionInfo:
    return VersionInfo(version.label, ruleset.id, ruleset.version, ruleset.digest, tuple(ruleset.layers))


def _crashed(chunk: list[WorkItem], why: str) -> ChunkResult:
    outcomes = [CaseOutcome((item.rel, item.first_line if item.kind == "ndjson" else 0), item.label, "", "", old_error=why, new_error=why) for item in chunk]
    return ChunkResult(outcomes, 0, [], sum(item.size for item in chunk))


def run_diff(
    old: Version,
    new: Version,
    cases: Path,
    *,
    as_of: dt.datetime | None = None,
    order: tuple[str | None, str | None, str | None] | None = None,
    jobs: int | None = None,
    progress: bool | None = None,
) -> DiffReport:
    """Evaluate every case under ``cases`` with both versions and compare. ``progress``: True
    always draws a bar on standard error, None only on a terminal for a long run. Raises
    DiffError when the diff cannot run."""
    started = time.perf_counter()
    old_rs, new_rs = load_version(old), load_version(new)
    if not cases.exists():
        raise DiffError(f"{cases}: no such file or directory")
    jobs = max(1, jobs or os.cpu_count() or 1)
    changes = ruleset_changes(old_rs, new_rs)
    default_as_of = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    options = Options(as_of, default_as_of, order if order and any(order) else None, frozenset(changes.affected))
    chunks, skipped, total_bytes = scan(cases, jobs)

    outcomes: list[CaseOutcome] = []
    totals = {"same": 0, "old": 0.0, "new": 0.0, "cases": 0, "changed": 0}
    show = progress if progress is not None else (sys.stderr.isatty() and total_bytes >= PROGRESS_BYTES)
    bar = ProgressBar("rules diff", total_bytes, "{task.fields[cases]:,} cases, {task.fields[changed]:,} changed", cases=0, changed=0) if show else None

    def collect(result: ChunkResult) -> None:
        outcomes.extend(result.outcomes)
        skipped.extend(result.skipped)
        totals["same"] += result.same
        totals["old"] += result.old_seconds
        totals["new"] += result.new_seconds
        totals["cases"] += result.same + len(result.outcomes)
        totals["changed"] += sum(1 for o in result.outcomes if o.status == "changed")
        if bar:
            bar.advance(result.size, cases=totals["cases"], changed=totals["changed"])

    in_process = jobs == 1 or len(chunks) <= 1 or total_bytes < IN_PROCESS_BYTES or not _can_spawn()
    try:
        if bar:
            bar.start()
        if in_process:
            comparer = Comparer(old_rs, new_rs, options)
            try:
                for chunk in chunks:
                    collect(comparer.run(chunk))
            finally:
                comparer.close()
        else:
            _run_pool(chunks, min(jobs, len(chunks)), (old_rs, new_rs, options), collect)
    finally:
        if bar:
            bar.stop()
    outcomes.sort(key=lambda o: o.key)
    skipped.sort()
    titles = {r.id: r.title for r in old_rs.rules} | {r.id: r.title for r in new_rs.rules}
    return DiffReport(
        old=_version_info(old, old_rs),
        new=_version_info(new, new_rs),
        changes=changes,
        cases_dir=str(cases),
        as_of=format_instant(as_of) if as_of else None,
        default_as_of=format_instant(default_as_of),
        outcomes=outcomes,
        same=totals["same"],
        skipped=skipped,
        titles=titles,
        order=rule_order(old_rs, new_rs),
        jobs=1 if in_process else min(jobs, len(chunks)),
        seconds=time.perf_counter() - started,
        old_seconds=totals["old"],
        new_seconds=totals["new"],
    )


# -- rendering --------------------------------------------------------------------------------------


def to_json(report: DiffReport) -> dict:
    """The report as plain JSON-ready data."""

    def version(v: VersionInfo) -> dict:
        return {"label": v.label, "id": v.id, "version": v.version, "digest": v.digest, "layers": list(v.layers)}

    def value(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    def case(o: CaseOutcome) -> dict:
        out: dict[str, Any] = {"case": o.case}
        if o.name:
            out["name"] = o.name
        if o.as_of:
            out["asOf"] = o.as_of
        if o.changes:
            out["changes"] = [{"field": c.field, "item": c.item, "old": value(c.old), "new": value(c.new), "rules": list(c.rules)} for c in o.changes]
        if o.firings:
            out["firings"] = [{"rule": f.rule, "how": f.how, "old": list(f.old), "new": list(f.new)} for f in o.firings]
        if o.status == "error":
            out["oldError"], out["newError"] = o.old_error, o.new_error
        return out

    ch = report.changes
    return {
        "old": version(report.old),
        "new": version(report.new),
        "rulesetChanges": {
            "parameters": [{"name": p.name, "old": p.old, "new": p.new, "oldLayer": p.old_layer, "newLayer": p.new_layer} for p in ch.parameters],
            "rulesAdded": ch.rules_added,
            "rulesRemoved": ch.rules_removed,
            "rulesModified": ch.rules_modified,
            "valueSets": ch.value_sets,
            "observations": ch.observations,
            "aggregates": ch.aggregates,
            "affectedRules": ch.affected,
        },
        "cases": str(report.cases_dir),
        "asOf": report.as_of,
        "defaultAsOf": report.default_as_of,
        "summary": {
            "cases": report.total,
            "changed": len(report.changed),
            "firingsOnly": len(report.of("firings")),
            "unchanged": report.same,
            "errors": len(report.of("error")),
            "errorsInOneVersionOnly": len(report.one_sided_errors),
            "skippedFiles": len(report.skipped),
            "fields": report.field_counts(),
        },
        "transitions": [{"field": f, "item": i, "old": value(o), "new": value(n), "cases": k} for f, i, o, n, k in report.transitions()],
        "rules": [
            {"rule": s.rule, "title": s.title, "firedDifferently": s.fired_differently, "how": dict(s.how),
             "decisionsChanged": s.decisions_changed, "fields": dict(s.fields)}
            for s in report.by_rule()
        ],  # fmt: skip
        "changed": [case(o) for o in report.changed],
        "firingsOnly": [case(o) for o in report.of("firings")],
        "errors": [case(o) for o in report.of("error")],
        "skipped": [{"file": f, "reason": r} for f, r in report.skipped],
        "timing": _timing(report),
    }


def _timing(report: DiffReport) -> dict:
    evaluated = max(1, report.total)
    return {
        "seconds": round(report.seconds, 3),
        "processes": report.jobs,
        "casesPerSecond": round(report.total / report.seconds, 1) if report.seconds else None,
        "oldMsPerCase": round(1000 * report.old_seconds / evaluated, 3),
        "newMsPerCase": round(1000 * report.new_seconds / evaluated, 3),
    }


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (plural or word + 's')}"


_HOW = {"old only": "fired only under OLD", "new only": "fired only under NEW",
        "matched facts differ": "fired under both, on different facts", "overridden differently": "overridden differently"}  # fmt: skip


def _headline(report: DiffReport) -> str:
    parts = [
        f"{_plural(report.total, 'case')} evaluated",
        f"{_plural(len(report.changed), 'decision')} changed",
        f"{_plural(len(report.of('firings')), 'case')} where rules fired differently without changing the decision",
        f"{_plural(len(report.of('error')), 'error')}",
    ]
    if report.one_sided_errors:
        parts[-1] += f" ({len(report.one_sided_errors):,} under one version only)"
    parts.append(f"{_plural(len(report.skipped), 'file')} skipped")
    return ", ".join(parts) + "."


def _instant_text(report: DiffReport) -> str:
    if report.as_of:
        return f"every case at {report.as_of} (--as-of)"
    return f"each case at its own instant; inputs without one at {report.default_as_of} (the start of the run)"


def _ruleset_change_lines(report: DiffReport) -> list[tuple[str, str]]:
    """(kind, text) per rule-set change, plain text."""
    ch = report.changes
    lines = []
    for p in ch.parameters:
        old = "absent" if p.old_layer is None else f"{_text(p.old)} (layer {p.old_layer})"
        new = "absent" if p.new_layer is None else f"{_text(p.new)} (layer {p.new_layer})"
        lines.append(("parameter", f"{p.name}: {old} → {new}"))
    for kind, ids in (("rule added", ch.rules_added), ("rule removed", ch.rules_removed), ("rule edited", ch.rules_modified)):
        lines += [(kind, f"{rid}: {report.titles.get(rid, '')}") for rid in ids]
    for kind, names in (("value set changed", ch.value_sets), ("observation concept changed", ch.observations), ("aggregate changed", ch.aggregates)):
        lines += [(kind, name) for name in names]
    return lines


def _limited(items: list, limit: int | None) -> tuple[list, int]:
    if not limit or len(items) <= limit:
        return items, 0
    return items[:limit], len(items) - limit


# Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&#])")


def _md(value: Any) -> str:
    """Text safe inside a Markdown paragraph or table cell (one line, specials escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(_text(value).split()))


def _md_rules(rules: Iterable[str]) -> str:
    return ", ".join(f"`{r}`" for r in rules) or "—"


def render_markdown(report: DiffReport, *, max_cases: int | None = None) -> str:
    out: list[str] = []
    add = out.append
    o, n = report.old, report.new
    add(f"# Rule-set diff: {_md(o.id)} {_md(o.version)} → {_md(n.id)} {_md(n.version)}")
    add("")
    add("| | Rule set | Version | Layers | Digest | From |")
    add("|---|---|---|---|---|---|")
    for name, v in (("OLD", o), ("NEW", n)):
        add(f"| {name} | {_md(v.id)} | {_md(v.version)} | {_md(' + '.join(v.layers))} | `{v.digest[:19]}…` | {_md(v.label)} |")
    add("")
    if o.digest == n.digest:
        add("The two versions are identical (same digest).")
        add("")
    elif o.version == n.version and o.id == n.id:
        add(f"Note: both versions are numbered {_md(o.version)} but differ.")
        add("")
    add(f"Cases from {_md(report.cases_dir)}, {_md(_instant_text(report))}.")
    add("")
    add("## What changed in the rule set")
    add("")
    lines = _ruleset_change_lines(report)
    out += [f"- {kind}: {_md(text)}" for kind, text in lines] or ["- nothing that can change a decision"]
    if report.changes.affected:
        add(f"- rules whose behaviour may change: {_md_rules(report.changes.affected)}")
    add("")
    add("## Summary")
    add("")
    add(f"**{_md(_headline(report))}**")
    add("")
    fields = report.field_counts()
    if fields:
        add("| Field | Decisions changed |")
        add("|---|---:|")
        out += [f"| {name} | {count:,} |" for name, count in fields.items()]
        add("")
        add("| Field | Item | OLD | NEW | Cases |")
        add("|---|---|---|---|---:|")
        out += [f"| {f} | {_md(i)} | {_md(a)} | {_md(b)} | {k:,} |" for f, i, a, b, k in report.transitions()]
        add("")
    rules = report.by_rule()
    if rules:
        add("## By rule")
        add("")
        add("| Rule | Title | Decisions changed | Fields changed | Fired differently | How |")
        add("|---|---|---:|---|---:|---|")
        for s in rules:
            fields_text = ", ".join(f"{f} ({k:,})" for f, k in sorted(s.fields.items(), key=lambda fk: FIELDS.index(fk[0]))) or "—"
            how = "; ".join(f"{_HOW[h]} ({k:,})" for h, k in s.how.most_common()) or "—"
            add(f"| `{s.rule}` | {_md(s.title)} | {s.decisions_changed:,} | {fields_text} | {s.fired_differently:,} | {how} |")
        add("")
    changed, more = _limited(report.changed, max_cases)
    if changed:
        add(f"## Changed decisions ({len(report.changed):,})")
        add("")
        for c in changed:
            add(f"### {_md(c.case)}" + (f" — {_md(c.name)}" if c.name else ""))
            add("")
            if c.as_of:
                add(f"As of {c.as_of}.")
                add("")
            add("| Field | Item | OLD | NEW | Rules responsible |")
            add("|---|---|---|---|---|")
            out += [f"| {x.field} | {_md(x.item)} | {_md(x.old)} | {_md(x.new)} | {_md_rules(x.rules)} |" for x in c.changes]
            add("")
            out += _md_firings(c.firings)
        if more:
            add(f"… and {_plural(more, 'more changed decision')} (--max-cases 0 lists all).")
            add("")
    firings, more = _limited(report.of("firings"), max_cases)
    if firings:
        add(f"## Rules fired differently, decision unchanged ({len(report.of('firings')):,})")
        add("")
        add("| Case | Rules |")
        add("|---|---|")
        for c in firings:
            rules_text = "; ".join(f"`{f.rule}` {_HOW[f.how]}" for f in c.firings)
            add(f"| {_md(c.case)}" + (f" {_md(c.name)}" if c.name else "") + f" | {rules_text} |")
        add("")
        if more:
            add(f"… and {more:,} more.")
            add("")
    errors, more = _limited(report.of("error"), max_cases)
    if errors:
        add(f"## Errors ({len(report.of('error')):,})")
        add("")
        add("| Case | OLD | NEW |")
        add("|---|---|---|")
        for c in errors:
            add(f"| {_md(c.case)} | {_md(c.old_error or 'evaluated')} | {_md(c.new_error or 'evaluated')} |")
        add("")
        if more:
            add(f"… and {more:,} more.")
            add("")
    if report.skipped:
        add(f"## Skipped files ({len(report.skipped):,})")
        add("")
        out += [f"- {_md(f)}: {_md(r)}" for f, r in report.skipped]
        add("")
    t = _timing(report)
    add("---")
    add("")
    add(f"{report.total:,} cases in {t['seconds']:.2f} s on {_plural(t['processes'], 'process', 'processes')}; "
        f"evaluation {t['oldMsPerCase']:.2f} ms per case under OLD, {t['newMsPerCase']:.2f} ms under NEW.")  # fmt: skip
    return "\n".join(out) + "\n"


def _md_firings(firings: list[FiringDiff]) -> list[str]:
    if not firings:
        return []
    lines = ["Rules that fired differently:", ""]
    for f in firings:
        line = f"- `{f.rule}` {_HOW[f.how]}"
        if f.how == "old only":
            line += f"; it matched {_md('; '.join(f.old))}" if f.old else ""
        elif f.how == "new only":
            line += f"; it matched {_md('; '.join(f.new))}" if f.new else ""
        elif f.how == "matched facts differ":
            line += f"; only under OLD: {_md('; '.join(f.old) or 'nothing')}; only under NEW: {_md('; '.join(f.new) or 'nothing')}"
        else:
            line += f"; OLD by {_md_rules(f.old)}, NEW by {_md_rules(f.new)}"
        lines.append(line)
    lines.append("")
    return lines


# HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:76em;color:#1d2330;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d8dde6;padding-bottom:.2em}h3{font-size:1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #d8dde6;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f1f3f7}td.n{text-align:right;font-variant-numeric:tabular-nums}code{font:12px ui-monospace,Menlo,Consolas,monospace}
.old{background:#fdecea}.new{background:#e6f4ea}.headline{font-size:1.1em;font-weight:600}.muted{color:#5d6678}
ul.facts{margin:.2em 0;padding-left:1.2em}details{margin:.3em 0}summary{cursor:pointer}
"""


def _h(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _h_rules(rules: Iterable[str]) -> str:
    return ", ".join(f"<code>{html.escape(r)}</code>" for r in rules) or "—"


def render_html(report: DiffReport, *, max_cases: int | None = None) -> str:
    """A single self-contained page (inline CSS, no script)."""
    o, n = report.old, report.new
    out: list[str] = []
    add = out.append
    title = f"Rule-set diff: {o.id} {o.version} → {n.id} {n.version}"
    add(f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title><style>{_CSS}</style></head><body>')
    add(f"<h1>{_h(title)}</h1>")
    add("<table><tr><th></th><th>Rule set</th><th>Version</th><th>Layers</th><th>Digest</th><th>From</th></tr>")
    for name, v in (("OLD", o), ("NEW", n)):
        add(f"<tr><th>{name}</th><td>{_h(v.id)}</td><td>{_h(v.version)}</td><td>{_h(' + '.join(v.layers))}</td>"
            f"<td><code>{_h(v.digest[:19])}…</code></td><td>{_h(v.label)}</td></tr>")  # fmt: skip
    add("</table>")
    if o.digest == n.digest:
        add("<p>The two versions are identical (same digest).</p>")
    elif o.version == n.version and o.id == n.id:
        add(f"<p>Note: both versions are numbered {_h(o.version)} but differ.</p>")
    add(f"<p>Cases from {_h(report.cases_dir)}, {_h(_instant_text(report))}.</p>")
    add("<h2>What changed in the rule set</h2><ul>")
    lines = _ruleset_change_lines(report)
    out += [f"<li>{_h(kind)}: {_h(text)}</li>" for kind, text in lines] or ["<li>nothing that can change a decision</li>"]
    if report.changes.affected:
        add(f"<li>rules whose behaviour may change: {_h_rules(report.changes.affected)}</li>")
    add("</ul>")
    add("<h2>Summary</h2>")
    add(f'<p class="headline">{_h(_headline(report))}</p>')
    fields = report.field_counts()
    if fields:
        add("<table><tr><th>Field</th><th>Decisions changed</th></tr>")
        out += [f'<tr><td>{_h(name)}</td><td class="n">{count:,}</td></tr>' for name, count in fields.items()]
        add("</table>")
        add("<table><tr><th>Field</th><th>Item</th><th>OLD</th><th>NEW</th><th>Cases</th></tr>")
        out += [f'<tr><td>{_h(f)}</td><td>{_h(i)}</td><td class="old">{_h(a)}</td><td class="new">{_h(b)}</td><td class="n">{k:,}</td></tr>'
                for f, i, a, b, k in report.transitions()]  # fmt: skip
        add("</table>")
    rules = report.by_rule()
    if rules:
        add("<h2>By rule</h2>")
        add("<table><tr><th>Rule</th><th>Title</th><th>Decisions changed</th><th>Fields changed</th><th>Fired differently</th><th>How</th></tr>")
        for s in rules:
            fields_text = ", ".join(f"{f} ({k:,})" for f, k in sorted(s.fields.items(), key=lambda fk: FIELDS.index(fk[0]))) or "—"
            how = "; ".join(f"{_HOW[h]} ({k:,})" for h, k in s.how.most_common()) or "—"
            add(f'<tr><td><code>{_h(s.rule)}</code></td><td>{_h(s.title)}</td><td class="n">{s.decisions_changed:,}</td>'
                f'<td>{_h(fields_text)}</td><td class="n">{s.fired_differently:,}</td><td>{_h(how)}</td></tr>')  # fmt: skip
        add("</table>")
    changed, more = _limited(report.changed, max_cases)
    if changed:
        add(f"<h2>Changed decisions ({len(report.changed):,})</h2>")
        for c in changed:
            add(f"<h3>{_h(c.case)}" + (f" — {_h(c.name)}" if c.name else "") + "</h3>")
            if c.as_of:
                add(f'<p class="muted">As of {_h(c.as_of)}.</p>')
            add("<table><tr><th>Field</th><th>Item</th><th>OLD</th><th>NEW</th><th>Rules responsible</th></tr>")
            out += [f'<tr><td>{_h(x.field)}</td><td>{_h(x.item)}</td><td class="old">{_h(x.old)}</td><td class="new">{_h(x.new)}</td><td>{_h_rules(x.rules)}</td></tr>'
                    for x in c.changes]  # fmt: skip
            add("</table>")
            out += _html_firings(c.firings)
        if more:
            add(f"<p>… and {_h(_plural(more, 'more changed decision'))} (--max-cases 0 lists all).</p>")
    firings, more = _limited(report.of("firings"), max_cases)
    if firings:
        add(f"<h2>Rules fired differently, decision unchanged ({len(report.of('firings')):,})</h2>")
        add("<table><tr><th>Case</th><th>Rules</th></tr>")
        for c in firings:
            rules_text = "; ".join(f"<code>{_h(f.rule)}</code> {_h(_HOW[f.how])}" for f in c.firings)
            add(f"<tr><td>{_h(c.case)}" + (f" {_h(c.name)}" if c.name else "") + f"</td><td>{rules_text}</td></tr>")
        add("</table>")
        if more:
            add(f"<p>… and {more:,} more.</p>")
    errors, more = _limited(report.of("error"), max_cases)
    if errors:
        add(f"<h2>Errors ({len(report.of('error')):,})</h2>")
        add("<table><tr><th>Case</th><th>OLD</th><th>NEW</th></tr>")
        out += [f"<tr><td>{_h(c.case)}</td><td>{_h(c.old_error or 'evaluated')}</td><td>{_h(c.new_error or 'evaluated')}</td></tr>" for c in errors]
        add("</table>")
        if more:
            add(f"<p>… and {more:,} more.</p>")
    if report.skipped:
        add(f"<h2>Skipped files ({len(report.skipped):,})</h2><ul>")
        out += [f"<li>{_h(f)}: {_h(r)}</li>" for f, r in report.skipped]
        add("</ul>")
    t = _timing(report)
    add(f'<hr><p class="muted">{report.total:,} cases in {t["seconds"]:.2f} s on {_h(_plural(t["processes"], "process", "processes"))}; '
        f'evaluation {t["oldMsPerCase"]:.2f} ms per case under OLD, {t["newMsPerCase"]:.2f} ms under NEW.</p>')  # fmt: skip
    add("</body></html>")
    return "\n".join(out) + "\n"


def _html_firings(firings: list[FiringDiff]) -> list[str]:
    if not firings:
        return []
    out = ["<details open><summary>Rules that fired differently</summary><ul>"]
    for f in firings:
        head = f"<code>{_h(f.rule)}</code> {_h(_HOW[f.how])}"
        if f.how == "overridden differently":
            out.append(f"<li>{head}: OLD by {_h_rules(f.old)}, NEW by {_h_rules(f.new)}</li>")
            continue
        facts = [f'<li class="old">OLD: {_h(m)}</li>' for m in f.old] + [f'<li class="new">NEW: {_h(m)}</li>' for m in f.new]
        out.append(f"<li>{head}" + (f'<ul class="facts">{"".join(facts)}</ul>' if facts else "") + "</li>")
    out.append("</ul></details>")
    return out


# -- the command -------------------------------------------------------------------------------------


@click.command(name="diff")
@click.argument("old")
@click.argument("new")
@click.option("--cases", "cases_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Directory of cases (searched recursively), or one file.")
@click.option("--as-of", callback=parse_instant, help="Evaluate every case at this instant (ISO 8601; UTC if no zone).")
@click.option("--old-overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Site overlay for OLD.")
@click.option("--new-overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Site overlay for NEW.")
@order_options("for FHIR inputs that lack one.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "html", "json"]), default="markdown", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Write the report here (default: standard output).")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None, help="Worker processes [default: one per CPU].")
@click.option("--progress/--no-progress", default=None, help="Draw a progress bar on standard error [default: on a terminal, for long runs].")
@click.option("--max-cases", type=click.IntRange(0), default=0, show_default=True,
              help="List at most this many cases per section in Markdown and HTML (0: all); counts always cover every case.")
def command(
    old: str,
    new: str,
    cases_dir: Path,
    as_of: dt.datetime | None,
    old_overlay: Path | None,
    new_overlay: Path | None,
    target: str | None,
    side: str | None,
    intent: str | None,
    fmt: str,
    output: Path | None,
    jobs: int | None,
    progress: bool | None,
    max_cases: int,
) -> None:
    """Impact of a rule-set change: evaluate every case under OLD and NEW and report what changed.

    OLD and NEW are rule-set directories, bundled rule-set ids, or either as DIR:OVERLAY.yaml to
    apply a site overlay (or use --old-overlay/--new-overlay).

    \b
    Cases (--cases, searched recursively):
      *.json           a FHIR R4 Bundle, a CDS Hooks request, or one request as below
      *.yaml, *.yml    rule-set test cases (each at its own as_of unless --as-of)
      *.ndjson, *.jsonl  past requests, one a line:
          {"correlationId": "r-1", "asOf": "2025-06-02T09:00:00Z", "fhirBundle": {Bundle}}
        (correlationId, asOf optional; fhirBundle may be base64 as in the protobuf JSON
        mapping, or "context" may replace it; a line may also be a bare Bundle)
    Other files are skipped with a note; inputs that cannot be evaluated are error cases.

    \b
    Compared: modality (preferred/acceptable/avoid), injectates, deferrals, caution and
    missing-data codes. Reported: each changed case with the rules that fired differently
    and the rules responsible, a summary by field and by rule, errors and skipped files.
    Exit code: 0 no decision changed, 1 some changed, 2 the diff could not run.
    """
    order = (target, side, intent) if (target or side or intent) else None
    try:
        report = run_diff(
            parse_version(old, old_overlay),
            parse_version(new, new_overlay),
            cases_dir,
            as_of=as_of,
            order=order,
            jobs=jobs,
            progress=progress,
        )
    except DiffError as exc:
        raise click.UsageError(str(exc)) from None
    if fmt == "json":
        text = orjson.dumps(to_json(report), option=orjson.OPT_INDENT_2).decode() + "\n"
    elif fmt == "html":
        text = render_html(report, max_cases=max_cases or None)
    else:
        text = render_markdown(report, max_cases=max_cases or None)
    if output is None:
        click.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            click.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            sys.exit(EXIT_CANNOT_RUN)
        click.echo(_headline(report), err=True)
    sys.exit(report.exit_code)
