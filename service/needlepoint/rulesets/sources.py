"""The documents of one rule set, as read from its directory (with positions) or as plain data.

Layout of ``rulesets/<id>/``::

    ruleset.yaml        id, version, title, status, validation, description
    parameters.yaml     site parameters with value, unit, provenance, source, description
    observations.yaml   lab and vital concepts: LOINC codes, canonical unit, accepted units
    aggregates.yaml     derived counts on the summary fact (optional)
    valuesets/*.yaml    code lists, one or more value sets per file
    rules/*.yaml        the rules, a list per file
    tests/              the rule set's own test cases

:meth:`Sources.documents` is the plain form (``{"ruleset": ..., "rules": [(source, rule)], ...}``)
that travels between processes and that the rule-set digest is computed over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .reader import Document, read_file

KNOWN_FILES = ("ruleset.yaml", "parameters.yaml", "observations.yaml", "aggregates.yaml")
OPTIONAL_DOCUMENTS = ("parameters", "observations", "aggregates")


@dataclass
class Sources:
    root: str  # the directory as diagnostics show it
    meta: Document | None = None
    parameters: Document | None = None
    observations: Document | None = None
    aggregates: Document | None = None
    value_sets: list[Document] = field(default_factory=list)
    rules: list[Document] = field(default_factory=list)
    overlay: Document | None = None
    missing: str | None = None  # set when the directory has no ruleset.yaml
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (file, why) YAML files the loader does not read
    plain: dict | None = None  # the documents, when they were given as plain data
    rule_sources: dict[int, list[str]] = field(default_factory=dict)  # plain data: id(rules document) -> each rule's source

    def all_documents(self) -> Iterator[Document]:
        for doc in (self.meta, self.parameters, self.observations, self.aggregates, *self.value_sets, *self.rules, self.overlay):
            if doc is not None:
                yield doc

    def rule_source(self, doc: Document, index: int) -> str:
        """``rules/10-bleeding.yaml:12``: the file and line where a rule starts."""
        if id(doc) in self.rule_sources:
            return self.rule_sources[id(doc)][index]
        return f"{doc.rel}:{doc.pos((index,), key=False)[0]}"

    def documents(self) -> dict[str, Any]:
        """The plain documents: what :func:`~needlepoint.rulesets.build_ruleset` takes."""
        if self.plain is not None:
            return self.plain
        docs: dict[str, Any] = {"ruleset": (self.meta.value if self.meta is not None else None) or {}}
        for name in OPTIONAL_DOCUMENTS:
            doc = getattr(self, name)
            docs[name] = (doc.value or {}) if doc is not None else {}
        value_sets: dict = {}
        for doc in self.value_sets:
            for vs_id, spec in (doc.value or {}).items() if isinstance(doc.value, dict) else ():
                value_sets.setdefault(vs_id, spec)
        docs["value_sets"] = value_sets
        docs["rules"] = [(self.rule_source(doc, i), raw) for doc in self.rules for i, raw in enumerate(doc.value or [])]
        return docs


def read_sources(directory: Path, *, overlay: Path | None = None, shown: str | Path | None = None) -> Sources:
    """Read every file of the rule set in ``directory`` (and a site overlay). Never raises for
    a broken rule set: what cannot be read is a problem on its document. ``shown`` is how
    diagnostics name the directory (default: as given)."""
    root = Path(directory)
    if root.is_file() and root.name == "ruleset.yaml":
        root = root.parent
    base = Path(shown) if shown is not None else root
    sources = Sources(str(base))
    if overlay is not None:
        sources.overlay = read_file(Path(overlay), rel=Path(overlay).name)
    if not (root / "ruleset.yaml").is_file():
        sources.missing = str(base)
        return sources

    def read(rel: str) -> Document:
        return read_file(root / rel, shown=str(base / rel), rel=rel)

    sources.meta = read("ruleset.yaml")
    for name in OPTIONAL_DOCUMENTS:
        if (root / f"{name}.yaml").is_file():
            setattr(sources, name, read(f"{name}.yaml"))
    sources.value_sets = [read(f"valuesets/{p.name}") for p in sorted((root / "valuesets").glob("*.yaml"))]
    sources.rules = [read(f"rules/{p.name}") for p in sorted((root / "rules").glob("*.yaml"))]
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in (".yaml", ".yml") and p.name not in KNOWN_FILES:
            sources.ignored.append(
                (str(base / p.name), f"{p.name} is not a rule-set file ({', '.join(KNOWN_FILES)}); the loader ignores it")
            )
    for sub in ("valuesets", "rules"):
        for p in sorted((root / sub).glob("*.yml")):
            sources.ignored.append(
                (str(base / sub / p.name), f"only *.yaml files are read: {sub}/{p.name} is ignored; rename it to {p.stem}.yaml")
            )
    return sources


def sources_of(documents: dict[str, Any], *, overlay: dict[str, Any] | None = None, overlay_name: str = "") -> Sources:
    """Plain documents (``read_documents``' form) as :class:`Sources` without positions; rules
    keep the ``file:line`` source they carry. ``overlay`` maps parameter names to site values."""
    sources = Sources("", plain=documents)
    sources.meta = Document.plain("ruleset.yaml", documents.get("ruleset"))
    for name in OPTIONAL_DOCUMENTS:
        setattr(sources, name, Document.plain(f"{name}.yaml", documents.get(name) or {}))
    sources.value_sets = [Document.plain("valuesets", documents.get("value_sets") or {})]
    by_file: dict[str, Document] = {}
    for source, raw in documents.get("rules") or []:
        file = source.rsplit(":", 1)[0]
        doc = by_file.get(file)
        if doc is None:
            doc = by_file[file] = Document.plain(file, [])
            sources.rules.append(doc)
            sources.rule_sources[id(doc)] = []
        doc.value.append(raw)
        sources.rule_sources[id(doc)].append(source)
    if overlay is not None:
        sources.overlay = Document.plain(
            overlay_name or "overlay", {"site": overlay_name, "parameters": overlay} if overlay_name else {"parameters": overlay}
        )
    return sources
