"""The rule-set front end: rule sets on disk (YAML) in, the :class:`~needlepoint.core.ruleset.RuleSet`
model out.

One reader (:mod:`.reader`: libyaml, a line and column for every key and value), one declarative
description of the format (:mod:`.format`), one builder that collects every problem as a
diagnostic (:mod:`.builder`, :mod:`.rules`, :mod:`.diagnostics`), and the JSON Schemas generated
from the format (:mod:`.schema`). Everything that reads rule-set YAML goes through here: serving,
hot reload, ``needlepoint rules lint`` (which analyses what the builder built) and the other
authoring tools.

Loading raises one :class:`~needlepoint.core.ruleset.RuleSetError` that lists every error, each
with its ``file:line:col``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from needlepoint.core.ruleset import RuleSet, RuleSetError

from .builder import Builder, Built
from .diagnostics import ERROR, WARNING, Diagnostic, raise_errors
from .sources import Sources, read_sources, sources_of

DEFAULT_RULESET = "hip-injection"

__all__ = [
    "DEFAULT_RULESET",
    "ERROR",
    "WARNING",
    "Built",
    "Diagnostic",
    "Loaded",
    "RuleSetError",
    "build",
    "build_ruleset",
    "bundled_rulesets_dir",
    "discover",
    "load",
    "load_ruleset",
    "read_documents",
    "read_sources",
]


def bundled_rulesets_dir() -> Path:
    """The rule sets shipped with the package (or the repository's rulesets/ in a checkout)."""
    installed = Path(__file__).resolve().parent.parent / "bundled_rulesets"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[3] / "rulesets"


def discover(directory: Path) -> list[Path]:
    """Every rule set directory directly under ``directory``."""
    return sorted(p for p in Path(directory).iterdir() if (p / "ruleset.yaml").is_file())


def build(sources: Sources) -> Built:
    """Check and build: every diagnostic, the entries lint analyses, and the model when there is
    no error. Never raises for a broken rule set."""
    return Builder(sources).build()


def build_ruleset(documents: dict[str, Any], *, overlay: dict[str, Any] | None = None, overlay_name: str = "") -> RuleSet:
    """Build the rule set from plain documents (``read_documents``' form: keys ``ruleset``,
    ``parameters``, ``value_sets``, ``observations``, ``aggregates`` and ``rules``, a list of
    ``(source, rule)``). ``overlay`` maps parameter names to site values layered on top.
    Raises one :class:`RuleSetError` listing every error."""
    built = build(sources_of(documents, overlay=overlay, overlay_name=overlay_name))
    raise_errors(built.diagnostics)
    assert built.ruleset is not None
    return built.ruleset


@dataclass(frozen=True)
class Loaded:
    """A rule set loaded from a directory: the model, and the plain documents it was built from
    (what a worker process rebuilds the same rule set from)."""

    ruleset: RuleSet
    documents: dict[str, Any]
    warnings: tuple[Diagnostic, ...] = ()


def load(directory: Path, *, overlay: Path | None = None, shown: str | Path | None = None) -> Loaded:
    """Read and build the rule set in ``directory``, optionally under a site overlay file.
    Raises one :class:`RuleSetError` listing every error with its file:line:col (files named
    under ``shown`` instead of ``directory`` when given)."""
    sources = read_sources(directory, overlay=overlay, shown=shown)
    built = build(sources)
    raise_errors(built.diagnostics)
    assert built.ruleset is not None
    return Loaded(built.ruleset, sources.documents(), tuple(d for d in built.diagnostics if d.severity == WARNING))


def load_ruleset(directory: Path, *, overlay: Path | None = None) -> RuleSet:
    """Load the rule set in ``directory``, optionally under a site overlay file."""
    return load(directory, overlay=overlay).ruleset


def read_documents(directory: Path) -> dict[str, Any]:
    """The plain documents of the rule set in ``directory``, in the form :func:`build_ruleset`
    takes. The rule set is checked on the way: raises one :class:`RuleSetError` for its errors."""
    return load(directory).documents
