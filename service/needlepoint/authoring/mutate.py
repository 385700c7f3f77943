"""``needlepoint rules mutate PATH``: are the rule set's tests strong enough to notice a change?

Each *mutant* is the rule set with one deliberate change a careless edit could make:

* every numeric parameter moved by a clinically meaningful step (10 %, at least 1 for whole
  numbers) up and down, and every other allowed value of an enumerated parameter;
* every comparison flipped at its boundary (``gt``↔``gte``, ``lt``↔``lte``);
* every code or prefix removed, one at a time, from every value set.

A mutant is *killed* when at least one of the rule set's own cases fails under it. A mutant that
survives is a change the tests would let through; each is listed. Mutants the loader refuses (a
value set left empty) are counted as invalid, not as survivors.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from needlepoint.casefile import Case, check, load_cases
from needlepoint.core.conditions import ORDERING_OPERATORS, RuleSetError
from needlepoint.core.evaluator import Evaluator
from needlepoint.core.record import RecordError
from needlepoint.core.ruleset import build_ruleset
from needlepoint.rulesets import read_documents

_FLIP = {"gt": "gte", "gte": "gt", "lt": "lte", "lte": "lt"}


@dataclass(frozen=True)
class Mutant:
    kind: str  # "parameter" | "comparison" | "value-set"
    description: str
    documents: dict
    overlay: dict | None = None


@dataclass
class MutationReport:
    killed: list[tuple[Mutant, str]]  # with the case that noticed
    survived: list[Mutant]
    invalid: list[tuple[Mutant, str]]


def parameter_mutants(docs: dict) -> Iterator[Mutant]:
    for name, spec in (docs.get("parameters") or {}).items():
        value = spec.get("value")
        if "allowed" in spec:
            for other in spec["allowed"]:
                if other != value:
                    yield Mutant("parameter", f"{name}: {value} -> {other}", docs, {name: other})
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
            continue
        elif isinstance(value, int):
            step = max(1, round(abs(value) * 0.1))
            for new in (value - step, value + step):
                yield Mutant("parameter", f"{name}: {value} -> {new}", docs, {name: new})
        else:
            step = abs(value) * 0.1
            for new in (round(value - step, 4), round(value + step, 4)):
                yield Mutant("parameter", f"{name}: {value:g} -> {new:g}", docs, {name: new})


def _ordering_tests(node, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Paths to every {op: operand} mapping with an ordering operator inside a rule's conditions."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ORDERING_OPERATORS and not isinstance(value, (dict, list)):
                yield path, key
            else:
                yield from _ordering_tests(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _ordering_tests(value, path + (i,))


def comparison_mutants(docs: dict) -> Iterator[Mutant]:
    for index, (_source, rule) in enumerate(docs["rules"]):
        for path, op in _ordering_tests({k: rule[k] for k in ("when", "when_any") if k in rule}):
            mutated = copy.deepcopy(docs)
            node = mutated["rules"][index][1]
            for key in path:
                node = node[key]
            node[_FLIP[op]] = node.pop(op)
            where = ".".join(str(p) for p in path)
            yield Mutant("comparison", f"{rule['id']} {where}: {op} -> {_FLIP[op]}", mutated)


def _code_lists(spec: dict) -> Iterator[tuple[dict, str, str, list]]:
    """(owner mapping, system, 'codes'|'prefixes', list) for every code list of a value-set spec."""
    for system, entry in (spec or {}).items():
        if isinstance(entry, list):
            yield spec, system, "", entry
        elif isinstance(entry, dict):
            for key in ("codes", "prefixes"):
                if entry.get(key):
                    yield entry, system, key, entry[key]


def value_set_mutants(docs: dict) -> Iterator[Mutant]:
    for vs_id, spec in docs["value_sets"].items():
        places = [("", spec.get("codes"))] + [(f"/{g}", gspec) for g, gspec in (spec.get("groups") or {}).items()]
        for suffix, codes_spec in places:
            for _owner, system, key, members in _code_lists(codes_spec):
                for i, code in enumerate(members):
                    mutated = copy.deepcopy(docs)
                    target = mutated["value_sets"][vs_id]
                    holder = target["codes"] if not suffix else target["groups"][suffix[1:]]
                    entry = holder[system]
                    (entry if not key else entry[key]).pop(i)
                    what = "prefix" if key == "prefixes" else "code"
                    yield Mutant("value-set", f"{vs_id}{suffix}: remove {system} {what} {code}", mutated)


def mutants(docs: dict, kinds: tuple[str, ...]) -> Iterator[Mutant]:
    if "parameter" in kinds:
        yield from parameter_mutants(docs)
    if "comparison" in kinds:
        yield from comparison_mutants(docs)
    if "value-set" in kinds:
        yield from value_set_mutants(docs)


def run(path: Path, kinds: tuple[str, ...] = ("parameter", "comparison", "value-set"), progress=None) -> MutationReport:
    docs = read_documents(path)
    cases: list[Case] = [c for f in sorted((Path(path) / "tests").glob("*.yaml")) for c in load_cases(f)]
    report = MutationReport([], [], [])
    all_mutants = list(mutants(docs, kinds))
    for mutant in all_mutants:
        try:
            ruleset = build_ruleset(mutant.documents, overlay=mutant.overlay, overlay_name="mutant" if mutant.overlay else "")
            evaluator = Evaluator(ruleset, pool_size=2)
        except RuleSetError as exc:
            report.invalid.append((mutant, str(exc)))
            continue
        try:
            killer = _first_failing(evaluator, cases)
        finally:
            evaluator.close()
        if killer is None:
            report.survived.append(mutant)
        else:
            report.killed.append((mutant, killer.name))
            cases.remove(killer)
            cases.insert(0, killer)  # a case that kills one mutant often kills its neighbours
        if progress is not None:
            progress(len(all_mutants))
    return report


def _first_failing(evaluator: Evaluator, cases: list[Case]) -> Case | None:
    for case in cases:
        try:
            if check(case, evaluator.evaluate(case.record, case.as_of)):
                return case
        except RecordError:
            return case
    return None


@click.command(name="mutate")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["parameter", "comparison", "value-set"]), help="Only these kinds of mutant (repeatable).")
def command(path: Path, kinds: tuple[str, ...]) -> None:
    """Check that the rule set's own cases notice every small change to its thresholds,
    comparisons and value sets; list the changes they would let through."""
    start = time.perf_counter()
    report = run(path, kinds or ("parameter", "comparison", "value-set"))
    for mutant in report.survived:
        click.echo(f"SURVIVED {mutant.kind}: {mutant.description}")
    total = len(report.killed) + len(report.survived)
    click.echo(
        f"{len(report.killed)} of {total} mutants killed, {len(report.survived)} survived"
        f"{f', {len(report.invalid)} invalid' if report.invalid else ''} in {time.perf_counter() - start:.1f}s"
    )
    raise SystemExit(1 if report.survived else 0)
