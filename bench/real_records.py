"""Real records report: the figures behind the issue's "Done when", over every Synthea bundle.

    python bench/real_records.py                         # at 2025-06-02T09:00:00Z and each last encounter
    python bench/real_records.py --instant 2020-01-01T00:00:00Z --instant last-encounter
    python bench/real_records.py --json > figures.json   # the same figures, for a machine

Not a test; nothing here asserts, and the exit code is 0 whatever the figures say. Both shared
Synthea folders are evaluated in-process with the bundled rule set and the issue's order
(hip-intra-articular, right, therapeutic). For each instant it prints: bundles and errors,
deferrals by reason, every pregnancy deferral with the age of its newest evidence, every patient
dead at the instant and what the decision gave them, missing-data entries by code (and those
about values too old for every rule), and invariant violations by kind. Then truncation: at each
instant, plus 2019-01-01, 2004-01-01 and the midpoint of each record's span, how many decisions
change when every record after the instant is removed, and how.

The checks are those of ``tests/real_records.py``, so the report and the tests count the same
things. Output is plain text when piped, and rich tables on a terminal.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the measuring stick lives with the tests

from needlepoint.core.evaluator import Evaluator  # noqa: E402
from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset  # noqa: E402
from tests.real_records import (  # noqa: E402
    MAIN_INSTANTS,
    TRUNCATION_INSTANTS,
    Corpus,
    bundle_id,
    bundle_paths,
    pregnancy_window_days,
)

EXTRA_TRUNCATION_INSTANTS = tuple(label for label in TRUNCATION_INSTANTS if label not in MAIN_INSTANTS)


class Report:
    """Sections of rows, printed as aligned plain text, or as rich tables on a terminal."""

    def __init__(self, rich: bool):
        self.rich = rich
        if rich:
            from rich.console import Console

            self.console = Console()

    def section(self, title: str, header: tuple[str, ...], rows: list[tuple], note: str = "") -> None:
        rows = [tuple(str(c) for c in row) for row in rows]
        if self.rich:
            from rich.table import Table

            table = Table(title=title, title_justify="left", show_lines=False)
            for name in header:
                table.add_column(name, overflow="fold")
            for row in rows:
                table.add_row(*row)
            if not rows:
                table.add_row(*(["(none)"] + [""] * (len(header) - 1)))
            self.console.print(table)
            if note:
                self.console.print(note, style="dim")
            self.console.print()
            return
        print(title)
        print("-" * len(title))
        if not rows:
            print("  (none)")
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            widths[-1] = 0  # the last column is free text
            print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
            for row in rows:
                print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
        if note:
            print(f"  {note}")
        print()

    def line(self, text: str) -> None:
        if self.rich:
            self.console.print(text)
        else:
            print(text)


def _kind(violation: str) -> str:
    """A violation without its quoted text, so that equal kinds count together."""
    return re.sub(r": '.*$", "", violation)


def _short(path: Path) -> str:
    return bundle_id(path)


def figures(corpus: Corpus, paths: list[Path], labels: list[str], truncation_labels: list[str], examples: int) -> dict:
    """Every figure of the report, as plain data (what ``--json`` prints)."""
    ruleset = corpus.evaluator.ruleset
    window = pregnancy_window_days(ruleset)
    studies = [corpus.study(path) for path in paths]
    out: dict = {
        "ruleset": f"{ruleset.id} {ruleset.version} {ruleset.digest[:19]}",
        "bundles": len(studies),
        "distinct_patients": len({s.path.name for s in studies}),
        "folders": dict(collections.Counter(s.folder for s in studies)),
        "pregnancy_window_days": window,
        "instants": {},
        "truncation": {},
    }
    for label in labels:
        at = [(s, s.instants[label]) for s in studies]
        decisions = [(s, i, i.full.decision) for s, i in at if i.full.decision is not None]
        reasons = collections.Counter(d["reason"] for _, _, dec in decisions for d in dec.get("deferrals") or [])
        missing = collections.Counter(m["code"] for _, _, dec in decisions for m in dec.get("missingData") or [])
        violations = collections.Counter(_kind(v) for _, i in at for v in i.findings["invariants"])
        violation_examples: dict[str, list[str]] = {}
        for s, i in at:
            for v in i.findings["invariants"]:
                violation_examples.setdefault(_kind(v), [])
                if len(violation_examples[_kind(v)]) < examples:
                    violation_examples[_kind(v)].append(_short(s.path))
        pregnancy = []
        for s, i, dec in decisions:
            if any(d["reason"] == "PREGNANCY" for d in dec.get("deferrals") or []):
                dated = [e for e in i.pregnancy if e.age_days is not None]
                newest = min(dated, key=lambda e: e.age_days) if dated else None
                pregnancy.append(
                    {
                        "bundle": _short(s.path),
                        "evidence_age_days": round(newest.age_days) if newest else None,
                        "evidence": newest.what if newest else ("undated" if i.pregnancy else "none found"),
                        "stale": bool(i.findings["pregnancy"]),
                    }
                )
        deceased = []
        for s, i in at:
            dec = i.full.decision or {}
            got_deceased = any(d["reason"] == "PATIENT_DECEASED" for d in dec.get("deferrals") or [])
            if i.deceased or got_deceased:
                deceased.append(
                    {
                        "bundle": _short(s.path),
                        "died": s.died,
                        "dead_at_instant": i.deceased,
                        "deferrals": [f"{d['reason']}/{d['severity']}" for d in dec.get("deferrals") or []],
                        "missingData": [m["code"] for m in dec.get("missingData") or []],
                        "error": i.full.error,
                        "ok": not i.findings["deceased"],
                    }
                )
        out["instants"][label] = {
            "bundles": len(at),
            "errors": [{"bundle": _short(s.path), "error": i.full.error} for s, i in at if i.full.error],
            "decisions_with_a_deferral": sum(bool(dec.get("deferrals")) for _, _, dec in decisions),
            "deferrals_by_reason": dict(reasons.most_common()),
            "pregnancy_deferrals": pregnancy,
            "stale_pregnancy_deferrals": sum(bool(i.findings["pregnancy"]) for _, i in at),
            "deceased": deceased,
            "deceased_at_instant": sum(i.deceased for _, i in at),
            "deceased_findings": sum(bool(i.findings["deceased"]) for _, i in at),
            "missing_data_by_code": dict(missing.most_common()),
            "stale_missing_data": [
                {"bundle": _short(s.path), "finding": f} for s, i in at for f in i.findings["stale-missing-data"]
            ],
            "invariant_violations": sum(violations.values()),
            "decisions_with_violations": sum(bool(i.findings["invariants"]) for _, i in at),
            "violations_by_kind": dict(violations.most_common()),
            "violation_examples": violation_examples,
        }
    for label in truncation_labels:
        at = [(s, s.instants[label]) for s in studies]
        out["truncation"][label] = {
            "bundles": len(at),
            "records_removed": sum(i.removed for _, i in at),
            "bundles_truncated": sum(i.removed > 0 for _, i in at),
            "not_evaluable_both_ways": sum(i.full.error is not None and i.full.error == i.truncated.error for _, i in at),
            "mismatches": [
                {"bundle": _short(s.path), "instant": f"{i.instant:%Y-%m-%dT%H:%M:%SZ}", "difference": i.findings["truncation"]}
                for s, i in at
                if i.findings["truncation"]
            ],
        }
    return out


def render(data: dict, report: Report, examples: int) -> None:
    report.line(
        f"Real records: {data['bundles']} bundles ({data['distinct_patients']} distinct patients; "
        + ", ".join(f"{k} {v}" for k, v in data["folders"].items())
        + f"), rule set {data['ruleset']}"
    )
    report.line(
        f"Order supplied: hip-intra-articular, right, therapeutic. Pregnancy window: {data['pregnancy_window_days']:g} days."
    )
    report.line("")
    for label, f in data["instants"].items():
        report.section(
            f"At {label}: {f['bundles']} bundles, {len(f['errors'])} errors, "
            f"{f['decisions_with_a_deferral']} decisions with a deferral",
            ("reason", "decisions"),
            [(k, v) for k, v in f["deferrals_by_reason"].items()] + [(f"error: {e['bundle']}", e["error"]) for e in f["errors"]],
        )
        report.section(
            f"At {label}: pregnancy deferrals ({len(f['pregnancy_deferrals'])}; {f['stale_pregnancy_deferrals']} on evidence "
            "older than the window)",
            ("bundle", "evidence age (days)", "stale", "newest evidence"),
            [
                (
                    p["bundle"],
                    p["evidence_age_days"] if p["evidence_age_days"] is not None else "-",
                    "STALE" if p["stale"] else "ok",
                    p["evidence"],
                )
                for p in f["pregnancy_deferrals"]
            ],
        )
        report.section(
            f"At {label}: deceased patients ({f['deceased_at_instant']} dead at the instant; {f['deceased_findings']} not "
            "handled as the contract says)",
            ("bundle", "died", "dead at T", "ok", "deferrals", "missing data"),
            [
                (
                    d["bundle"],
                    d["died"],
                    "yes" if d["dead_at_instant"] else "no",
                    "ok" if d["ok"] else "WRONG",
                    ", ".join(d["deferrals"]) or d["error"] or "none",
                    ", ".join(d["missingData"]) or "none",
                )
                for d in f["deceased"]
            ],
        )
        stale = f["stale_missing_data"]
        report.section(
            f"At {label}: missing-data entries by code ({sum(f['missing_data_by_code'].values())}; {len(stale)} about values "
            "too old for every rule)",
            ("code", "decisions"),
            list(f["missing_data_by_code"].items()),
            note="\n  ".join(f"too old: {x['bundle']}: {x['finding']}" for x in stale[: examples * 4]),
        )
        report.section(
            f"At {label}: invariant violations ({f['invariant_violations']} in {f['decisions_with_violations']} decisions)",
            ("count", "violation", "e.g."),
            [(n, kind, ", ".join(f["violation_examples"].get(kind, []))) for kind, n in f["violations_by_kind"].items()],
        )
    rows, details = [], []
    for label, t in data["truncation"].items():
        rows.append(
            (
                label,
                t["bundles"],
                t["bundles_truncated"],
                t["records_removed"],
                t["not_evaluable_both_ways"],
                len(t["mismatches"]),
            )
        )
        for m in t["mismatches"][:examples]:
            details.append((label, m["bundle"], m["instant"], " | ".join(m["difference"])))
        if len(t["mismatches"]) > examples:
            details.append((label, f"... and {len(t['mismatches']) - examples} more", "", ""))
    report.section(
        "Truncation: full bundle vs every later record removed, same instant",
        ("instant", "bundles", "truncated", "records removed", "same error both ways", "mismatches"),
        rows,
        note="'same error both ways': the instant is before the patient's birth; both inputs raise the same error.",
    )
    report.section("Truncation mismatches (examples)", ("instant", "bundle", "at", "difference"), details)
    summary = []
    for label, f in data["instants"].items():
        summary += [
            (label, "errors", len(f["errors"])),
            (label, "pregnancy deferrals on stale evidence", f["stale_pregnancy_deferrals"]),
            (label, "deceased patients not handled as the contract says", f["deceased_findings"]),
            (label, "missing data about values too old for every rule", len(f["stale_missing_data"])),
            (label, "decisions with invariant violations", f["decisions_with_violations"]),
        ]
    for label, t in data["truncation"].items():
        summary.append((label, "truncation mismatches", len(t["mismatches"])))
    report.section("Done-when summary (every figure should be 0)", ("instant", "check", "count"), summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--instant",
        action="append",
        help="an ISO instant, or 'last-encounter'; repeat for several (default: 2025-06-02T09:00:00Z and last-encounter)",
    )
    parser.add_argument("--examples", type=int, default=5, help="how many examples to list per kind (default 5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a report")
    args = parser.parse_args(argv)

    labels = [("2025-06-02" if x in ("2025-06-02", "2025-06-02T09:00:00Z") else x) for x in (args.instant or list(MAIN_INSTANTS))]
    truncation_labels = list(dict.fromkeys(labels + list(EXTRA_TRUNCATION_INSTANTS)))
    paths = bundle_paths()
    if not paths:
        print("no Synthea bundles found under ../shared/fixtures (set NEEDLEPOINT_SHARED)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    evaluator = Evaluator(load_ruleset(bundled_rulesets_dir() / "hip-injection"))
    try:
        corpus = Corpus(evaluator, labels=truncation_labels)
        data = figures(corpus, paths, labels, truncation_labels, args.examples)
    finally:
        evaluator.close()
    data["seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    render(data, Report(rich=sys.stdout.isatty()), args.examples)
    print(f"({data['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
