"""``needlepoint rules lint PATH``: static checks of a rule set before it ships.

Each finding has ``file:line:column``, a stable code and a severity. Errors fail the command
(exit 1). Warnings do not, unless ``--strict`` is given. Lint reads and builds the rule set with
the rule-set front end (:mod:`needlepoint.rulesets`), so it reports exactly what loading
refuses, every problem at once and each where it is written; then it analyses what was built
(:mod:`.checks`, on the semantics in :mod:`.logic`, with code shapes in :mod:`.codes`). A rule
set that lints without errors loads.

=====  ========  ==============================================================================
Code   Severity  Meaning
=====  ========  ==============================================================================
NP000  error     A file cannot be read: a YAML syntax error (at the parser's line and column),
                 text that is not UTF-8, or a directory without ruleset.yaml.
NP001  error     Structure: an unknown key (a typo, or a key the format does not have), a
                 missing required key, or ``when`` and ``when_any`` together.
                 Also a warning for a ``*.yml`` or stray YAML file that the loader ignores.
NP002  error     Wrong type or value: a string where a number is due, a value outside its
                 enumeration (category, reason, modality and so on), a malformed id or version,
                 a parameter whose type does not fit the field it is compared with, a
                 negated aggregate criterion (the engine would count it as positive), an
                 aggregate or parameter named after a field the engine reserves (t, id, sid,
                 _tags, _fid), or a modality rule that prefers and avoids the same modality.
NP003  error     A reference to an unknown value set.
NP004  error     A reference to an unknown parameter (in a test, a message or
                 ``modality.preferred``).
NP005  error     An unknown fact kind, fact field, summary field (aggregate) or observation
                 concept, or a message placeholder that names no fact matched by every
                 alternative.
NP006  error     A code that is not well-formed for its system: ICD-10-CM, LOINC, RxNorm, ATC,
                 SNOMED CT (shape, partition, Verhoeff check digit), CPT, or the np-*
                 vocabularies. Also a code that YAML reads as a different number (``00100``
                 becomes 64). A wrong LOINC mod-10 check digit is a warning.
NP007  error     Can never match: a rule, one of its alternatives, or a listed value. Causes
                 are contradictory tests, a value outside the contract's vocabulary or an
                 observation's plausible range, a negation that the rule's own positive
                 pattern implies, or a field the prepared facts never carry.
NP008  warning   Shadowed: a rule whose whole contribution always loses to another rule that
                 fires whenever it does. For modality this is a rule of higher precedence;
                 for injectates it is a more restrictive recommendation.
NP009  error     Two modality rules of equal precedence can fire together and contradict each
                 other (different preferred modalities, or one avoids what the other prefers),
                 so file order decides.
NP010  error     A gap between adjacent threshold bands of deferral/caution rules.
                 An overlap is a warning.
NP011  error     A rule without rationale, without evidence, or with an evidence entry that
                 has no citation.
NP012  warning   A hard-coded threshold: a numeric literal where a parameter belongs.
NP013  warning   A value set or parameter that nothing uses.
NP014  error     A site overlay sets an unknown parameter, or a value of the wrong type or
                 outside the allowed values.
NP015  error     A duplicate: a YAML key twice in one mapping, a rule id, value set id,
                 injectate category in one outcome, or an observation code claimed by two
                 concepts. A warning for a display unit that repeats one of the concept's
                 UCUM codes (already accepted as text).
=====  ========  ==============================================================================

NP000-NP005, NP011 (a missing rationale or citation), NP014, NP015 (a duplicate definition or
injectate category, an observation code claimed twice) and the NP002 and NP006 errors of
structure are the builder's: loading refuses them too. The rest is lint's alone.

Injectate and deferral rules cannot conflict with each other. The resolver lists every
deferral, and for each injectate category the most restrictive recommendation wins whatever
the order. Only modality depends on precedence, so NP009 looks only at modality rules.

The JSON Schemas in ``rulesets/schema/`` are generated from the format description
(:mod:`needlepoint.rulesets.schema`; ``needlepoint rules schema rulesets/schema``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from needlepoint.rulesets import Built, build, read_sources
from needlepoint.rulesets.diagnostics import ERROR, WARNING, Diagnostic
from needlepoint.rulesets.sources import Sources

from .checks import Linter
from .codes import check_code, loinc_check_digit, verhoeff_valid

__all__ = ["ERROR", "WARNING", "Finding", "check_code", "command", "lint", "loinc_check_digit", "verhoeff_valid"]


@dataclass(frozen=True)
class Finding:
    """One problem, at a 1-based line and column of a file."""

    code: str
    severity: str  # "error" | "warning"
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.code} {self.severity}: {self.message}"

    def sort_key(self) -> tuple:
        return (self.file, self.line, self.column, self.code, self.message)

    @classmethod
    def of(cls, d: Diagnostic) -> Finding:
        """A diagnostic as lint shows it: the key path in brackets after the message."""
        return cls(d.code, d.severity, d.file, d.line, d.column, d.message + (f" [{d.key_path}]" if d.key_path else ""))


@dataclass(frozen=True)
class Report:
    findings: list[Finding]
    files: int
    rules: int


def run(path: Path, *, overlay: Path | None = None, shown: str | Path | None = None) -> Report:
    """Lint the rule set in ``path``; ``shown`` is how findings name its directory (default: as given)."""
    sources = read_sources(Path(path), overlay=overlay, shown=shown)
    return report(sources, build(sources))


def report(sources: Sources, built: Built) -> Report:
    """Lint a rule set already read and built (the builder's diagnostics and lint's own)."""
    diagnostics = built.diagnostics + Linter(built).run()
    unique = {(f.file, f.line, f.column, f.code, f.message): f for f in map(Finding.of, diagnostics)}
    return Report(sorted(unique.values(), key=Finding.sort_key), sum(1 for _ in sources.all_documents()), built.rule_count)


def lint(path: Path, *, overlay: Path | None = None) -> list[Finding]:
    """Every finding for the rule set in ``path`` (optionally under a site overlay), sorted by
    file, line and column. Never raises for a broken rule set: broken is what it reports."""
    return run(path, overlay=overlay).findings


@click.command(name="lint")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--overlay",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A site overlay (site: name, parameters: {...}) to check, and to check the rules under.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="One line per finding, or a JSON document.",
)
@click.option("--strict", is_flag=True, help="Fail (exit 1) on warnings too.")
def command(path: Path, overlay: Path | None, fmt: str, strict: bool) -> None:
    """Static checks of the rule set in PATH: schema, references, code shapes, rules that can
    never fire, shadowed and conflicting rules, gaps between threshold bands, citations and
    hard-coded thresholds. Exit 1 on any error (with --strict, on any warning)."""
    report = run(path, overlay=overlay)
    findings = report.findings
    errors = sum(f.severity == ERROR for f in findings)
    warnings = len(findings) - errors
    if fmt == "json":
        summary = {"errors": errors, "warnings": warnings, "files": report.files, "rules": report.rules}
        click.echo(
            json.dumps(
                {
                    "path": str(path),
                    "overlay": str(overlay) if overlay else None,
                    "findings": [asdict(f) for f in findings],
                    "summary": summary,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        for f in findings:
            click.echo(str(f))
        plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
        click.echo(
            f"{plural(errors, 'error')}, {plural(warnings, 'warning')} in {path} ({plural(report.rules, 'rule')}, "
            f"{plural(report.files, 'file')})"
        )
    raise click.exceptions.Exit(1 if errors or (strict and warnings) else 0)
