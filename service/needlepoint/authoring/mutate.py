"""``needlepoint rules mutate PATH``: are the rule set's tests strong enough to notice a change?

Each *mutant* is the rule set with one deliberate change a careless edit could make:

* every numeric parameter moved by a clinically meaningful step (10 %, at least 1 for whole
  numbers) up and down, and every other allowed value of an enumerated parameter;
* every comparison flipped at its boundary (``gt``↔``gte``, ``lt``↔``lte``);
* every code or prefix removed, one at a time, from every value set;
* every unit conversion of every observation concept, UCUM code or display unit: a factor
  multiplied and divided by 10, a named conversion swapped for each other one and for a factor
  of 1, and each unit dropped (the canonical unit is left alone: the loader insists on it);
* every plausible range narrowed at each end, just past the most extreme value the cases give
  that concept's rules (a range too narrow sets real results aside; the cases should notice).

A mutant is *killed* when at least one of the rule set's own cases fails under it. A mutant that
survives is a change the tests would let through; each is listed. Mutants the loader refuses (a
value set left empty) are counted as invalid, not as survivors.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from needlepoint.casefile import Case, check, load_cases
from needlepoint.core.conditions import ORDERING_OPERATORS
from needlepoint.core.evaluator import Evaluator
from needlepoint.core.prepare import Preparer
from needlepoint.core.record import RecordError
from needlepoint.core.ruleset import UNIT_CONVERSIONS, RuleSetError
from needlepoint.rulesets import build_ruleset, read_documents

_FLIP = {"gt": "gte", "gte": "gt", "lt": "lte", "lte": "lt"}
KINDS = ("parameter", "comparison", "value-set", "unit", "plausible")


@dataclass(frozen=True)
class Mutant:
    kind: str  # one of KINDS
    description: str
    documents: dict
    overlay: dict | None = None
    concept: str | None = None  # the observation concept it changes, if that is all it changes


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
            step: float = max(1, round(abs(value) * 0.1))
            for new in (value - step, value + step):
                yield Mutant("parameter", f"{name}: {value} -> {new}", docs, {name: new})
        else:
            step = abs(value) * 0.1
            for new in (round(value - step, 4), round(value + step, 4)):
                yield Mutant("parameter", f"{name}: {value:g} -> {new:g}", docs, {name: new})


def _ordering_tests(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
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


def _with_observations(docs: dict, cid: str, change: Callable[[dict], None]) -> dict:
    """``docs`` with ``change`` applied to a copy of concept ``cid``; the rest is shared, since
    build_ruleset only reads its documents."""
    mutated = dict(docs)
    mutated["observations"] = dict(docs["observations"])
    mutated["observations"][cid] = spec = copy.deepcopy(docs["observations"][cid])
    change(spec)
    return mutated


def unit_mutants(docs: dict) -> Iterator[Mutant]:
    for cid, spec in (docs.get("observations") or {}).items():
        for key in ("units", "display_units"):
            for unit, conversion in (spec.get(key) or {}).items():
                if key == "units" and unit == spec.get("unit"):
                    continue  # the canonical unit converts by 1, or the loader refuses the rule set
                label = f"{cid} {unit}" + (" (display)" if key == "display_units" else "")
                if isinstance(conversion, str):
                    others: list[float | str] = [c for c in UNIT_CONVERSIONS if c != conversion] + [1]
                else:
                    others = [conversion * 10, conversion / 10]
                for other in others:

                    def convert_by(spec: dict, key: str = key, unit: str = unit, other: float | str = other) -> None:
                        spec[key][unit] = other

                    yield Mutant(
                        "unit",
                        f"{label}: {_show(conversion)} -> {_show(other)}",
                        _with_observations(docs, cid, convert_by),
                        concept=cid,
                    )

                def drop(spec: dict, key: str = key, unit: str = unit) -> None:
                    del spec[key][unit]

                yield Mutant("unit", f"{label}: no longer accepted", _with_observations(docs, cid, drop), concept=cid)


def _show(conversion: float | str) -> str:
    return conversion if isinstance(conversion, str) else f"{conversion:g}"


def plausible_mutants(docs: dict, cases: Iterable[Case]) -> Iterator[Mutant]:
    """Each end of each plausible range moved inward just past the most extreme value that a case
    gives the concept's rules (the prepared fact, in the canonical unit). A concept that no case
    gives a value has its range narrowed by a tenth at each end, which nothing can notice: it
    survives, and so says that the range is untested."""
    concepts = {cid: spec for cid, spec in (docs.get("observations") or {}).items() if spec.get("plausible")}
    if not concepts:
        return
    preparer = Preparer(build_ruleset(docs))
    seen: dict[str, list[float]] = {}
    for case in cases:
        try:
            prepared = preparer.prepare(case.record, case.as_of)
        except RecordError:
            continue  # the case expects the record to be refused; it gives no values
        for fact in prepared.facts:
            if fact["t"] == "observation" and "value" in fact:
                seen.setdefault(fact["concept"], []).append(fact["value"])
    for cid, spec in concepts.items():
        low, high = spec["plausible"]
        values = seen.get(cid)
        if values:
            least, most = min(values), max(values)
            # just past the value: a thousandth of it, and never less than ten times the rounding
            # of prepared values (1e-4), so the value itself is surely outside
            ends = [
                (0, low, least + max(abs(least) / 1000, 0.001), f"excludes {least:g}, the lowest value a case gives"),
                (1, high, most - max(abs(most) / 1000, 0.001), f"excludes {most:g}, the highest value a case gives"),
            ]
        else:
            ends = [
                (0, low, low + (high - low) / 10, "no case gives a value"),
                (1, high, high - (high - low) / 10, "no case gives a value"),
            ]
        for end, old, new, why in ends:
            if not low < new < high:
                continue  # the cases' values fill the range: there is no inward to move to

            def narrow(spec: dict, end: int = end, new: float = new) -> None:
                spec["plausible"] = [new, spec["plausible"][1]] if end == 0 else [spec["plausible"][0], new]

            what = "low" if end == 0 else "high"
            yield Mutant(
                "plausible",
                f"{cid} plausible {what}: {old:g} -> {new:g} ({why})",
                _with_observations(docs, cid, narrow),
                concept=cid,
            )


def mutants(docs: dict, kinds: tuple[str, ...], cases: Iterable[Case] = ()) -> Iterator[Mutant]:
    if "parameter" in kinds:
        yield from parameter_mutants(docs)
    if "comparison" in kinds:
        yield from comparison_mutants(docs)
    if "value-set" in kinds:
        yield from value_set_mutants(docs)
    if "unit" in kinds:
        yield from unit_mutants(docs)
    if "plausible" in kinds:
        yield from plausible_mutants(docs, cases)


def run(
    path: Path, kinds: tuple[str, ...] = KINDS, progress: Callable[[int], object] | None = None, match: str = ""
) -> MutationReport:
    """Mutate the rule set in ``path`` and run its cases against each mutant. ``match`` keeps
    only the mutants whose description contains it (e.g. a concept or parameter name)."""
    docs = read_documents(path)
    cases: list[Case] = [c for f in sorted((Path(path) / "tests").glob("*.yaml")) for c in load_cases(f)]
    report = MutationReport([], [], [])
    all_mutants = [m for m in mutants(docs, kinds, cases) if match in m.description]
    concepts_of = _concepts_of(docs, cases)
    for mutant in all_mutants:
        try:
            ruleset = build_ruleset(mutant.documents, overlay=mutant.overlay, overlay_name="mutant" if mutant.overlay else "")
            evaluator = Evaluator(ruleset, pool_size=2)
        except RuleSetError as exc:
            report.invalid.append((mutant, str(exc)))
            continue
        try:
            if mutant.concept is None:
                killer = _first_failing(evaluator, cases)
            else:  # only a case with a result of that concept can notice; try those first
                about = [c for c in cases if mutant.concept in concepts_of[id(c)]]
                killer = _first_failing(evaluator, about) or _first_failing(
                    evaluator, [c for c in cases if mutant.concept not in concepts_of[id(c)]]
                )
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


def _concepts_of(docs: dict, cases: list[Case]) -> dict[int, set[str]]:
    """For each case (by id), the observation concepts its record has a result of."""
    concept_of_code = {code: cid for cid, spec in (docs.get("observations") or {}).items() for code in spec.get("codes") or ()}
    return {
        id(case): {
            concept_of_code[f"{c.system}#{c.code}"]
            for o in case.record.observations
            for c in o.codes
            if f"{c.system}#{c.code}" in concept_of_code
        }
        for case in cases
    }


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
@click.option("--kind", "kinds", multiple=True, type=click.Choice(KINDS), help="Only these kinds of mutant (repeatable).")
@click.option(
    "--match",
    default="",
    metavar="TEXT",
    help="Only the mutants whose description contains TEXT (e.g. a concept or parameter name).",
)
def command(path: Path, kinds: tuple[str, ...], match: str) -> None:
    """Check that the rule set's own cases notice every small change to its thresholds,
    comparisons, value sets, unit conversions and plausible ranges; list the changes they would
    let through."""
    start = time.perf_counter()
    report = run(path, kinds or KINDS, match=match)
    for mutant in report.survived:
        click.echo(f"SURVIVED {mutant.kind}: {mutant.description}")
    total = len(report.killed) + len(report.survived)
    click.echo(
        f"{len(report.killed)} of {total} mutants killed, {len(report.survived)} survived"
        f"{f', {len(report.invalid)} invalid' if report.invalid else ''} in {time.perf_counter() - start:.1f}s"
    )
    raise SystemExit(1 if report.survived else 0)
