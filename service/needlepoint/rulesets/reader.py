"""The one YAML reader of rule sets, site overlays and rule-set test cases.

libyaml (PyYAML's C parser) composes the file into nodes; the values are constructed from those
nodes, and the line and column of every key and value is kept by its key path, so that every
diagnostic can point at the text it is about. A syntax error, text that is not UTF-8, or a file
that cannot be read is a :class:`ReadProblem` at the parser's line and column, never an
exception. Duplicate keys (which YAML silently collapses to the last) are recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# libyaml when PyYAML was built with it (ten times faster); its marks are the same.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class ReadProblem:
    line: int
    column: int
    message: str


@dataclass(frozen=True)
class Duplicate:
    path: tuple  # the key path of the repeated key
    line: int
    column: int
    earlier_line: int


@dataclass
class Document:
    """One YAML document: its value and where each key and value of it is written.

    ``file`` is the path as shown in diagnostics; ``rel`` the name inside the rule set
    (``rules/10-bleeding.yaml``). A document made with :meth:`plain` has a value but no
    positions (line and column 0)."""

    file: str
    rel: str
    value: Any = None
    loaded: bool = False
    problem: ReadProblem | None = None
    lines: list[str] = field(default_factory=list, repr=False)
    keys: dict[tuple, tuple[int, int]] = field(default_factory=dict, repr=False)  # key path -> the key's (line, column), 0-based
    nodes: dict[tuple, yaml.Node] = field(default_factory=dict, repr=False)  # key path -> the value's node
    duplicates: list[Duplicate] = field(default_factory=list, repr=False)

    @classmethod
    def plain(cls, rel: str, value: Any) -> Document:
        return cls(file="", rel=rel, value=value, loaded=True)

    def pos(self, path: Iterable, *, key: bool = True) -> tuple[int, int]:
        """1-based line and column of the key at ``path`` (of its value with ``key=False``), or of
        the nearest enclosing node that exists; (0, 0) for a document without positions."""
        if not self.nodes:
            return 0, 0
        path = tuple(path)
        while True:
            if key and path in self.keys:
                line, column = self.keys[path]
                break
            if path in self.nodes:
                mark = self.nodes[path].start_mark
                line, column = mark.line, mark.column
                break
            if not path:
                return 1, 1
            path = path[:-1]
            key = True
        return line + 1, column + 1

    def scalar_text(self, path: tuple) -> str | None:
        """The text of the scalar at ``path`` as written (``00100`` where the value is 64)."""
        node = self.nodes.get(path)
        return node.value if isinstance(node, yaml.ScalarNode) else None

    def find_text(self, path: tuple, needle: str) -> tuple[int, int] | None:
        """Where ``needle`` occurs inside the scalar at ``path`` (a placeholder in a message)."""
        node = self.nodes.get(path)
        if node is None:
            return None
        for n in range(node.start_mark.line, min(node.end_mark.line + 1, len(self.lines))):
            col = self.lines[n].find(needle, node.start_mark.column if n == node.start_mark.line else 0)
            if col >= 0:
                return n + 1, col + 1
        return None


def read_text(text: str, file: str, rel: str, *, positions: bool = True) -> Document:
    """Compose and construct ``text``; on failure the document carries the problem. Without
    ``positions`` only the value is kept (and syntax errors still have theirs)."""
    doc = Document(file=file, rel=rel)
    doc.lines = text.splitlines()
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            doc.value = loader.construct_document(node)
            if positions:
                _index(doc, node, (), loader, set())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "not valid YAML"
        if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        doc.problem = ReadProblem(line, column, f"YAML syntax error: {problem}")
    except Exception as exc:  # noqa: BLE001 - whatever stops the parser is a problem to report, never a crash
        doc.problem = ReadProblem(1, 1, f"not valid YAML: {exc}")
    else:
        doc.loaded = True
    finally:
        loader.dispose()
    if not doc.loaded:
        doc.value, doc.keys, doc.nodes, doc.duplicates = None, {}, {}, []
    return doc


def read_file(path: Path, *, shown: str | None = None, rel: str | None = None, positions: bool = True) -> Document:
    """Read one YAML file. ``shown`` is how diagnostics name it (default: the path as given)."""
    path = Path(path)
    file, rel = shown if shown is not None else str(path), rel if rel is not None else path.name
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return Document(file=file, rel=rel, problem=ReadProblem(1, 1, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
    except OSError as exc:
        return Document(file=file, rel=rel, problem=ReadProblem(1, 1, f"cannot be read: {exc.strerror or exc}"))
    return read_text(text, file, rel, positions=positions)


def _key(node: yaml.Node, loader: Any) -> Any:
    if isinstance(node, yaml.ScalarNode):
        try:
            key = loader.construct_object(node)
            hash(key)
            return key
        except Exception:  # noqa: BLE001 - an unhashable or odd key is named by its text
            return node.value
    return f"<{'sequence' if isinstance(node, yaml.SequenceNode) else 'mapping'} key>"  # the node's id


def _index(doc: Document, node: yaml.Node, path: tuple, loader: Any, active: set[int]) -> None:
    """Record the node of every value and the mark of every key, and the duplicate keys."""
    doc.nodes[path] = node
    if id(node) in active:  # an alias that contains itself
        return
    if isinstance(node, yaml.MappingNode):
        active.add(id(node))
        seen: dict[str, yaml.Mark] = {}
        for knode, vnode in node.value:
            text = knode.value if isinstance(knode, yaml.ScalarNode) else None
            if text is not None and text != "<<":
                if text in seen:
                    earlier = seen[text]
                    doc.duplicates.append(
                        Duplicate(path + (text,), knode.start_mark.line + 1, knode.start_mark.column + 1, earlier.line + 1)
                    )
                seen[text] = knode.start_mark
            key = _key(knode, loader)
            doc.keys[path + (key,)] = (knode.start_mark.line, knode.start_mark.column)
            _index(doc, vnode, path + (key,), loader, active)
        active.discard(id(node))
    elif isinstance(node, yaml.SequenceNode):
        active.add(id(node))
        for i, item in enumerate(node.value):
            _index(doc, item, path + (i,), loader, active)
        active.discard(id(node))


class YAMLSyntaxError(yaml.YAMLError):
    """A file that is not valid YAML, with the parser's line and column (``problem`` is the
    parser's words, as PyYAML's own errors have them)."""

    def __init__(self, file: str, problem: ReadProblem) -> None:
        super().__init__(f"{file}:{problem.line}:{problem.column}: {problem.message}")
        self.file, self.line, self.column, self.problem = file, problem.line, problem.column, problem.message


def load_yaml(path: Path, *, shown: str | Path | None = None) -> Any:
    """The value of a YAML file, for readers that need no positions (rule-set test cases).
    Raises :class:`OSError` or :class:`UnicodeDecodeError` for a file that cannot be read as
    text, and :class:`YAMLSyntaxError` (file, line and column) for one that is not YAML, naming
    the file ``shown`` when given (a private copy's file by the one it was copied from)."""
    path = Path(path)
    doc = read_text(path.read_text(encoding="utf-8"), str(shown or path), path.name, positions=False)
    if doc.problem is not None:
        raise YAMLSyntaxError(doc.file, doc.problem)
    return doc.value
