"""Rule sets on disk: YAML files in a directory, loaded into a validated :class:`RuleSet`.

Layout of ``rulesets/<id>/``::

    ruleset.yaml        id, version, title, status, validation, description
    parameters.yaml     site parameters with value, unit, provenance, source, description
    observations.yaml   lab and vital concepts: LOINC codes, canonical unit, accepted units
    aggregates.yaml     derived counts on the summary fact (optional)
    valuesets/*.yaml    code lists, one or more value sets per file
    rules/*.yaml        the rules, a list per file
    tests/              the rule set's own test cases
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .core.conditions import RuleSetError
from .core.ruleset import RuleSet, build_ruleset

DEFAULT_RULESET = "hip-injection"


def bundled_rulesets_dir() -> Path:
    """The rule sets shipped with the package (or the repository's rulesets/ in a checkout)."""
    installed = Path(__file__).parent / "bundled_rulesets"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "rulesets"


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line where each rule starts."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read(path: Path, *, lines: bool = False):
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_LineLoader) if lines else yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RuleSetError(where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _strip_lines(value):
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def read_documents(directory: Path) -> dict:
    """The raw documents of a rule set directory, in the form build_ruleset takes."""
    directory = Path(directory)
    if not (directory / "ruleset.yaml").is_file():
        raise RuleSetError(str(directory), "not a rule set: ruleset.yaml is missing")
    docs: dict = {"ruleset": _read(directory / "ruleset.yaml") or {}}
    for name in ("parameters", "observations", "aggregates"):
        path = directory / f"{name}.yaml"
        docs[name] = (_read(path) or {}) if path.is_file() else {}
    value_sets: dict = {}
    for path in sorted((directory / "valuesets").glob("*.yaml")):
        for vs_id, spec in (_read(path) or {}).items():
            if vs_id in value_sets:
                raise RuleSetError(f"{path.name}.{vs_id}", "value set defined twice")
            value_sets[vs_id] = spec
    docs["value_sets"] = value_sets
    rules = []
    for path in sorted((directory / "rules").glob("*.yaml")):
        content = _read(path, lines=True) or []
        if not isinstance(content, list):
            raise RuleSetError(str(path.relative_to(directory)), "a rules file is a list of rules")
        for raw in content:
            line = raw.get("__line__", 0) if isinstance(raw, dict) else 0
            rules.append((f"{path.relative_to(directory)}:{line}", _strip_lines(raw)))
    docs["rules"] = rules
    return docs


def load_ruleset(directory: Path, *, overlay: Path | None = None) -> RuleSet:
    """Load and validate the rule set in ``directory``, optionally under a site overlay file."""
    docs = read_documents(directory)
    overlay_values, overlay_name = None, ""
    if overlay is not None:
        content = _read(Path(overlay)) or {}
        overlay_name = content.get("site", Path(overlay).stem)
        overlay_values = content.get("parameters", {})
    return build_ruleset(docs, overlay=overlay_values, overlay_name=overlay_name)


def discover(directory: Path) -> list[Path]:
    """Every rule set directory directly under ``directory``."""
    return sorted(p for p in Path(directory).iterdir() if (p / "ruleset.yaml").is_file())
