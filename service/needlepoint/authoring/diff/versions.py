"""The two sides of ``needlepoint rules diff``: a rule-set directory or bundled id, optionally under a
site overlay, and loading it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from needlepoint.core.ruleset import RuleSet, RuleSetError
from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset


class DiffError(Exception):
    """The diff cannot run: a bad version, a rule set that does not load, no cases directory."""


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
