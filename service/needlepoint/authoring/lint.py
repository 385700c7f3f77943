"""``needlepoint rules lint PATH``: static checks of a rule set before it ships.

Each finding has ``file:line:column``, a stable code and a severity. Errors fail the command
(exit 1). Warnings do not, unless ``--strict`` is given. Lint composes the YAML itself, so the
node marks give a line and column for every key and value, and it reports every problem at once
rather than only the loader's first. It then runs :func:`needlepoint.core.ruleset.build_ruleset`
as a safety net: a rule set that lints without errors also loads.

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
                 a parameter whose type does not fit the field it is compared with, or a
                 negated aggregate criterion (the engine would count it as positive).
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

Injectate and deferral rules cannot conflict with each other. The resolver lists every
deferral, and for each injectate category the most restrictive recommendation wins whatever
the order. Only modality depends on precedence, so NP009 looks only at modality rules.

This module also generates the JSON Schemas in ``rulesets/schema/``, from the same vocabulary
the loader uses. To regenerate them, run
``python -m needlepoint.authoring.lint --write-schemas rulesets/schema``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable

import click
import yaml

from needlepoint.core.conditions import FACT_FIELDS, OPERATORS, RESERVED_FIELDS, ORDERING_OPERATORS, FieldTest, ParamRef, Pattern, RuleSetError, parse_pattern
from needlepoint.core.record import FLAGS, INTENTS, SEXES, SIDES, TARGETS
from needlepoint.core.record import INJECTATE_CATEGORIES as INJECTATE_CODES
from needlepoint.core.ruleset import (
    CATEGORIES,
    CODE_SYSTEMS,
    DEFERRAL_REASONS,
    INJECTATE_CATEGORIES,
    MODALITIES,
    PREFIX_SYSTEMS,
    PROVENANCE_TAGS,
    RECOMMENDATIONS,
    SCOPES,
    SEVERITIES,
    STATUSES,
    UCUM_TEXT,
    UNIT_CONVERSIONS,
    build_ruleset,
    match_key,
)

# The loader's own patterns, so that lint and loader agree on what a rule id, version and
# message placeholder are.
from needlepoint.core.ruleset import _RULE_ID, _SEMVER, _TEMPLATE, TEMPLATE_FIELDS, parse_placeholder  # noqa: PLC2701

ERROR, WARNING = "error", "warning"

# libyaml when it is there (ten times faster); its nodes carry the same line and column marks.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# --- what the prepared facts look like (core/prepare.py), as far as lint relies on it ---------

# Closed vocabularies of string fields. Every road in (FHIR, protobuf, case files) validates
# them; an allergy without a recorded severity is prepared as "unknown".
VOCABULARIES: dict[tuple[str, str], tuple[str, ...]] = {
    ("patient", "sex"): SEXES,
    ("order", "target"): TARGETS,
    ("order", "side"): SIDES,
    ("order", "intent"): INTENTS,
    ("order", "requested_modality"): MODALITIES,
    ("prior_injection", "target"): TARGETS,
    ("allergy", "severity"): ("mild", "moderate", "severe", "unknown"),
    ("allergy", "criticality"): ("low", "high", "unable-to-assess"),
    ("flag", "name"): FLAGS,
}
_VOCABULARY_NAMES = {
    ("patient", "sex"): "patient sex",
    ("order", "target"): "injection target",
    ("order", "side"): "side",
    ("order", "intent"): "injection intent",
    ("order", "requested_modality"): "modality",
    ("prior_injection", "target"): "injection target",
    ("allergy", "severity"): "allergy severity",
    ("allergy", "criticality"): "allergy criticality",
    ("flag", "name"): "clinician flag",
}
# Fields every prepared fact of the kind carries, so ``exists: false`` never holds on them.
ALWAYS_SET = frozenset(
    {
        ("observation", "concept"),
        ("observation", "age_days"),
        ("allergy", "severity"),
        ("order", "intra_articular"),
        ("flag", "name"),
        ("prior_injection", "days_ago"),
        ("prior_injection", "same_target"),
        ("prior_injection", "same_side"),
        ("planned_surgery", "days_until"),
        ("planned_surgery", "ipsilateral"),
        ("data_issue", "kind"),
        ("data_issue", "concept"),
        ("data_issue", "detail"),
    }
)
# Fields no prepared fact carries. Coded fields become value-set tags, never fields. The order
# fact has no requested_modality: ruleset.yaml's requested_modality reads the order's codes.
NEVER_SET = frozenset({(kind, f) for kind, fields in FACT_FIELDS.items() for f, t in fields.items() if t == "codes"} | {("order", "requested_modality")})
# Kinds with exactly one fact per evaluation (and one observation per concept, the newest).
SINGLETON_KINDS = ("patient", "order", "summary")
INTEGER_FIELDS = frozenset({("patient", "age_years"), ("prior_injection", "days_ago"), ("planned_surgery", "days_until")})

_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM_REF = r"^\$[A-Za-z_][A-Za-z0-9_]*$"
_ALIAS = re.compile(r"^[a-z][a-z0-9_]*$")
_NONBLANK = {"type": "string", "minLength": 1, "pattern": r"\S"}

# --- code shapes ---------------------------------------------------------------------------------

# ICD-10-CM: a letter, two digits (the third may be A or B: C4A, M1A, Z3A), then up to four
# characters, with or without the dot EHRs often leave out (L03.115 and L03115 are the same code
# and match the same records; see core.ruleset.match_key). U is allowed as the first letter for
# U07.1 and U09.9. A trailing dot with nothing after it (M16.) is neither spelling.
CODE_PATTERNS: dict[str, str] = {
    "icd10cm": r"^[A-Z][0-9][0-9AB](\.?[0-9A-TV-Z]{1,4})?$",
    "loinc": r"^[0-9]{1,5}-[0-9]$",
    "rxnorm": r"^[1-9][0-9]*$",
    "atc": r"^[A-Z]([0-9]{2}([A-Z]([A-Z]([0-9]{2})?)?)?)?$",
    "snomed": r"^[1-9][0-9]{5,17}$",
    "cpt": r"^[0-9]{4}[0-9FTU]$",
    "np-obs": r"^[a-z0-9]+(-[a-z0-9]+)*$",
}
PREFIX_PATTERNS: dict[str, str] = {
    "icd10cm": r"^[A-Z]([0-9]([0-9AB](\.?[0-9A-TV-Z]{1,4})?)?)?$",
    "atc": CODE_PATTERNS["atc"],
}
CODE_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "np-target": TARGETS,
    "np-intent": INTENTS,
    "np-injectate": INJECTATE_CODES,
    "np-flag": FLAGS,
}
_CODE_SHAPES = {
    "icd10cm": "a letter, two characters and optionally 1-4 more, with or without the dot (M16.11 or M1611; prefixes may be shorter: M16, M25.55)",
    "loinc": "digits, a hyphen and a check digit (6301-6)",
    "rxnorm": "an RxCUI: digits only (855332)",
    "atc": "an ATC level: B, B01, B01A, B01AA or B01AA03",
    "snomed": "an SCTID: 6-18 digits, no leading zero (239872002)",
    "cpt": "four digits and a digit or F, T or U (77002, 0001U)",
    "np-obs": "lower-case words joined by hyphens",
}


def _verhoeff_tables() -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """The dihedral group D5 and the position permutations. The tables are computed rather than
    typed in, so a transcription slip cannot creep in: each permutation row is the one before
    composed with the first."""

    def d5(j: int, k: int) -> int:
        if j < 5:
            return (j + k) % 5 if k < 5 else 5 + (j + k) % 5
        return 5 + (j - k) % 5 if k < 5 else (j - k) % 5

    dihedral = tuple(tuple(d5(j, k) for k in range(10)) for j in range(10))
    perms = [tuple(range(10)), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4)]
    while len(perms) < 8:
        perms.append(tuple(perms[-1][perms[1][j]] for j in range(10)))
    return dihedral, tuple(perms)


_VERHOEFF_D, _VERHOEFF_P = _verhoeff_tables()


_ASCII_DIGITS = frozenset("0123456789")


def verhoeff_valid(digits: str) -> bool:
    """Does ``digits`` end in a correct Verhoeff check digit (the SNOMED CT SCTID check)?

    Only a non-empty string of ASCII digits can: anything else (``34552-0``, a LOINC-shaped code
    under the SNOMED system, a trailing newline, full-width digits, None) answers False and never
    raises. Real records carry such codes; a malformed code is a finding, not a crash.
    """
    if not isinstance(digits, str) or not digits or not _ASCII_DIGITS.issuperset(digits):
        return False
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][ord(ch) - 48]]
    return check == 0


def loinc_check_digit(number: str) -> int | None:
    """The LOINC mod-10 check digit of the part before the hyphen (the Luhn algorithm), or None
    when ``number`` is not a non-empty string of ASCII digits (it then has no check digit)."""
    if not isinstance(number, str) or not number or not _ASCII_DIGITS.issuperset(number):
        return None
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = (ord(ch) - 48) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10


def check_code(system: str, code: str, *, prefix: bool = False) -> tuple[str, str] | None:
    """Is ``code`` well-formed for ``system``? None, or (severity, what is wrong)."""
    if system in CODE_VOCABULARIES:
        allowed = CODE_VOCABULARIES[system]
        if code not in allowed:
            return ERROR, f"not {_a(system)} code{_suggest(code, allowed)}; known: {', '.join(allowed)}"
        return None
    pattern = (PREFIX_PATTERNS if prefix else CODE_PATTERNS).get(system)
    if pattern is None:
        return None
    if not re.fullmatch(pattern, code):
        return ERROR, f"not {_a(system)} {'prefix' if prefix else 'code'}: expected {_CODE_SHAPES[system]}"
    if system == "snomed":
        partition = code[-3:-1]
        if partition not in ("00", "10"):
            kind = {"01": "a description", "11": "a description", "02": "a relationship", "12": "a relationship"}.get(partition, "not a concept")
            return ERROR, f"partition identifier {partition} marks {kind} id; a value set lists concept ids (partition 00 or 10)"
        if not verhoeff_valid(code):
            return ERROR, "the Verhoeff check digit is wrong (a mistyped or truncated SCTID)"
    if system == "loinc":
        number, _, check = code.partition("-")
        expected = loinc_check_digit(number)
        if expected is None:  # (the pattern above already rules this out)
            return ERROR, f"not a loinc code: expected {_CODE_SHAPES['loinc']}"
        if check != str(expected):
            return WARNING, f"the mod-10 check digit should be {expected} ({number}-{expected}); verify the code"
    return None


# --- findings ------------------------------------------------------------------------------------


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


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _a(phrase: str) -> str:
    """The phrase with its indefinite article (by sound for the code-system names)."""
    an = phrase[:1].lower() in "aeiou" or phrase.split(" ")[0] in ("icd10cm", "rxnorm", "snomed", "np-target", "np-intent", "np-injectate", "np-flag", "np-obs")
    return f"{'an' if an else 'a'} {phrase}"


def _suggest(name: Any, choices: Iterable[Any]) -> str:
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if value == math.inf:
        return "∞"
    if value == -math.inf:
        return "-∞"
    return str(value)


# --- YAML with positions -------------------------------------------------------------------------


class _Doc:
    """One YAML file: its value, and the line and column of every key and value in it."""

    def __init__(self, path: Path, file: str, rel: str) -> None:
        self.path = path
        self.file = file  # as shown in findings
        self.rel = rel  # relative to the rule set directory, as the loader names it
        self.value: Any = None
        self.loaded = False
        self.lines: list[str] = []
        self.keys: dict[tuple, yaml.Mark] = {}
        self.nodes: dict[tuple, yaml.Node] = {}
        self.duplicates: list[tuple[tuple, yaml.Mark, yaml.Mark]] = []  # (path, this key, the earlier one)

    def load(self) -> tuple[int, int, str] | None:
        """Read and compose the file; on failure the line, column and problem."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            return 1, 1, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        except OSError as exc:
            return 1, 1, f"cannot be read: {exc.strerror or exc}"
        self.lines = text.splitlines()
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                self._find_duplicates(node, (), set())
                self.value = loader.construct_document(node)
                self._index(node, (), loader, set())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or "not valid YAML"
            if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
                problem += f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            return line, column, f"YAML syntax error: {problem}"
        except Exception as exc:  # noqa: BLE001 - whatever stops the parser is a finding, never a crash
            return 1, 1, f"not valid YAML: {exc}"
        finally:
            loader.dispose()
        self.loaded = True
        return None

    @staticmethod
    def _key(node: yaml.Node, loader: Any) -> Any:
        if isinstance(node, yaml.ScalarNode):
            try:
                key = loader.construct_object(node)
                hash(key)
                return key
            except Exception:  # noqa: BLE001
                return node.value
        return f"<{node.id} key>"

    def _find_duplicates(self, node: yaml.Node, path: tuple, active: set[int]) -> None:
        if id(node) in active:
            return
        active = active | {id(node)}
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Mark] = {}
            for knode, vnode in node.value:
                text = knode.value if isinstance(knode, yaml.ScalarNode) else None
                if text is not None and text != "<<":
                    if text in seen:
                        self.duplicates.append((path + (text,), knode.start_mark, seen[text]))
                    seen[text] = knode.start_mark
                self._find_duplicates(vnode, path + (text,), active)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._find_duplicates(item, path + (i,), active)

    def _index(self, node: yaml.Node, path: tuple, loader: Any, active: set[int]) -> None:
        self.nodes[path] = node
        if id(node) in active:
            return
        active = active | {id(node)}
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                key = self._key(knode, loader)
                self.keys[path + (key,)] = knode.start_mark
                self._index(vnode, path + (key,), loader, active)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,), loader, active)

    def pos(self, path: Iterable, *, key: bool = True) -> tuple[int, int]:
        """Line and column of the key at ``path`` (of its value with ``key=False``), or of the
        nearest enclosing node that exists."""
        path = tuple(path)
        while True:
            if key and path in self.keys:
                mark = self.keys[path]
                break
            if path in self.nodes:
                mark = self.nodes[path].start_mark
                break
            if not path:
                return 1, 1
            path = path[:-1]
            key = True
        return mark.line + 1, mark.column + 1

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


# --- intervals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Iv:
    """An interval of numbers; infinite ends are never inclusive."""

    lo: float = -math.inf
    lo_in: bool = False
    hi: float = math.inf
    hi_in: bool = False

    def __and__(self, other: "_Iv") -> "_Iv":
        if self.lo > other.lo or (self.lo == other.lo and not self.lo_in):
            lo, lo_in = self.lo, self.lo_in
        else:
            lo, lo_in = other.lo, other.lo_in
        if self.hi < other.hi or (self.hi == other.hi and not self.hi_in):
            hi, hi_in = self.hi, self.hi_in
        else:
            hi, hi_in = other.hi, other.hi_in
        return _Iv(lo, lo_in, hi, hi_in)

    def empty(self) -> bool:
        return self.lo > self.hi or (self.lo == self.hi and not (self.lo_in and self.hi_in))

    def has(self, x: float) -> bool:
        return (self.lo < x or (self.lo == x and self.lo_in)) and (x < self.hi or (x == self.hi and self.hi_in))

    def contains(self, other: "_Iv") -> bool:
        lo_ok = self.lo < other.lo or (self.lo == other.lo and (self.lo_in or not other.lo_in))
        hi_ok = self.hi > other.hi or (self.hi == other.hi and (self.hi_in or not other.hi_in))
        return lo_ok and hi_ok

    def two_sided(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def integers(self) -> "_Iv":
        """The same set of integers, with inclusive integer ends."""
        lo = self.lo if math.isinf(self.lo) else (math.ceil(self.lo) if self.lo_in else math.floor(self.lo) + 1)
        hi = self.hi if math.isinf(self.hi) else (math.floor(self.hi) if self.hi_in else math.ceil(self.hi) - 1)
        return _Iv(lo, not math.isinf(lo), hi, not math.isinf(hi))

    def __str__(self) -> str:
        if self.lo == self.hi and self.lo_in and self.hi_in:
            return f"{{{_fmt(self.lo)}}}"
        return f"{'[' if self.lo_in else '('}{_fmt(self.lo)}, {_fmt(self.hi)}{']' if self.hi_in else ')'}"


_UNKNOWN = object()


@dataclass
class _Numeric:
    """What the tests on one numeric field allow."""

    iv: _Iv
    points: set | None  # from eq / in, when given
    excluded: set
    lo_test: FieldTest | None = None
    hi_test: FieldTest | None = None

    def satisfiable(self, integer: bool) -> bool:
        iv = self.iv.integers() if integer else self.iv
        if iv.empty():
            return False
        if self.points is not None:
            return any(iv.has(p) and p not in self.excluded and (not integer or float(p).is_integer()) for p in self.points)
        if iv.lo == iv.hi:
            return iv.lo not in self.excluded
        return True


# --- the rule set as lint sees it --------------------------------------------------------------


@dataclass
class _Param:
    name: str
    value: Any
    allowed: tuple | None
    doc: _Doc
    path: tuple


@dataclass
class _ValueSet:
    id: str
    doc: _Doc
    path: tuple
    codes: dict[str, set[str]] = field(default_factory=dict)
    prefixes: dict[str, list[str]] = field(default_factory=dict)
    has_groups: bool = False

    def covers(self, system: str, code: str) -> bool:
        return code in self.codes.get(system, ()) or any(code.startswith(p) for p in self.prefixes.get(system, ()))


@dataclass
class _Concept:
    id: str
    doc: _Doc
    path: tuple
    unit: str | None
    plausible: tuple[float, float] | None


@dataclass
class _Aggregate:
    name: str
    doc: _Doc
    path: tuple
    mode: str  # "count" | "criteria"
    size: int  # number of criteria
    patterns: list["_Pat"] = field(default_factory=list)


@dataclass
class _Pat:
    """A parsed pattern and where it is written."""

    pattern: Pattern
    doc: _Doc
    path: tuple  # the pattern's node (alias value, criterion, or an aggregate's where)
    body: tuple  # the mapping of field tests
    owner: str  # rule id and alias, or aggregate name, for messages

    @property
    def kind(self) -> str:
        return self.pattern.kind

    @property
    def tests(self) -> tuple[FieldTest, ...]:
        return self.pattern.tests

    @property
    def negated(self) -> bool:
        return self.pattern.negated

    @property
    def alias(self) -> str:
        return self.pattern.alias

    def test_path(self, test: FieldTest | None) -> tuple:
        if test is None:
            return self.path
        p = self.body + (test.field, test.op)
        return p if p in self.doc.keys else self.body + (test.field,)


@dataclass
class _Rule:
    id: str
    doc: _Doc
    path: tuple
    precedence: int
    alts: list[list[_Pat]]
    preferred: str | None  # resolved
    acceptable: tuple[str, ...]
    avoid: tuple[str, ...]
    injectates: list[tuple[str, str]]
    deferral: dict | None
    caution: Any
    missing_data: Any

    @property
    def line(self) -> int:
        return self.doc.pos(self.path, key=False)[0]

    @property
    def where(self) -> str:
        return f"{self.doc.rel}:{self.line}"


_META_KEYS = ("id", "version", "title", "status", "validation", "description", "requested_modality", "modality_bound_injectates")
_PARAM_KEYS = ("value", "unit", "provenance", "source", "description", "allowed")
_VS_KEYS = ("title", "codes", "groups", "source", "note")
_OBS_KEYS = ("title", "codes", "unit", "units", "display_units", "plausible")
_AGG_KEYS = ("count", "where", "criteria", "distinct_groups_of", "description")
_RULE_KEYS = ("id", "version", "title", "category", "precedence", "exclusive", "when", "when_any", "then", "rationale", "evidence")
_THEN_KEYS = ("modality", "injectates", "deferral", "caution", "missing_data", "message")
_OUTCOMES = ("modality", "injectates", "deferral", "caution", "missing_data")
_KNOWN_FILES = ("ruleset.yaml", "parameters.yaml", "observations.yaml", "aggregates.yaml")


class _Linter:
    def __init__(self, root: Path, overlay: Path | None = None) -> None:
        self.root = Path(root)
        self.overlay_path = Path(overlay) if overlay is not None else None
        self.findings: list[Finding] = []
        self.docs: dict[str, _Doc] = {}
        self.meta: _Doc | None = None
        self.rule_docs: list[_Doc] = []
        self.vs_docs: list[_Doc] = []
        self.overlay: _Doc | None = None
        self.params: dict[str, _Param] = {}
        self.values: dict[str, Any] = {}  # parameter values in force (overlay applied)
        self.value_sets: dict[str, _ValueSet] = {}
        self.concepts: dict[str, _Concept] = {}
        self.aggregates: dict[str, _Aggregate] = {}
        self.rules: list[_Rule] = []
        self.rule_ids: dict[str, tuple[_Doc, tuple]] = {}
        self.rule_count = 0
        self.used_value_sets: set[str] = set()
        self.used_params: set[str] = set()

    # -- reporting --

    def add(self, code: str, severity: str, doc: _Doc, path: Iterable, message: str, *, key: bool = True) -> None:
        path = tuple(path)
        line, column = doc.pos(path, key=key)
        self.findings.append(Finding(code, severity, doc.file, line, column, message + self._key_path(doc, path)))

    def _key_path(self, doc: _Doc, path: tuple) -> str:
        """`` [when.plt.observation.value.lt]``: the key path, within the rule for a rules file."""
        if doc in self.rule_docs and path and isinstance(path[0], int):
            path = path[1:]
        elif len(path) < 2:
            return ""
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        return f" [{dotted}]" if dotted else ""

    def error(self, code: str, doc: _Doc, path: Iterable, message: str, *, key: bool = True) -> None:
        self.add(code, ERROR, doc, path, message, key=key)

    def warn(self, code: str, doc: _Doc, path: Iterable, message: str, *, key: bool = True) -> None:
        self.add(code, WARNING, doc, path, message, key=key)

    def has_errors(self) -> bool:
        return any(f.severity == ERROR for f in self.findings)

    # -- the run --

    def run(self) -> list[Finding]:
        if self._read():
            self.check_meta()
            for doc in self._optional("parameters"):
                self.check_parameters(doc)
            self.values = {name: p.value for name, p in self.params.items()}
            if self.overlay_path is not None:
                self.check_overlay()  # before anything compares with parameter values
            for doc in self.vs_docs:
                self.check_value_sets(doc)
            for doc in self._optional("observations"):
                self.check_observations(doc)
            for doc in self._optional("aggregates"):
                self.check_aggregates(doc)
            self.check_requested_modality()
            for doc in self.rule_docs:
                self.check_rules_file(doc)
            if self.rule_count == 0 and all(d.loaded for d in self.rule_docs) and self.meta is not None:
                self.error("NP001", self.meta, (), "the rule set has no rules: rules/*.yaml defines none")
            self.check_never_fire()
            self.check_bands()
            self.check_modality_conflicts()
            self.check_injectate_shadowing()
            self.check_hard_coded()
            self.check_unused()
            self.check_build()
        unique = {(f.file, f.line, f.column, f.code, f.message): f for f in self.findings}
        return sorted(unique.values(), key=Finding.sort_key)

    def _doc(self, rel: str) -> _Doc:
        doc = _Doc(self.root / rel, str(self.root / rel), rel)
        problem = doc.load()
        if problem is not None:
            line, column, message = problem
            self.findings.append(Finding("NP000", ERROR, doc.file, line, column, message))
        for path, mark, earlier in doc.duplicates:
            self.findings.append(
                Finding("NP015", ERROR, doc.file, mark.line + 1, mark.column + 1, f"duplicate key {path[-1]!r}: it is already given at line {earlier.line + 1}, and YAML keeps only the last one")
            )
        self.docs[rel] = doc
        return doc

    def _read(self) -> bool:
        root = self.root
        if root.is_file() and root.name == "ruleset.yaml":
            self.root = root = root.parent
        if not (root / "ruleset.yaml").is_file():
            self.findings.append(Finding("NP000", ERROR, str(root), 1, 1, "not a rule set: ruleset.yaml is missing"))
            return False
        self.meta = self._doc("ruleset.yaml")
        for name in ("parameters", "observations", "aggregates"):
            if (root / f"{name}.yaml").is_file():
                self._doc(f"{name}.yaml")
        self.vs_docs = [self._doc(f"valuesets/{p.name}") for p in sorted((root / "valuesets").glob("*.yaml"))]
        self.rule_docs = [self._doc(f"rules/{p.name}") for p in sorted((root / "rules").glob("*.yaml"))]
        for p in sorted(root.iterdir()):
            if p.is_file() and p.suffix in (".yaml", ".yml") and p.name not in _KNOWN_FILES:
                self.findings.append(Finding("NP001", WARNING, str(p), 1, 1, f"{p.name} is not a rule-set file ({', '.join(_KNOWN_FILES)}); the loader ignores it"))
        for sub in ("valuesets", "rules"):
            for p in sorted((root / sub).glob("*.yml")):
                self.findings.append(Finding("NP001", WARNING, str(p), 1, 1, f"only *.yaml files are read: {sub}/{p.name} is ignored; rename it to {p.stem}.yaml"))
        return True

    def _optional(self, name: str) -> list[_Doc]:
        doc = self.docs.get(f"{name}.yaml")
        return [doc] if doc is not None and doc.loaded else []

    # -- structure helpers --

    def mapping(self, doc: _Doc, path: tuple, value: Any, allowed: Iterable[str], required: Iterable[str], what: str) -> bool:
        """Is ``value`` a mapping? Reports unknown and missing keys."""
        if not isinstance(value, dict):
            self.error("NP002", doc, path, f"{what} must be a mapping; got {_describe(value)}", key=False)
            return False
        allowed = tuple(allowed)
        for k in value:
            if k not in allowed:
                self.error("NP001", doc, path + (k,), f"{what}: unknown key {k!r}{_suggest(k, allowed)}; allowed: {', '.join(allowed)}")
        for k in required:
            if k not in value:
                self.error("NP001", doc, path, f"{what}: missing required key {k!r}", key=False)
        return True

    def text(self, doc: _Doc, path: tuple, value: Any, what: str, code: str = "NP002") -> bool:
        if not isinstance(value, str) or not value.strip():
            self.error(code, doc, path, f"{what} must be non-empty text; got {_describe(value)}", key=False)
            return False
        return True

    def enum(self, doc: _Doc, path: tuple, value: Any, allowed: tuple, what: str) -> bool:
        if not isinstance(value, str) or value not in allowed:
            self.error("NP002", doc, path, f"{what}: {_describe(value)} is not one of {', '.join(allowed)}{_suggest(value, allowed)}", key=False)
            return False
        return True

    def param_ref(self, doc: _Doc, path: tuple, name: str, what: str) -> bool:
        if name not in self.params:
            self.error("NP004", doc, path, f"{what}: unknown parameter ${name}{_suggest(name, self.params)}", key=False)
            return False
        self.used_params.add(name)
        return True

    def value_set_ref(self, doc: _Doc, path: tuple, vs_id: Any, what: str) -> bool:
        if not isinstance(vs_id, str) or vs_id not in self.value_sets:
            self.error("NP003", doc, path, f"{what}: unknown value set {vs_id!r}{_suggest(vs_id, self.value_sets)}", key=False)
            return False
        self.used_value_sets.add(vs_id)
        return True

    # -- ruleset.yaml --

    def check_meta(self) -> None:
        doc = self.meta
        if doc is None or not doc.loaded:
            return
        meta = doc.value if doc.value is not None else {}
        if not self.mapping(doc, (), meta, _META_KEYS, ("id", "version", "title", "validation"), "ruleset.yaml"):
            return
        for key in ("id", "title", "validation"):
            if key in meta:
                self.text(doc, (key,), meta[key], f"ruleset.yaml {key}")
        if "description" in meta and not isinstance(meta["description"], str):
            self.error("NP002", doc, ("description",), f"ruleset.yaml description must be text; got {_describe(meta['description'])}", key=False)
        if "version" in meta and not (isinstance(meta["version"], str) and _SEMVER.match(meta["version"])):
            self.error("NP002", doc, ("version",), f"{_describe(meta['version'])} is not a semantic version (MAJOR.MINOR.PATCH; quote it)", key=False)
        if "status" in meta:
            self.enum(doc, ("status",), meta["status"], STATUSES, "ruleset.yaml status")
        requested = meta.get("requested_modality")
        if requested is not None and self.mapping(doc, ("requested_modality",), requested, MODALITIES, (), "requested_modality"):
            for modality, vs_id in requested.items():
                if not isinstance(vs_id, str):
                    self.error("NP002", doc, ("requested_modality", modality), f"requested_modality {modality}: a value set id; got {_describe(vs_id)}", key=False)
        bound = meta.get("modality_bound_injectates")
        if bound is not None and self.mapping(doc, ("modality_bound_injectates",), bound, INJECTATE_CATEGORIES, (), "modality_bound_injectates"):
            for category, modalities in bound.items():
                listed = [modalities] if isinstance(modalities, str) else modalities
                what = f"modality_bound_injectates {category}"
                if not isinstance(listed, list) or not listed:
                    self.error("NP002", doc, ("modality_bound_injectates", category), f"{what}: a modality or a non-empty list of modalities; got {_describe(modalities)}", key=False)
                    continue
                for i, modality in enumerate(listed):
                    self.enum(doc, ("modality_bound_injectates", category) + ((i,) if isinstance(modalities, list) else ()), modality, MODALITIES, what)

    def check_requested_modality(self) -> None:
        doc = self.meta
        if doc is None or not doc.loaded or not isinstance(doc.value, dict) or not isinstance(doc.value.get("requested_modality"), dict):
            return
        for modality, vs_id in doc.value["requested_modality"].items():
            if isinstance(vs_id, str):
                self.value_set_ref(doc, ("requested_modality", modality), vs_id, f"requested_modality {modality}")

    # -- parameters.yaml --

    def check_parameters(self, doc: _Doc) -> None:
        raw = doc.value if doc.value is not None else {}
        if not isinstance(raw, dict):
            self.error("NP002", doc, (), f"parameters.yaml is a mapping of parameter name to its definition; got {_describe(raw)}", key=False)
            return
        for name, spec in raw.items():
            path = (name,)
            what = f"parameter {name}"
            if not isinstance(name, str) or not _PARAM_NAME.match(name):
                self.error("NP002", doc, path, f"{what}: parameter names are identifiers (letters, digits, underscores), so that rules can write ${name}")
            if not self.mapping(doc, path, spec, _PARAM_KEYS, ("value", "provenance", "source", "description"), what):
                continue
            value = spec.get("value")
            if "value" in spec and not (isinstance(value, (str, bool)) or _number(value)):
                self.error("NP002", doc, path + ("value",), f"{what}: value must be a number, text or true/false; got {_describe(value)}", key=False)
            if "provenance" in spec:
                self.enum(doc, path + ("provenance",), spec["provenance"], PROVENANCE_TAGS, f"{what} provenance")
            for key in ("source", "description"):
                if key in spec:
                    self.text(doc, path + (key,), spec[key], f"{what} {key}")
            if spec.get("unit") is not None and not isinstance(spec["unit"], str):
                self.error("NP002", doc, path + ("unit",), f"{what}: unit must be text (UCUM); got {_describe(spec['unit'])}", key=False)
            allowed = spec.get("allowed")
            if "allowed" in spec:
                if not isinstance(allowed, list) or not allowed:
                    self.error("NP002", doc, path + ("allowed",), f"{what}: allowed is a non-empty list of values", key=False)
                    allowed = None
                elif "value" in spec and value not in allowed:
                    self.error("NP002", doc, path + ("value",), f"{what}: value {value!r} is not one of the allowed values {allowed}", key=False)
            if "value" in spec and isinstance(name, str):
                self.params[name] = _Param(name, value, tuple(allowed) if isinstance(allowed, list) else None, doc, path)

    # -- valuesets/*.yaml --

    def check_value_sets(self, doc: _Doc) -> None:
        if not doc.loaded:
            return
        raw = doc.value if doc.value is not None else {}
        if not isinstance(raw, dict):
            self.error("NP002", doc, (), f"a value-set file is a mapping of value set id to its definition; got {_describe(raw)}", key=False)
            return
        for vs_id, spec in raw.items():
            path = (vs_id,)
            what = f"value set {vs_id}"
            if vs_id in self.value_sets:
                other = self.value_sets[vs_id]
                self.error("NP015", doc, path, f"{what} is already defined at {other.doc.rel}:{other.doc.pos(other.path)[0]}")
                continue
            vs = _ValueSet(str(vs_id), doc, path)
            self.value_sets[vs_id] = vs
            if not self.mapping(doc, path, spec, _VS_KEYS, ("title",), what):
                continue
            if "title" in spec:
                self.text(doc, path + ("title",), spec["title"], f"{what} title")
            for key in ("source", "note"):
                if key in spec and not isinstance(spec[key], str):
                    self.error("NP002", doc, path + (key,), f"{what} {key} must be text; got {_describe(spec[key])}", key=False)
            if spec.get("codes") is not None:
                self._code_lists(doc, path + ("codes",), spec["codes"], vs, what)
            groups = spec.get("groups")
            if groups is not None:
                if not isinstance(groups, dict) or not groups:
                    self.error("NP002", doc, path + ("groups",), f"{what}: groups is a mapping of group name to code lists", key=False)
                else:
                    vs.has_groups = True
                    for gname, gspec in groups.items():
                        self._code_lists(doc, path + ("groups", gname), gspec or {}, vs, f"{what} group {gname}")
            if not any(vs.codes.values()) and not any(vs.prefixes.values()):
                self.error("NP002", doc, path, f"{what} has no codes")

    def _code_lists(self, doc: _Doc, path: tuple, spec: Any, vs: _ValueSet, what: str) -> None:
        if not isinstance(spec, dict):
            self.error("NP002", doc, path, f"{what}: codes are a mapping of code system to a list of codes; got {_describe(spec)}", key=False)
            return
        for system, entry in spec.items():
            spath = path + (system,)
            if system not in CODE_SYSTEMS:
                self.error("NP002", doc, spath, f"{what}: unknown code system {system!r}{_suggest(system, CODE_SYSTEMS)}; use one of {', '.join(CODE_SYSTEMS)}")
                continue
            lists: list[tuple[tuple, Any, bool]] = []
            if isinstance(entry, list):
                lists.append((spath, entry, False))
            elif isinstance(entry, dict):
                self.mapping(doc, spath, entry, ("codes", "prefixes"), (), f"{what} {system}")
                if "codes" in entry:
                    lists.append((spath + ("codes",), entry["codes"], False))
                if "prefixes" in entry:
                    if system not in PREFIX_SYSTEMS:
                        self.error("NP002", doc, spath + ("prefixes",), f"{what}: prefix matching is only meaningful for {', '.join(PREFIX_SYSTEMS)}, not {system}")
                    else:
                        lists.append((spath + ("prefixes",), entry["prefixes"], True))
            else:
                self.error("NP002", doc, spath, f"{what} {system}: a list of codes, or {{codes: [...], prefixes: [...]}}; got {_describe(entry)}", key=False)
                continue
            for lpath, items, prefix in lists:
                if not isinstance(items, list):
                    self.error("NP002", doc, lpath, f"{what} {system}: a list of codes; got {_describe(items)}", key=False)
                    continue
                for i, item in enumerate(items):
                    code = self.check_code_item(doc, lpath + (i,), item, system, prefix, what)
                    if code is not None:
                        code = match_key(system, code)  # as the loader keys it, so L03.115 covers L03115
                        (vs.prefixes.setdefault(system, []).append(code) if prefix else vs.codes.setdefault(system, set()).add(code))

    def check_code_item(self, doc: _Doc, path: tuple, raw: Any, system: str, prefix: bool, what: str) -> str | None:
        """Check one code in a list; the code as the loader reads it (``str(raw)``)."""
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            self.error("NP006", doc, path, f"{what}: a {system} code is text; got {_describe(raw)}", key=False)
            return None
        code = str(raw)
        node = doc.nodes.get(path)
        if not isinstance(raw, str) and isinstance(node, yaml.ScalarNode) and node.value != code:
            self.error("NP006", doc, path, f"{what}: {system} code {node.value} is read by YAML as the number {code}; quote it: '{node.value}'", key=False)
            return code
        problem = check_code(system, code, prefix=prefix)
        if problem is not None:
            severity, message = problem
            self.add("NP006", severity, doc, path, f"{what}: {system} {'prefix' if prefix else 'code'} {code!r}: {message}", key=False)
        return code

    # -- observations.yaml --

    def check_observations(self, doc: _Doc) -> None:
        raw = doc.value if doc.value is not None else {}
        if not isinstance(raw, dict):
            self.error("NP002", doc, (), f"observations.yaml is a mapping of concept id to its definition; got {_describe(raw)}", key=False)
            return
        claimed: dict[str, tuple[str, tuple]] = {}
        for cid, spec in raw.items():
            path = (cid,)
            what = f"observation concept {cid}"
            if not self.mapping(doc, path, spec, _OBS_KEYS, ("title", "codes"), what):
                self.concepts[cid] = _Concept(str(cid), doc, path, None, None)
                continue
            if "title" in spec:
                self.text(doc, path + ("title",), spec["title"], f"{what} title")
            codes = spec.get("codes")
            if "codes" in spec and (not isinstance(codes, list) or not codes):
                self.error("NP002", doc, path + ("codes",), f"{what}: codes is a non-empty list of system#code, e.g. [loinc#6301-6]", key=False)
            for i, item in enumerate(codes if isinstance(codes, list) else []):
                ipath = path + ("codes", i)
                if not isinstance(item, str) or "#" not in item:
                    self.error("NP006", doc, ipath, f"{what}: write each code as system#code, e.g. loinc#6301-6; got {_describe(item)}", key=False)
                    continue
                system, _, code = item.partition("#")
                if system not in CODE_SYSTEMS:
                    self.error("NP006", doc, ipath, f"{what}: unknown code system {system!r}{_suggest(system, CODE_SYSTEMS)}", key=False)
                    continue
                problem = check_code(system, code)
                if problem is not None:
                    self.add("NP006", problem[0], doc, ipath, f"{what}: {system} code {code!r}: {problem[1]}", key=False)
                if item in claimed:
                    other, opath = claimed[item]
                    self.error("NP015", doc, ipath, f"{what}: {item} already belongs to concept {other} (line {doc.pos(opath, key=False)[0]}); a code names one concept", key=False)
                else:
                    claimed[item] = (str(cid), ipath)
            unit = spec.get("unit")
            if unit is not None and not isinstance(unit, str):
                self.error("NP002", doc, path + ("unit",), f"{what}: unit must be text (UCUM); got {_describe(unit)}", key=False)
                unit = None
            units = self.unit_conversions(doc, path, spec, "units", unit, what)
            display_units = self.unit_conversions(doc, path, spec, "display_units", unit, what)
            for u in units or {}:
                if isinstance(u, str) and not UCUM_TEXT.fullmatch(u):
                    self.error("NP002", doc, path + ("units", u), f"{what}: {u!r} is not a UCUM code (those are ASCII without spaces); list it under display_units")
            for u, conv in (display_units or {}).items():
                if not isinstance(u, str):
                    continue
                if u != u.strip():
                    self.error("NP002", doc, path + ("display_units", u), f"{what}: display unit {u!r}: display text is matched with surrounding spaces removed, so write it without them")
                if units and u in units:
                    if units[u] != conv:
                        self.error("NP002", doc, path + ("display_units", u), f"{what}: display unit {u!r} is also a UCUM code of this concept converting by {units[u]!r}; one text cannot mean two things")
                    else:
                        self.warn("NP015", doc, path + ("display_units", u), f"{what}: display unit {u!r} is already accepted as a UCUM code written as text; drop it here")
            if display_units and unit is None:
                self.error("NP002", doc, path + ("display_units",), f"{what}: display units without a canonical unit; without unit: the concept is read as coded and numeric values are set aside")
            if unit is not None:
                if not units or unit not in units:
                    self.error("NP002", doc, path + ("unit",), f"{what}: the canonical unit {unit!r} is not among the accepted units, so every value in it would be set aside as unit-unknown", key=False)
                elif units[unit] != 1:
                    self.error("NP002", doc, path + ("units", unit), f"{what}: the canonical unit {unit!r} must convert with factor 1; got {_describe(units[unit])}", key=False)
            elif units:
                self.error("NP002", doc, path + ("units",), f"{what}: accepted units without a canonical unit; without unit: the concept is read as coded and numeric values are set aside")
            plausible = spec.get("plausible")
            pl: tuple[float, float] | None = None
            if plausible is not None:
                if isinstance(plausible, list) and len(plausible) == 2 and all(_number(x) for x in plausible) and plausible[0] < plausible[1]:
                    pl = (plausible[0], plausible[1])
                else:
                    self.error("NP002", doc, path + ("plausible",), f"{what}: plausible is [low, high] with low < high, in the canonical unit; got {plausible!r}", key=False)
            self.concepts[cid] = _Concept(str(cid), doc, path, unit, pl)

    def unit_conversions(self, doc: _Doc, path: tuple, spec: dict, key: str, unit: str | None, what: str) -> dict | None:
        """A concept's ``units`` or ``display_units``: a mapping of unit text to a positive factor
        or a named conversion. Reports what is wrong; returns the mapping, or None if it is not one."""
        conversions = spec.get(key)
        if conversions is None:
            return None
        if not isinstance(conversions, dict):
            self.error("NP002", doc, path + (key,), f"{what}: {key} is a mapping of accepted unit to a factor or a named conversion", key=False)
            return None
        for u, conv in conversions.items():
            if not isinstance(u, str) or not u:
                self.error("NP002", doc, path + (key, u), f"{what}: a unit in {key} is non-empty text; got {_describe(u)}")
            if isinstance(conv, str):
                if conv not in UNIT_CONVERSIONS:
                    self.error("NP002", doc, path + (key, u), f"{what}: unknown conversion {conv!r}{_suggest(conv, UNIT_CONVERSIONS)}; known: {', '.join(UNIT_CONVERSIONS)}", key=False)
            elif not _number(conv) or not 0 < conv < math.inf:
                self.error("NP002", doc, path + (key, u), f"{what}: unit {u}: a positive factor to {unit or 'the canonical unit'} or a named conversion; got {_describe(conv)}", key=False)
        return conversions

    # -- aggregates.yaml --

    def check_aggregates(self, doc: _Doc) -> None:
        raw = doc.value if doc.value is not None else {}
        if not isinstance(raw, dict):
            self.error("NP002", doc, (), f"aggregates.yaml is a mapping of summary field name to its definition; got {_describe(raw)}", key=False)
            return
        for name, spec in raw.items():
            path = (name,)
            what = f"aggregate {name}"
            if not isinstance(name, str) or not _ALIAS.match(name):
                self.error("NP002", doc, path, f"{what}: summary field names are lower-case identifiers")
            elif name in RESERVED_FIELDS:
                self.error("NP002", doc, path, f"{what}: {name!r} is reserved by the engine ({', '.join(RESERVED_FIELDS)}); choose another name")
            agg = _Aggregate(str(name), doc, path, "count", 0)
            self.aggregates[name] = agg
            if not self.mapping(doc, path, spec, _AGG_KEYS, ("description",), what):
                continue
            if "description" in spec:
                self.text(doc, path + ("description",), spec["description"], f"{what} description")
            if ("count" in spec) == ("criteria" in spec):
                self.error("NP001", doc, path, f"{what} has exactly one of count (with where) or criteria")
                continue
            if "count" in spec:
                kind = spec["count"]
                if not isinstance(kind, str) or kind not in FACT_FIELDS or kind == "summary":
                    kinds = [k for k in FACT_FIELDS if k != "summary"]
                    self.error("NP005", doc, path + ("count",), f"{what}: unknown fact kind {kind!r}{_suggest(kind, kinds)}; count one of {', '.join(kinds)}", key=False)
                    continue
                where = spec.get("where")
                if self.check_body(doc, path + ("where",), kind, where, set(), what):
                    pat = self._parse(doc, path + ("where",), path + ("where",), name, {kind: where or {}}, set(), what)
                    if pat is not None:
                        agg.patterns.append(pat)
            else:
                if "where" in spec:
                    self.error("NP001", doc, path + ("where",), f"{what}: where goes with count; criteria are whole patterns")
                criteria = spec["criteria"]
                if not isinstance(criteria, list) or not criteria:
                    self.error("NP002", doc, path + ("criteria",), f"{what}: criteria is a non-empty list of patterns", key=False)
                    continue
                agg.mode, agg.size = "criteria", len(criteria)
                for i, criterion in enumerate(criteria):
                    cpath = path + ("criteria", i)
                    if isinstance(criterion, dict) and "not" in criterion:
                        self.error("NP002", doc, cpath + ("not",), f"{what}: criterion {i} is negated, but aggregates count facts that match their criteria, so the negation would be ignored")
                        continue
                    pat = self.check_pattern(doc, cpath, criterion, f"{name}_{i}", set(), f"{what} criterion {i}")
                    if pat is not None:
                        agg.patterns.append(pat)
            groups_of = spec.get("distinct_groups_of")
            if groups_of is not None:
                gpath = path + ("distinct_groups_of",)
                if "criteria" in spec:
                    self.error("NP001", doc, gpath, f"{what}: distinct_groups_of goes with count")
                elif self.value_set_ref(doc, gpath, groups_of, what) and not self.value_sets[groups_of].has_groups:
                    self.error("NP002", doc, gpath, f"{what}: value set {groups_of!r} has no groups to count", key=False)

    # -- site overlay --

    def check_overlay(self) -> None:
        path = self.overlay_path
        doc = _Doc(path, str(path), path.name)
        problem = doc.load()
        self.overlay = doc
        if problem is not None:
            self.findings.append(Finding("NP000", ERROR, doc.file, *problem))
            return
        for dpath, mark, earlier in doc.duplicates:
            self.findings.append(Finding("NP015", ERROR, doc.file, mark.line + 1, mark.column + 1, f"duplicate key {dpath[-1]!r}: already given at line {earlier.line + 1}"))
        raw = doc.value if doc.value is not None else {}
        if not self.mapping(doc, (), raw, ("site", "parameters"), (), "a site overlay"):
            return
        if "site" in raw:
            self.text(doc, ("site",), raw["site"], "overlay site")
        params = raw.get("parameters")
        if params is None:
            return
        if not isinstance(params, dict):
            self.error("NP002", doc, ("parameters",), f"overlay parameters is a mapping of parameter name to value; got {_describe(params)}", key=False)
            return
        for name, value in params.items():
            ppath = ("parameters", name)
            if name not in self.params:
                self.error("NP014", doc, ppath, f"the overlay sets unknown parameter {name!r}{_suggest(name, self.params)}")
                continue
            param = self.params[name]
            default = param.value
            same_type = (_number(default) and _number(value)) or (type(value) is type(default))
            if not same_type:
                self.error("NP014", doc, ppath, f"parameter {name}: expected {'a number' if _number(default) else type(default).__name__} like {default!r}; got {_describe(value)}", key=False)
            elif param.allowed is not None and value not in param.allowed:
                self.error("NP014", doc, ppath, f"parameter {name}: {value!r} is not one of the allowed values {list(param.allowed)}", key=False)
            else:
                self.values[name] = value

    # -- patterns --

    def check_pattern(self, doc: _Doc, path: tuple, raw: Any, alias: str, summary_fields: set[str], what: str) -> _Pat | None:
        """Check a pattern (``{kind: {field: test}}`` or ``{not: ...}``) and parse it."""
        inner, ipath = raw, path
        if isinstance(raw, dict) and "not" in raw:
            if len(raw) != 1:
                other = next(k for k in raw if k != "not")
                self.error("NP001", doc, path + (other,), f"{what}: `not:` negates one pattern and stands alone; give {other!r} its own alias")
                return None
            inner, ipath = raw["not"], path + ("not",)
        if not isinstance(inner, dict) or len(inner) != 1:
            if isinstance(inner, dict) and len(inner) > 1:
                second = list(inner)[1]
                self.error("NP001", doc, ipath + (second,), f"{what}: a pattern tests one fact kind, but this one names {', '.join(map(str, inner))}; give each its own alias")
            else:
                self.error("NP002", doc, ipath, f"{what}: a pattern is one fact kind mapped to its field tests, e.g. {{observation: {{concept: inr}}}}; got {_describe(inner)}", key=False)
            return None
        ((kind, body),) = inner.items()
        if kind not in FACT_FIELDS:
            self.error("NP005", doc, ipath + (kind,), f"{what}: unknown fact kind {kind!r}{_suggest(kind, FACT_FIELDS)}; known: {', '.join(FACT_FIELDS)}")
            return None
        if not self.check_body(doc, ipath + (kind,), kind, body, summary_fields, what):
            return None
        return self._parse(doc, path, ipath + (kind,), alias, raw, summary_fields, what)

    def _parse(self, doc: _Doc, path: tuple, body: tuple, alias: str, raw: Any, summary_fields: set[str], what: str) -> _Pat | None:
        try:
            pattern = parse_pattern(alias, raw, "", summary_fields)
        except RuleSetError as exc:  # the checks above missed what the loader refuses: report it there
            self.error("NP002", doc, path + _where_tokens(exc.where), f"{what}: {exc.message}")
            return None
        return _Pat(pattern, doc, path, body, what)

    def check_body(self, doc: _Doc, bpath: tuple, kind: str, body: Any, summary_fields: set[str], what: str) -> bool:
        if body is None:
            return True
        if not isinstance(body, dict):
            self.error("NP002", doc, bpath, f"{what}: the field tests of {kind} are a mapping of field to test; got {_describe(body)}", key=False)
            return False
        fields = {name: "number" for name in summary_fields} if kind == "summary" else FACT_FIELDS[kind]
        ok = True
        for fld, spec in body.items():
            fpath = bpath + (fld,)
            if fld not in fields:
                if kind == "summary":
                    known = ", ".join(sorted(fields)) or "none"
                    self.error("NP005", doc, fpath, f"{what}: no aggregate named {fld!r}{_suggest(fld, fields)}; summary fields (aggregates.yaml): {known}")
                else:
                    self.error("NP005", doc, fpath, f"{what}: {kind} has no field {fld!r}{_suggest(fld, fields)}; fields: {', '.join(sorted(fields))}")
                ok = False
                continue
            ok = self.check_field(doc, fpath, kind, fld, fields[fld], spec, what) and ok
        return ok

    def check_field(self, doc: _Doc, fpath: tuple, kind: str, fld: str, ftype: str, spec: Any, what: str) -> bool:
        name = f"{kind}.{fld}"
        shorthand = not isinstance(spec, dict)
        if not shorthand and not spec:
            self.error("NP002", doc, fpath, f"{what}: {name} has no test; write {{operator: value}} with one of {', '.join(OPERATORS)}")
            return False
        ok = True
        for op, raw in ({"eq": spec} if shorthand else spec).items():
            opath = fpath if shorthand else fpath + (op,)
            if op not in OPERATORS:
                self.error("NP001", doc, opath, f"{what}: unknown operator {op!r}{_suggest(op, OPERATORS)}; use one of {', '.join(OPERATORS)}")
                ok = False
                continue
            if op == "exists":
                if not isinstance(raw, bool):
                    self.error("NP002", doc, opath, f"{what}: exists takes true or false; got {_describe(raw)}", key=False)
                    ok = False
                continue
            if ftype == "codes":
                if op != "in" or not isinstance(raw, str):
                    self.error("NP002", doc, opath, f"{what}: {name} is coded and is tested by value-set membership only: {{in: value-set-id}}")
                    ok = False
                elif not self.value_set_ref(doc, opath, raw, what):
                    ok = False
                continue
            if op == "in":
                if not isinstance(raw, list) or not raw:
                    self.error("NP002", doc, opath, f"{what}: in takes a non-empty list of values; got {_describe(raw)}", key=False)
                    ok = False
                    continue
                for i, item in enumerate(raw):
                    if isinstance(item, str) and item.startswith("$"):
                        self.error("NP002", doc, opath + (i,), f"{what}: parameters are not expanded inside in: lists; {item} would be compared as text", key=False)
                        ok = False
                    elif not _fits(ftype, item):
                        self.error("NP002", doc, opath + (i,), f"{what}: {name} is a {ftype}; got {_describe(item)}", key=False)
                        ok = False
                    else:
                        ok = self._check_term(doc, opath + (i,), kind, fld, item, what) and ok
                continue
            if op in ORDERING_OPERATORS and ftype != "number":
                self.error("NP002", doc, opath, f"{what}: {op} compares numbers, but {name} is a {ftype}")
                ok = False
                continue
            if isinstance(raw, str) and raw.startswith("$"):
                pname = raw[1:]
                if not self.param_ref(doc, opath, pname, what):
                    ok = False
                    continue
                value = self.values.get(pname)
                if not _fits(ftype, value):
                    self.error("NP002", doc, opath, f"{what}: ${pname} is {_describe(value)}, but {name} is a {ftype}", key=False)
                    ok = False
                elif op == "eq":
                    ok = self._check_term(doc, opath, kind, fld, value, what, param=pname) and ok
                continue
            if not _fits(ftype, raw):
                self.error("NP002", doc, opath, f"{what}: {name} is a {ftype}; got {_describe(raw)}", key=False)
                ok = False
            elif op == "eq":
                ok = self._check_term(doc, opath, kind, fld, raw, what) and ok
        return ok

    def _check_term(self, doc: _Doc, path: tuple, kind: str, fld: str, value: Any, what: str, param: str | None = None) -> bool:
        """A string a fact is compared with: an observation concept, or a vocabulary term."""
        shown = f"${param} = {value!r}" if param else repr(value)
        if (kind, fld) == ("observation", "concept"):
            if value not in self.concepts:
                self.error("NP005", doc, path, f"{what}: unknown observation concept {shown}{_suggest(value, self.concepts)}; observations.yaml defines {', '.join(self.concepts) or 'none'}", key=False)
                return False
            return True
        vocabulary = VOCABULARIES.get((kind, fld))
        if vocabulary is not None and value not in vocabulary:
            self.error("NP007", doc, path, f"{what}: {shown} is not {_a(_VOCABULARY_NAMES[(kind, fld)])} ({', '.join(vocabulary)}){_suggest(value, vocabulary)}, so it can never match", key=False)
        return True

    # -- rules/*.yaml --

    def check_rules_file(self, doc: _Doc) -> None:
        if not doc.loaded:
            return
        content = doc.value if doc.value is not None else []
        if not isinstance(content, list):
            self.error("NP002", doc, (), f"a rules file is a list of rules (each item starts with '- id:'); got {_describe(content)}", key=False)
            return
        for i, raw in enumerate(content):
            self.check_rule(doc, (i,), raw)

    def check_rule(self, doc: _Doc, path: tuple, raw: Any) -> None:
        if not isinstance(raw, dict):
            self.error("NP002", doc, path, f"a rule is a mapping with id, version, title, category, when, then, rationale and evidence; got {_describe(raw)}", key=False)
            return
        self.rule_count += 1
        rid = raw.get("id") if isinstance(raw.get("id"), str) else None
        what = rid or f"the rule at line {doc.pos(path, key=False)[0]}"
        self.mapping(doc, path, raw, _RULE_KEYS, ("id", "version", "title", "category", "then"), what)
        valid = True
        if "id" in raw:
            if not isinstance(raw["id"], str) or not _RULE_ID.match(raw["id"]):
                self.error("NP002", doc, path + ("id",), f"{_describe(raw['id'])}: rule ids are upper-case words joined by hyphens, e.g. DEF-INR-HIGH", key=False)
            elif rid in self.rule_ids:
                odoc, opath = self.rule_ids[rid]
                self.error("NP015", doc, path + ("id",), f"rule {rid} is already defined at {odoc.rel}:{odoc.pos(opath, key=False)[0]}", key=False)
            else:
                self.rule_ids[rid] = (doc, path)
        if "version" in raw and not (isinstance(raw["version"], str) and _SEMVER.match(raw["version"])):
            self.error("NP002", doc, path + ("version",), f"{what}: {_describe(raw['version'])} is not a semantic version (MAJOR.MINOR.PATCH; quote it)", key=False)
        if "title" in raw:
            self.text(doc, path + ("title",), raw["title"], f"{what} title")
        if "category" in raw:
            self.enum(doc, path + ("category",), raw["category"], CATEGORIES, f"{what} category")
        precedence = raw.get("precedence", 0)
        if isinstance(precedence, bool) or not isinstance(precedence, int):
            self.error("NP002", doc, path + ("precedence",), f"{what}: precedence is a whole number (higher wins); got {_describe(precedence)}", key=False)
            precedence, valid = 0, False
        if "exclusive" in raw and not isinstance(raw["exclusive"], bool):
            self.error("NP002", doc, path + ("exclusive",), f"{what}: exclusive is true or false; got {_describe(raw['exclusive'])}", key=False)
        self.check_rationale(doc, path, raw, what)
        alts = self.check_conditions(doc, path, raw, what)
        outcome = self.check_then(doc, path + ("then",), raw.get("then"), what) if "then" in raw else None
        if isinstance(raw.get("then"), dict):
            self.check_templates(doc, path + ("then",), raw["then"], alts, what)
        if rid and alts is not None and outcome is not None and valid:
            self.rules.append(_Rule(rid, doc, path, precedence, alts, **outcome))

    def check_rationale(self, doc: _Doc, path: tuple, raw: dict, what: str) -> None:
        if "rationale" not in raw:
            self.error("NP011", doc, path, f"{what} has no rationale: say why the rule exists (every explanation shows it)", key=False)
        elif isinstance(raw["rationale"], str) and not raw["rationale"].strip() or raw["rationale"] is None:
            self.error("NP011", doc, path + ("rationale",), f"{what}: the rationale is empty")
        elif not isinstance(raw["rationale"], str):
            self.error("NP002", doc, path + ("rationale",), f"{what}: rationale must be text; got {_describe(raw['rationale'])}", key=False)
        evidence = raw.get("evidence")
        if evidence is None or evidence == []:
            self.error("NP011", doc, path + ("evidence",) if "evidence" in raw else path, f"{what} cites no evidence: add evidence: [{{citation: ..., strength: ...}}] (a local convention is cited as such)", key="evidence" in raw)
            return
        if not isinstance(evidence, list):
            self.error("NP002", doc, path + ("evidence",), f"{what}: evidence is a list of {{citation, strength}}; got {_describe(evidence)}", key=False)
            return
        for i, item in enumerate(evidence):
            epath = path + ("evidence", i)
            if not self.mapping(doc, epath, item, ("citation", "strength"), ("strength",), f"{what} evidence[{i}]"):
                continue
            citation = item.get("citation")
            if not isinstance(citation, str) or not citation.strip():
                self.error("NP011", doc, epath + ("citation",) if "citation" in item else epath, f"{what} evidence[{i}] has no citation", key="citation" in item)
            if "strength" in item:
                self.text(doc, epath + ("strength",), item["strength"], f"{what} evidence[{i}] strength")

    def check_conditions(self, doc: _Doc, path: tuple, raw: dict, what: str) -> list[list[_Pat]] | None:
        """The alternatives of a rule, parsed; None when any pattern is broken."""
        if ("when" in raw) == ("when_any" in raw):
            if "when" in raw:
                self.error("NP001", doc, path + ("when_any",), f"{what}: a rule has when (all patterns) or when_any (alternatives), not both")
            else:
                self.error("NP001", doc, path, f"{what}: missing when (all patterns) or when_any (a list of alternatives)", key=False)
            return None
        if "when" in raw:
            blocks = [(path + ("when",), raw["when"])]
        else:
            items = raw["when_any"]
            if not isinstance(items, list) or not items:
                self.error("NP002", doc, path + ("when_any",), f"{what}: when_any is a non-empty list of alternatives; got {_describe(items)}", key=False)
                return None
            blocks = [(path + ("when_any", i), block) for i, block in enumerate(items)]
        alts: list[list[_Pat]] | None = []
        for bpath, block in blocks:
            if not isinstance(block, dict) or not block:
                self.error("NP002", doc, bpath, f"{what}: a mapping of alias to pattern, e.g. {{inr: {{observation: {{concept: inr}}}}}}; got {_describe(block)}", key=False)
                alts = None
                continue
            pats: list[_Pat] | None = []
            for alias, spec in block.items():
                if not isinstance(alias, str) or not _ALIAS.match(alias):
                    self.error("NP002", doc, bpath + (alias,), f"{what}: aliases are lower-case identifiers; got {alias!r}")
                    pats = None
                    continue
                pat = self.check_pattern(doc, bpath + (alias,), spec, alias, set(self.aggregates), f"{what} {alias}")
                if pat is None:
                    pats = None
                elif pats is not None:
                    pats.append(pat)
            if pats is None:
                alts = None
                continue
            if all(p.negated for p in pats):
                self.error("NP002", doc, bpath, f"{what}: an alternative needs at least one positive pattern (one that is not `not:`)", key=False)
                alts = None
            elif alts is not None:
                alts.append(pats)
        return alts

    def check_then(self, doc: _Doc, tpath: tuple, then: Any, what: str) -> dict | None:
        if not self.mapping(doc, tpath, then, _THEN_KEYS, ("message",), f"{what} then"):
            return None
        ok = True
        if not any(then.get(k) for k in _OUTCOMES):
            self.error("NP001", doc, tpath, f"{what}: then needs at least one of {', '.join(_OUTCOMES)}")
            ok = False
        preferred, acceptable, avoid = None, (), ()
        modality = then.get("modality")
        if modality is not None and self.mapping(doc, tpath + ("modality",), modality, ("preferred", "acceptable", "avoid"), (), f"{what} modality"):
            mpath = tpath + ("modality",)
            pref = modality.get("preferred")
            if isinstance(pref, str) and pref.startswith("$"):
                pname = pref[1:]
                if not self.param_ref(doc, mpath + ("preferred",), pname, f"{what} modality.preferred"):
                    ok = False
                else:
                    preferred = self.values.get(pname)
                    param = self.params[pname]
                    bad = [v for v in (param.allowed or (preferred,)) if v not in MODALITIES]
                    if bad:
                        self.error("NP002", doc, mpath + ("preferred",), f"{what}: {pref} can be {bad[0]!r}, which is not a modality ({', '.join(MODALITIES)}); give the parameter allowed: [...] modalities", key=False)
                        ok = False
            elif pref is not None:
                if self.enum(doc, mpath + ("preferred",), pref, MODALITIES, f"{what} modality.preferred"):
                    preferred = pref
                else:
                    ok = False
            lists = {}
            for key in ("acceptable", "avoid"):
                items = modality.get(key, [])
                if not isinstance(items, list):
                    self.error("NP002", doc, mpath + (key,), f"{what}: modality.{key} is a list of modalities; got {_describe(items)}", key=False)
                    ok, items = False, []
                for i, m in enumerate(items):
                    ok = self.enum(doc, mpath + (key, i), m, MODALITIES, f"{what} modality.{key}") and ok
                lists[key] = tuple(m for m in items if m in MODALITIES)
            acceptable, avoid = lists["acceptable"], lists["avoid"]
            if preferred is not None and preferred in avoid:
                self.error("NP002", doc, mpath + ("avoid",), f"{what}: prefers {preferred} and avoids it too")
                ok = False
        elif modality is not None:
            ok = False
        injectates: list[tuple[str, str]] = []
        items = then.get("injectates")
        if items is not None:
            if not isinstance(items, list):
                self.error("NP002", doc, tpath + ("injectates",), f"{what}: injectates is a list of {{category, recommendation}}; got {_describe(items)}", key=False)
                ok, items = False, []
            seen: set[str] = set()
            for i, inj in enumerate(items):
                ipath = tpath + ("injectates", i)
                if not self.mapping(doc, ipath, inj, ("category", "recommendation"), ("category", "recommendation"), f"{what} injectates[{i}]"):
                    ok = False
                    continue
                good = "category" in inj and self.enum(doc, ipath + ("category",), inj["category"], INJECTATE_CATEGORIES, f"{what} injectates[{i}] category")
                good = "recommendation" in inj and self.enum(doc, ipath + ("recommendation",), inj["recommendation"], RECOMMENDATIONS, f"{what} injectates[{i}] recommendation") and good
                if good and inj["category"] in seen:
                    self.error("NP015", doc, ipath + ("category",), f"{what}: {inj['category']} is recommended twice in one outcome", key=False)
                if good:
                    seen.add(inj["category"])
                    injectates.append((inj["category"], inj["recommendation"]))
                ok = ok and good
        deferral = then.get("deferral")
        if deferral is not None:
            dpath = tpath + ("deferral",)
            if self.mapping(doc, dpath, deferral, ("reason", "severity", "scope"), ("reason", "severity"), f"{what} deferral"):
                good = "reason" in deferral and self.enum(doc, dpath + ("reason",), deferral["reason"], DEFERRAL_REASONS, f"{what} deferral reason")
                good = "severity" in deferral and self.enum(doc, dpath + ("severity",), deferral["severity"], SEVERITIES, f"{what} deferral severity") and good
                if "scope" in deferral:
                    good = self.enum(doc, dpath + ("scope",), deferral["scope"], SCOPES, f"{what} deferral scope") and good
                ok = ok and good
            else:
                ok = False
        for key in ("caution", "missing_data", "message"):
            if key in then and not self.text(doc, tpath + (key,), then[key], f"{what} then.{key}"):
                ok = False
        if not ok:
            return None
        return {"preferred": preferred, "acceptable": acceptable, "avoid": avoid, "injectates": injectates, "deferral": deferral, "caution": then.get("caution"), "missing_data": then.get("missing_data")}

    def check_templates(self, doc: _Doc, tpath: tuple, then: dict, alts: list[list[_Pat]] | None, what: str) -> None:
        for key in ("message", "missing_data"):
            text = then.get(key)
            if not isinstance(text, str):
                continue
            kpath = tpath + (key,)
            for ref in _TEMPLATE.findall(text):
                at = doc.find_text(kpath, "{" + ref + "}") or doc.pos(kpath, key=False)
                placeholder = parse_placeholder(ref)
                if placeholder is None:
                    self._add_at("NP005", doc, kpath, at, f"{what} then.{key}: {{{ref}}} is not a placeholder: {{alias}}, {{alias.field}}, {{alias.when+$param}}, {{$param}} or {{$param.since}}")
                    continue
                if placeholder.param is not None:
                    if placeholder.param in self.params:
                        self.used_params.add(placeholder.param)
                    else:
                        self._add_at("NP004", doc, kpath, at, f"{what} then.{key}: {{{ref}}} names no parameter{_suggest(placeholder.param, self.params)}")
                    if placeholder.alias is None:
                        continue
                if alts is None:
                    continue
                alias, fld = placeholder.alias, placeholder.field
                bound = [{p.alias: p for p in alt if not p.negated} for alt in alts]
                having = [i for i, b in enumerate(bound) if alias in b]
                if not having:
                    known = sorted({a for b in bound for a in b})
                    self._add_at("NP005", doc, kpath, at, f"{what} then.{key}: {{{ref}}} names no matched fact; the aliases are {', '.join(known)}{_suggest(alias, known)}")
                    continue
                if len(having) < len(alts):
                    missing = next(i for i in range(len(alts)) if i not in having)
                    self._add_at("NP005", doc, kpath, at, f"{what} then.{key}: {{{ref}}} names {alias!r}, which alternative {missing} does not match; every alternative must bind it")
                    continue
                for kind in dict.fromkeys(bound[i][alias].kind for i in having):
                    known_fields = set(self.aggregates) if kind == "summary" else set(FACT_FIELDS[kind])
                    if fld and fld not in TEMPLATE_FIELDS and fld not in known_fields:
                        self._add_at("NP005", doc, kpath, at, f"{what} then.{key}: {{{ref}}}: {kind} has no field {fld!r}{_suggest(fld, known_fields)}")

    def _add_at(self, code: str, doc: _Doc, path: tuple, at: tuple[int, int], message: str) -> None:
        self.findings.append(Finding(code, ERROR, doc.file, at[0], at[1], message + self._key_path(doc, path)))

    # -- semantics: what the tests on one fact allow --

    def ftype(self, kind: str, fld: str) -> str | None:
        if kind == "summary":
            return "number" if fld in self.aggregates else None
        return FACT_FIELDS.get(kind, {}).get(fld)

    def resolve(self, operand: Any) -> Any:
        if isinstance(operand, ParamRef):
            return self.values.get(operand.name, _UNKNOWN)
        return operand

    def show(self, test: FieldTest) -> str:
        if isinstance(test.operand, ParamRef):
            return f"{test.field} {test.op}: {test.operand} = {_fmt(self.resolve(test.operand))}"
        if isinstance(test.operand, tuple):
            return f"{test.field} in: [{', '.join(map(str, test.operand))}]"
        return f"{test.field} {test.op}: {_fmt(test.operand)}"

    def numeric(self, tests: Iterable[FieldTest]) -> _Numeric:
        num = _Numeric(_Iv(), None, set())
        for t in tests:
            v = self.resolve(t.operand) if not isinstance(t.operand, tuple) else t.operand
            if v is _UNKNOWN or t.op == "exists":
                continue
            if t.op == "in":
                vals = {x for x in v if _number(x)}
                num.points = vals if num.points is None else num.points & vals
                continue
            if not _number(v):
                continue
            if t.op == "eq":
                num.points = {v} if num.points is None else num.points & {v}
                bound = _Iv(v, True, v, True)
            elif t.op == "ne":
                num.excluded.add(v)
                continue
            else:
                bound = {"gt": _Iv(v, False), "gte": _Iv(v, True), "lt": _Iv(hi=v, hi_in=False), "lte": _Iv(hi=v, hi_in=True)}[t.op]
            before = num.iv
            num.iv = num.iv & bound
            if num.iv.lo != before.lo or num.iv.lo_in != before.lo_in:
                num.lo_test = t
            if num.iv.hi != before.hi or num.iv.hi_in != before.hi_in:
                num.hi_test = t
        return num

    def candidates(self, tests: Iterable[FieldTest]) -> tuple[set | None, set]:
        """The values eq/in allow (None: any) and the values ne excludes, for string/bool fields."""
        allowed: set | None = None
        excluded: set = set()
        for t in tests:
            if t.op == "in":
                vals = set(t.operand) if isinstance(t.operand, tuple) else set()
            elif t.op in ("eq", "ne"):
                v = self.resolve(t.operand)
                if v is _UNKNOWN:
                    continue
                if t.op == "ne":
                    excluded.add(v)
                    continue
                vals = {v}
            else:
                continue
            allowed = vals if allowed is None else allowed & vals
        return allowed, excluded

    def concept_of(self, tests: Iterable[FieldTest]) -> _Concept | None:
        for t in tests:
            if t.field == "concept" and t.op in ("eq", "in"):
                values = t.operand if isinstance(t.operand, tuple) else (self.resolve(t.operand),)
                if len(values) == 1 and values[0] in self.concepts:
                    return self.concepts[values[0]]
        return None

    def domain(self, kind: str, fld: str, tests: Iterable[FieldTest]) -> tuple[_Iv, str]:
        """The values a prepared fact can carry in a numeric field, and why."""
        if kind == "summary":
            agg = self.aggregates.get(fld)
            if agg is not None and agg.mode == "criteria":
                return _Iv(0, True, agg.size, True), f"{fld} counts {agg.size} criteria, so it lies between 0 and {agg.size}"
            return _Iv(0, True), f"{fld} is a count, never negative"
        if (kind, fld) == ("observation", "value"):
            concept = self.concept_of(tests)
            if concept is not None and concept.plausible is not None:
                lo, hi = concept.plausible
                return _Iv(max(0, lo), True, hi, True), f"{concept.id} values outside the plausible range {_fmt(lo)}-{_fmt(hi)} {concept.unit or ''} are set aside".replace("  ", " ")
            return _Iv(0, True), "observation values are never negative"
        if (kind, fld) in (("observation", "age_days"), ("patient", "age_years")):
            return _Iv(0, True), f"{fld} is never negative"
        return _Iv(), ""

    def unsat(self, kind: str, tests: tuple[FieldTest, ...] | list[FieldTest]) -> tuple[FieldTest | None, str] | None:
        """Why no single fact of ``kind`` can pass all ``tests`` (None: one can)."""
        by_field: dict[str, list[FieldTest]] = {}
        for t in tests:
            by_field.setdefault(t.field, []).append(t)
        concept = self.concept_of(tests) if kind == "observation" else None
        for fld, ts in by_field.items():
            ftype = self.ftype(kind, fld)
            exists = [t for t in ts if t.op == "exists"]
            compares = [t for t in ts if t.op != "exists"]
            present = [t for t in exists if t.operand is True]
            absent = [t for t in exists if t.operand is False]
            if present and absent:
                return absent[0], f"{fld} cannot both exist and not exist"
            if absent:
                if compares:
                    return compares[0], f"{fld} exists: false, but a missing field satisfies no comparison ({self.show(compares[0])})"
                if (kind, fld) in ALWAYS_SET or kind == "summary":
                    return absent[0], f"every {kind} fact carries {fld}, so exists: false never holds"
                continue
            if (kind, fld) in NEVER_SET:
                if ftype == "codes" and present:
                    return present[0], f"{kind}.{fld} is coded: prepared facts carry value-set tags, not the field, so exists: true never holds; test {{in: value-set}}"
                if ftype != "codes" and ts:
                    return ts[0], f"the prepared {kind} fact never carries {fld} (requested modalities are read from the order's codes through ruleset.yaml requested_modality)"
            if concept is not None and fld == "value" and concept.unit is None:
                return ts[0], f"concept {concept.id} is coded (no unit in observations.yaml): its facts carry value_code, never value"
            if concept is not None and fld == "value_code" and concept.unit is not None:
                return ts[0], f"concept {concept.id} is numeric (unit {concept.unit}): its facts carry value, never value_code"
            if not compares:
                continue
            if ftype == "number":
                integer = kind == "summary" or (kind, fld) in INTEGER_FIELDS
                num = self.numeric(compares)
                if not num.satisfiable(integer):
                    return compares[-1], f"{' and '.join(self.show(t) for t in compares)} cannot all hold"
                dom, why = self.domain(kind, fld, tests)
                clipped = _Numeric(num.iv & dom, num.points, num.excluded)
                if not clipped.satisfiable(integer):
                    return compares[-1], f"{' and '.join(self.show(t) for t in compares)} can never hold: {why}"
            elif ftype in ("string", "bool"):
                allowed, excluded = self.candidates(compares)
                if allowed is not None and not (allowed - excluded):
                    return compares[-1], f"{' and '.join(self.show(t) for t in compares)} cannot all hold"
        return None

    def implies(self, kind: str, p_tests: Iterable[FieldTest], q_tests: Iterable[FieldTest]) -> bool:
        """Does every fact of ``kind`` that passes ``p_tests`` also pass ``q_tests``?"""
        p_tests = list(p_tests)
        by_field: dict[str, list[FieldTest]] = {}
        for t in p_tests:
            by_field.setdefault(t.field, []).append(t)
        for q in q_tests:
            if not self._test_implied(kind, q, by_field.get(q.field, []), p_tests):
                return False
        return True

    def _test_implied(self, kind: str, q: FieldTest, pts: list[FieldTest], all_p: list[FieldTest]) -> bool:
        compares = [t for t in pts if t.op != "exists"]
        if q.op == "exists":
            if q.operand:
                return bool(compares) or any(t.op == "exists" and t.operand for t in pts) or (kind, q.field) in ALWAYS_SET or kind == "summary"
            return any(t.op == "exists" and not t.operand for t in pts) or (kind, q.field) in NEVER_SET
        if not compares:
            return False
        ftype = self.ftype(kind, q.field)
        if ftype == "number":
            integer = kind == "summary" or (kind, q.field) in INTEGER_FIELDS
            num = self.numeric(compares)
            dom, _ = self.domain(kind, q.field, all_p)
            iv = num.iv & dom
            iv = iv.integers() if integer else iv
            value = self.resolve(q.operand) if not isinstance(q.operand, tuple) else q.operand
            if value is _UNKNOWN:
                return False
            if num.points is not None:
                points = [p for p in num.points if iv.has(p) and p not in num.excluded]
                return all(self._number_passes(q.op, value, p) for p in points)
            if q.op == "ne":
                return not iv.has(value) or value in num.excluded
            if q.op in ("eq", "in"):
                return iv.lo == iv.hi and self._number_passes(q.op, value, iv.lo)
            target = self.numeric([q]).iv
            return target.contains(iv)
        if ftype in ("string", "bool"):
            allowed, excluded = self.candidates(compares)
            if q.op == "ne":
                value = self.resolve(q.operand)
                return value in excluded or (allowed is not None and value not in allowed)
            if allowed is None:
                return False
            target = set(q.operand) if isinstance(q.operand, tuple) else {self.resolve(q.operand)}
            return (allowed - excluded) <= target
        if ftype == "codes" and q.op == "in":
            return any(t.op == "in" and self._vs_subset(t.operand, q.operand) for t in compares)
        return False

    @staticmethod
    def _number_passes(op: str, value: Any, x: float) -> bool:
        if op == "in":
            return x in value
        return {"eq": x == value, "ne": x != value, "gt": x > value, "gte": x >= value, "lt": x < value, "lte": x <= value}[op]

    def _vs_subset(self, a: str, b: str) -> bool:
        """Is every code of value set ``a`` in value set ``b``?"""
        if a == b:
            return True
        va, vb = self.value_sets.get(a), self.value_sets.get(b)
        if va is None or vb is None:
            return False
        for system, codes in va.codes.items():
            if not all(vb.covers(system, c) for c in codes):
                return False
        for system, prefixes in va.prefixes.items():
            if not all(any(p.startswith(q) for q in vb.prefixes.get(system, ())) for p in prefixes):
                return False
        return True

    # -- semantics: alternatives --

    def singleton_key(self, pat: _Pat) -> tuple | None:
        """Which single fact a pattern's fact must be, if its kind has one (negated or not)."""
        if pat.kind in SINGLETON_KINDS:
            return (pat.kind,)
        if pat.kind == "observation":
            concept = self.concept_of(pat.tests)
            if concept is not None:
                return ("observation", concept.id)
        return None

    def groups(self, pats: Iterable[_Pat]) -> dict[tuple, list[_Pat]]:
        """Positive patterns that must match the same fact (the order, the patient, the summary,
        the newest observation of a concept)."""
        out: dict[tuple, list[_Pat]] = {}
        for p in pats:
            key = self.singleton_key(p) if not p.negated else None
            if key is not None:
                out.setdefault(key, []).append(p)
        return out

    def alt_conflict(self, pats: list[_Pat]) -> tuple[_Pat, FieldTest | None, str] | None:
        """Why an alternative (or several rules' alternatives together) can never hold."""
        positives = [p for p in pats if not p.negated]
        for p in positives:
            why = self.unsat(p.kind, p.tests)
            if why is not None:
                return p, why[0], f"{p.alias}: {why[1]}"
        groups = self.groups(positives)
        for key, group in groups.items():
            if len(group) > 1:
                why = self.unsat(group[0].kind, [t for p in group for t in p.tests])
                if why is not None:
                    aliases = " and ".join(p.alias for p in group)
                    return group[-1], why[0], f"{aliases} test the same {' '.join(key)} fact: {why[1]}"
        for n in pats:
            if not n.negated:
                continue
            if not n.tests and n.kind in SINGLETON_KINDS:
                return n, None, f"{n.alias}: there is always a {n.kind} fact, so this negation never holds"
            for p in positives:
                if p.kind == n.kind and self.implies(p.kind, p.tests, n.tests):
                    return n, None, f"{n.alias} negates what {p.alias} requires: every {n.kind} fact that matches {p.alias} also matches {n.alias}"
            key = self.singleton_key(n)
            if key in groups and len(groups[key]) > 1:
                merged = [t for p in groups[key] for t in p.tests]
                if self.implies(n.kind, merged, n.tests):
                    return n, None, f"{n.alias} negates what {' and '.join(p.alias for p in groups[key])} require together"
        return None

    def alt_implies(self, a: list[_Pat], b: list[_Pat]) -> bool:
        """Whenever alternative ``a`` holds, does ``b`` hold too?"""
        a_pos = [p for p in a if not p.negated]
        a_neg = [p for p in a if p.negated]
        groups = self.groups(a_pos)
        for q in b:
            if not q.negated:
                key = self.singleton_key(q)
                if not q.tests and q.kind in SINGLETON_KINDS:
                    continue
                if any(p.kind == q.kind and self.implies(p.kind, p.tests, q.tests) for p in a_pos):
                    continue
                if key in groups and self.implies(q.kind, [t for p in groups[key] for t in p.tests], q.tests):
                    continue
                return False
            # ``not q`` holds whenever a holds: a forbids everything q matches, or a's own fact
            # of that singleton kind cannot match q.
            if any(m.kind == q.kind and self.implies(q.kind, q.tests, m.tests) for m in a_neg):
                continue
            key = self.singleton_key(q)
            if key in groups and self.unsat(q.kind, [t for p in groups[key] for t in p.tests] + list(q.tests)) is not None:
                continue
            return False
        return True

    def live_alts(self, rule: _Rule) -> list[list[_Pat]]:
        return [alt for alt in rule.alts if self.alt_conflict(alt) is None]

    def rule_implies(self, r1: _Rule, r2: _Rule) -> bool:
        """Does ``r2`` fire whenever ``r1`` does? (False when ``r1`` can never fire.)"""
        alts = self.live_alts(r1)
        return bool(alts) and all(any(self.alt_implies(a, b) for b in self.live_alts(r2)) for a in alts)

    # -- NP007 --

    def check_never_fire(self) -> None:
        for rule in self.rules:
            dead = [(i, why) for i, alt in enumerate(rule.alts) if (why := self.alt_conflict(alt)) is not None]
            single = len(rule.alts) == 1
            for i, (pat, test, message) in dead:
                if single:
                    prefix = f"{rule.id} can never fire: "
                elif len(dead) == len(rule.alts):
                    prefix = f"{rule.id} can never fire (no alternative can hold); alternative {i}: "
                else:
                    prefix = f"{rule.id}: alternative {i} can never hold: "
                self.error("NP007", pat.doc, pat.test_path(test), prefix + message)
        for agg in self.aggregates.values():
            for pat in agg.patterns:
                why = self.unsat(pat.kind, pat.tests)
                if why is not None:
                    self.error("NP007", pat.doc, pat.test_path(why[0]), f"{pat.owner} can never match: {why[1]}")

    # -- NP010 --

    def check_bands(self) -> None:
        axes: dict[tuple, list[tuple[_Rule, _Pat, _Numeric, _Iv]]] = {}
        for rule in self.rules:
            if not (rule.deferral or rule.caution):
                continue
            for alt in self.live_alts(rule):
                for pat in alt:
                    if pat.negated:
                        continue
                    context = tuple(sorted(self._context_term(t) for t in pat.tests if self.ftype(pat.kind, t.field) != "number"))
                    fields = dict.fromkeys(t.field for t in pat.tests if self.ftype(pat.kind, t.field) == "number" and t.op in ("eq", "gt", "gte", "lt", "lte"))
                    for fld in fields:
                        integer = pat.kind == "summary" or (pat.kind, fld) in INTEGER_FIELDS
                        num = self.numeric(t for t in pat.tests if t.field == fld)
                        if num.points is not None or num.excluded or num.iv.empty():
                            continue
                        iv = num.iv.integers() if integer else num.iv
                        entries = axes.setdefault((pat.kind, context, fld, integer), [])
                        if not any(r is rule and e == iv for r, _, _, e in entries):
                            entries.append((rule, pat, num, iv))
        for (kind, context, fld, integer), entries in axes.items():
            for x, y in combinations(entries, 2):
                if x[0] is y[0]:
                    continue
                a, b = sorted((x, y), key=lambda e: (e[3].lo, not e[3].lo_in))
                ia, ib = a[3], b[3]
                if ia.contains(ib) or ib.contains(ia):
                    continue  # nested: a stricter threshold inside a wider one (caution, then deferral)
                if integer:
                    relation = "meet" if ib.lo == ia.hi + 1 else ("gap" if ib.lo > ia.hi + 1 else "overlap")
                    between = _Iv(ia.hi + 1, True, ib.lo - 1, True) if relation == "gap" else _Iv(ib.lo, True, ia.hi, True)
                elif ia.hi < ib.lo or (ia.hi == ib.lo and not ia.hi_in and not ib.lo_in):
                    relation, between = "gap", _Iv(ia.hi, not ia.hi_in, ib.lo, not ib.lo_in)
                elif ia.hi == ib.lo and ia.hi_in != ib.lo_in:
                    relation, between = "meet", _Iv()
                else:
                    relation, between = "overlap", _Iv(ib.lo, ib.lo_in, ia.hi, ia.hi_in)
                if relation == "meet":
                    continue
                if relation == "gap":
                    if not (ia.two_sided() or ib.two_sided()):
                        continue  # two one-sided thresholds with a deliberate range between them
                    if any(e is not a and e is not b and not (e[3] & between).empty() for e in entries):
                        continue  # another band covers the gap
                # Report at the bound that breaks the half-open [lower, upper) convention, else at
                # the band that should fit against the other.
                if a[2].hi_test is not None and a[2].hi_test.op == "lte":
                    here, there = a, b
                elif b[2].lo_test is not None and b[2].lo_test.op == "gt":
                    here, there = b, a
                elif ib.two_sided() or not ia.two_sided():
                    here, there = b, a
                else:
                    here, there = a, b
                here_test = here[2].lo_test if here is b else here[2].hi_test
                there_test = there[2].hi_test if here is b else there[2].lo_test
                axis = " ".join([kind] + [shown.split(" = ", 1)[1] for f, shown in context if f == "concept" and " = " in shown] + [fld])
                qualifiers = [shown for f, shown in context if not (f == "concept" and " = " in shown)]
                if qualifiers:
                    axis += f" ({', '.join(qualifiers)})"
                values = f"{axis} = {_fmt(between.lo)}" if between.lo == between.hi else f"{axis} in {between}"
                edge = "starts at" if here is b else "ends at"
                other_edge = "ends at" if here is b else "starts at"
                head = f"{here[0].id} {edge} {self.show(here_test)}, but {there[0].id} ({there[0].where}) {other_edge} {self.show(there_test)}"
                if relation == "gap":
                    self.error("NP010", here[1].doc, here[1].test_path(here_test), f"{head}: {values} matches neither band; adjacent bands must meet exactly (the same parameter, gte on one side and lt on the other)")
                else:
                    self.warn("NP010", here[1].doc, here[1].test_path(here_test), f"{head}: {values} matches both bands; adjacent bands should meet, not overlap (gte on one side, lt on the other)")

    def _context_term(self, t: FieldTest) -> tuple[str, str]:
        """A non-numeric test, as part of the key of a band axis and as shown in messages."""
        value = self.resolve(t.operand)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = "[" + ", ".join(map(str, value)) + "]"
        symbol = {"eq": "=", "ne": "≠", "in": "in", "exists": "exists:"}.get(t.op, t.op)
        return t.field, f"{t.field} {symbol} {value}"

    # -- NP008 / NP009 --

    def check_modality_conflicts(self) -> None:
        modal = [r for r in self.rules if r.preferred is not None or r.avoid or r.acceptable]
        for r1, r2 in combinations(modal, 2):
            clash = self._modality_clash(r1, r2)
            if r1.precedence == r2.precedence and clash:
                pair = next(((i, j) for i, a in enumerate(self.live_alts(r1)) for j, b in enumerate(self.live_alts(r2)) if self.alt_conflict(a + b) is None), None)
                if pair is not None:
                    later, earlier = (r2, r1)
                    at = later.path + ("precedence",) if (later.path + ("precedence",)) in later.doc.keys else later.path + ("id",)
                    self.error(
                        "NP009",
                        later.doc,
                        at,
                        f"{later.id} and {earlier.id} ({earlier.where}) both have precedence {later.precedence} and can fire together, but {clash}: the outcome then depends on file order; give one of them a higher precedence",
                    )
        for low in modal:
            if low.preferred is None:
                continue
            for high in modal:
                if high.precedence <= low.precedence:
                    continue
                wins = high.preferred not in (None, low.preferred) and not any(high.preferred in r.avoid and r.precedence >= high.precedence for r in modal)
                if wins or low.preferred in high.avoid:
                    if self.rule_implies(low, high):
                        does = f"avoids {low.preferred}" if low.preferred in high.avoid else f"prefers {high.preferred}"
                        self.warn(
                            "NP008",
                            low.doc,
                            low.path + ("then", "modality", "preferred"),
                            f"{low.id}'s preferred {low.preferred} never takes effect: whenever it fires, {high.id} ({high.where}, precedence {high.precedence} > {low.precedence}) fires too and {does}",
                        )
                        break

    @staticmethod
    def _modality_clash(r1: _Rule, r2: _Rule) -> str:
        if r1.preferred and r2.preferred and r1.preferred != r2.preferred:
            return f"{r1.id} prefers {r1.preferred} and {r2.id} prefers {r2.preferred}"
        if r1.preferred and r1.preferred in r2.avoid:
            return f"{r1.id} prefers {r1.preferred}, which {r2.id} avoids"
        if r2.preferred and r2.preferred in r1.avoid:
            return f"{r2.id} prefers {r2.preferred}, which {r1.id} avoids"
        return ""

    def check_injectate_shadowing(self) -> None:
        rank = {rec: i for i, rec in enumerate(RECOMMENDATIONS)}
        for rule in self.rules:
            if not rule.injectates or rule.deferral or rule.caution or rule.missing_data or rule.preferred or rule.avoid or rule.acceptable:
                continue
            for other in self.rules:
                if other is rule:
                    continue
                stronger = dict(other.injectates)
                if all(cat in stronger and rank[stronger[cat]] > rank[rec] for cat, rec in rule.injectates) and self.rule_implies(rule, other):
                    shown = ", ".join(f"{cat} {stronger[cat]}" for cat, _ in rule.injectates)
                    self.warn("NP008", rule.doc, rule.path + ("then", "injectates"), f"{rule.id} never decides: whenever it fires, {other.id} ({other.where}) fires too and recommends {shown}, which is more restrictive")
                    break

    # -- NP012 --

    def check_hard_coded(self) -> None:
        pats = [(p, p.owner) for r in self.rules for alt in r.alts for p in alt]
        pats += [(p, p.owner) for agg in self.aggregates.values() for p in agg.patterns]
        seen: set[tuple] = set()
        for pat, owner in pats:
            for t in pat.tests:
                if t.op not in ("eq", "ne", "gt", "gte", "lt", "lte") or isinstance(t.operand, ParamRef) or not _number(t.operand):
                    continue
                if self.ftype(pat.kind, t.field) != "number":
                    continue
                if t.operand == 0 or (pat.kind == "summary" and t.operand in (1, 2)):
                    continue  # a domain bound, or a count such as "at least one" or "several"
                path = pat.test_path(t)
                if (pat.doc.file, path) in seen:
                    continue
                seen.add((pat.doc.file, path))
                same = [f"${n}" for n, v in self.values.items() if _number(v) and v == t.operand]
                hint = f" ({', '.join(same[:3])} has this value)" if same else ""
                self.warn(
                    "NP012",
                    pat.doc,
                    path,
                    f"{owner}: {pat.kind} {t.field} {t.op}: {_fmt(t.operand)} is a hard-coded threshold; define it in parameters.yaml with unit, provenance and source, and write $name{hint}",
                )

    # -- NP013 --

    def check_unused(self) -> None:
        if any(f.code == "NP000" for f in self.findings):
            return  # what an unreadable file uses is unknown
        for name, param in self.params.items():
            if name not in self.used_params:
                self.warn("NP013", param.doc, param.path, f"parameter {name} is not used by any rule, aggregate or message")
        for vs_id, vs in self.value_sets.items():
            if vs_id not in self.used_value_sets:
                self.warn("NP013", vs.doc, vs.path, f"value set {vs_id} is not used by any rule, aggregate or requested_modality")

    # -- the loader itself --

    def check_build(self) -> None:
        """Run the loader. What it refuses and lint did not see is still reported."""
        if self.has_errors():
            return
        docs: dict[str, Any] = {"ruleset": self.meta.value or {} if self.meta else {}}
        for name in ("parameters", "observations", "aggregates"):
            doc = self.docs.get(f"{name}.yaml")
            docs[name] = (doc.value or {}) if doc is not None else {}
        value_sets: dict = {}
        for doc in self.vs_docs:
            for vs_id, spec in (doc.value or {}).items():
                value_sets.setdefault(vs_id, spec)
        docs["value_sets"] = value_sets
        docs["rules"] = [(f"{doc.rel}:{doc.pos((i,), key=False)[0]}", raw) for doc in self.rule_docs for i, raw in enumerate(doc.value or [])]
        overlay, overlay_name = None, ""
        if self.overlay is not None and isinstance(self.overlay.value, dict):
            overlay = self.overlay.value.get("parameters") or {}
            overlay_name = self.overlay.value.get("site", self.overlay.path.stem)
        try:
            build_ruleset(docs, overlay=overlay, overlay_name=overlay_name)
        except RuleSetError as exc:
            doc, path = self._locate(exc.where, overlay_name)
            self.error(_code_for(exc.message), doc, path, f"the loader refuses the rule set: {exc.message} (at {exc.where})")
        except Exception as exc:  # noqa: BLE001 - a loader crash is a finding too
            self.error("NP002", self.meta, (), f"the loader fails on this rule set: {type(exc).__name__}: {exc}")

    def _locate(self, where: str, overlay_name: str) -> tuple[_Doc, tuple]:
        m = re.match(r"^(rules/[^:]+):(\d+)(?: [^.\[\s]+)?(.*)$", where)
        if m and m.group(1) in self.docs:
            doc = self.docs[m.group(1)]
            line = int(m.group(2))
            index = next((i for i in range(len(doc.value or [])) if doc.pos((i,), key=False)[0] == line), 0)
            return doc, (index,) + _where_tokens(m.group(3))
        for name in _KNOWN_FILES:
            if where.startswith(name) and name in self.docs:
                return self.docs[name], _where_tokens(where[len(name):])
        m = re.match(r"^valuesets\.([^.\[]+)(.*)$", where)
        if m and m.group(1) in self.value_sets:
            vs = self.value_sets[m.group(1)]
            return vs.doc, vs.path + _where_tokens(m.group(2))
        if self.overlay is not None and overlay_name and where.startswith(overlay_name):
            return self.overlay, ("parameters",) + _where_tokens(where[len(overlay_name):])
        return self.meta, ()


def _fits(ftype: str, value: Any) -> bool:
    if ftype == "number":
        return _number(value)
    if ftype == "bool":
        return isinstance(value, bool)
    if ftype == "string":
        return isinstance(value, str)
    return True


def _where_tokens(tail: str) -> tuple:
    """``.when_any[1].inr.observation`` -> ('when_any', 1, 'inr', 'observation')."""
    return tuple(int(i) if i else k for k, i in re.findall(r"\.([^.\[\]]+)|\[(\d+)\]", tail))


def _code_for(message: str) -> str:
    lowered = message.lower()
    for needle, code in (
        ("unknown value set", "NP003"),
        ("unknown parameter", "NP004"),
        ("unknown fact kind", "NP005"),
        ("has no field", "NP005"),
        ("unknown observation concept", "NP005"),
        ("names no matched", "NP005"),
        ("does not match; every alternative", "NP005"),
        ("unknown key", "NP001"),
        ("missing required key", "NP001"),
        ("already", "NP015"),
        ("defined twice", "NP015"),
    ):
        if needle in lowered:
            return code
    return "NP002"


# --- the library entry point and the command ---------------------------------------------------


def lint(path: Path, *, overlay: Path | None = None) -> list[Finding]:
    """Every finding for the rule set in ``path`` (optionally under a site overlay), sorted by
    file, line and column. Never raises for a broken rule set: broken is what it reports."""
    return _Linter(Path(path), overlay).run()


@click.command(name="lint")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A site overlay (site: name, parameters: {...}) to check, and to check the rules under.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="One line per finding, or a JSON document.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) on warnings too.")
def command(path: Path, overlay: Path | None, fmt: str, strict: bool) -> None:
    """Static checks of the rule set in PATH: schema, references, code shapes, rules that can
    never fire, shadowed and conflicting rules, gaps between threshold bands, citations and
    hard-coded thresholds. Exit 1 on any error (with --strict, on any warning)."""
    linter = _Linter(path, overlay)
    findings = linter.run()
    errors = sum(f.severity == ERROR for f in findings)
    warnings = len(findings) - errors
    files = len(linter.docs) + (linter.overlay is not None)
    if fmt == "json":
        summary = {"errors": errors, "warnings": warnings, "files": files, "rules": linter.rule_count}
        click.echo(json.dumps({"path": str(path), "overlay": str(overlay) if overlay else None, "findings": [asdict(f) for f in findings], "summary": summary}, indent=2, ensure_ascii=False))
    else:
        for f in findings:
            click.echo(str(f))
        plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
        click.echo(f"{plural(errors, 'error')}, {plural(warnings, 'warning')} in {path} ({plural(linter.rule_count, 'rule')}, {plural(files, 'file')})")
    raise click.exceptions.Exit(1 if errors or (strict and warnings) else 0)


# --- JSON Schemas for editors ------------------------------------------------------------------

_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
_OP_DOCS = {
    "eq": "equals",
    "ne": "differs from (a missing field passes no test, not even ne)",
    "gt": "greater than",
    "gte": "greater than or equal to",
    "lt": "less than",
    "lte": "less than or equal to",
    "in": "one of the listed values",
    "exists": "true: the field is present; false: it is absent",
}
_KIND_DOCS = {
    "patient": "The patient (one fact): age in completed years, sex.",
    "condition": "An active condition; test its code by value set.",
    "medication": "An active medication; test its code by value set.",
    "observation": "The newest usable result per concept (observations.yaml), in the concept's canonical unit; age_days is its age.",
    "allergy": "A recorded allergy; severity is mild, moderate, severe or unknown.",
    "prior_injection": "A completed injection: days_ago, target, same_target, same_side, agents by value set.",
    "planned_surgery": "A planned procedure: days_until, ipsilateral, code by value set.",
    "order": "The injection being ordered (one fact).",
    "injectate": "A planned injectate; test its code by value set.",
    "flag": "A clinician-asserted flag.",
    "data_issue": "A value that was set aside (unit missing or unknown, implausible, undated).",
    "summary": "Derived numbers, one field per aggregate in aggregates.yaml.",
}


def _pattern_defs(kinds: Iterable[str]) -> dict:
    kinds = list(kinds)
    number = {"anyOf": [{"type": "number"}, {"$ref": "#/$defs/param"}]}
    defs: dict[str, Any] = {
        "param": {"type": "string", "pattern": _PARAM_REF, "description": "A site parameter from parameters.yaml, e.g. $inr_defer_above."},
        "number": number,
        "numberTest": {
            "description": "A number, $parameter, or {operator: value}.",
            "anyOf": [
                {"$ref": "#/$defs/number"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        **{op: {"$ref": "#/$defs/number", "description": _OP_DOCS[op]} for op in ("eq", "ne", "gt", "gte", "lt", "lte")},
                        "in": {"type": "array", "minItems": 1, "items": {"type": "number"}, "description": _OP_DOCS["in"]},
                        "exists": {"type": "boolean", "description": _OP_DOCS["exists"]},
                    },
                },
            ],
        },
        "boolTest": {
            "description": "true, false, $parameter, or {eq|ne: value, exists: bool}.",
            "anyOf": [
                {"type": "boolean"},
                {"$ref": "#/$defs/param"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "eq": {"anyOf": [{"type": "boolean"}, {"$ref": "#/$defs/param"}], "description": _OP_DOCS["eq"]},
                        "ne": {"anyOf": [{"type": "boolean"}, {"$ref": "#/$defs/param"}], "description": _OP_DOCS["ne"]},
                        "in": {"type": "array", "minItems": 1, "items": {"type": "boolean"}, "description": _OP_DOCS["in"]},
                        "exists": {"type": "boolean", "description": _OP_DOCS["exists"]},
                    },
                },
            ],
        },
        "codesTest": {
            "description": "Coded fields are tested by value-set membership only: {in: value-set-id}.",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {"in": {"type": "string", "minLength": 1, "description": "a value set id (valuesets/*.yaml)"}, "exists": {"type": "boolean", "description": _OP_DOCS["exists"]}},
        },
    }

    def string_test(name: str, values: tuple[str, ...] | None) -> str:
        literal = {"type": "string", "enum": list(values)} if values else {"type": "string"}
        defs[name] = {
            "description": "A value, $parameter, or {eq|ne: value, in: [values], exists: bool}." + (f" Values: {', '.join(values)}." if values else ""),
            "anyOf": [
                literal,
                {"$ref": "#/$defs/param"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "eq": {"anyOf": [literal, {"$ref": "#/$defs/param"}], "description": _OP_DOCS["eq"]},
                        "ne": {"anyOf": [literal, {"$ref": "#/$defs/param"}], "description": _OP_DOCS["ne"]},
                        "in": {"type": "array", "minItems": 1, "items": literal, "description": _OP_DOCS["in"]},
                        "exists": {"type": "boolean", "description": _OP_DOCS["exists"]},
                    },
                },
            ],
        }
        return name

    string_test("stringTest", None)
    for kind in kinds:
        if kind == "summary":
            defs["fields-summary"] = {
                "description": _KIND_DOCS[kind],
                "type": ["object", "null"],
                "propertyNames": {"pattern": _ALIAS.pattern},
                "additionalProperties": {"$ref": "#/$defs/numberTest"},
            }
            continue
        properties = {}
        for fld, ftype in FACT_FIELDS[kind].items():
            if ftype == "string":
                vocab = VOCABULARIES.get((kind, fld))
                ref = string_test(f"stringTest-{kind}-{fld}", vocab) if vocab else "stringTest"
            else:
                ref = {"number": "numberTest", "bool": "boolTest", "codes": "codesTest"}[ftype]
            properties[fld] = {"$ref": f"#/$defs/{ref}"}
        defs[f"fields-{kind}"] = {"description": _KIND_DOCS[kind], "type": ["object", "null"], "additionalProperties": False, "properties": properties}
    kind_props = {kind: {"$ref": f"#/$defs/fields-{kind}"} for kind in kinds}
    defs["positivePattern"] = {
        "description": "One fact kind mapped to its field tests, e.g. {observation: {concept: inr, value: {gt: $inr_defer_above}}}.",
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": kind_props,
    }
    defs["pattern"] = {
        "description": "A pattern, or not: a pattern (no fact may match it).",
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {"not": {"$ref": "#/$defs/positivePattern"}, **kind_props},
    }
    return defs


def _rules_schema() -> dict:
    defs = _pattern_defs(FACT_FIELDS)
    modality = {"type": "string", "enum": list(MODALITIES)}
    defs.update(
        {
            "alternative": {
                "description": "Aliases mapped to patterns; all must hold.",
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": _ALIAS.pattern},
                "additionalProperties": {"$ref": "#/$defs/pattern"},
            },
            "then": {
                "type": "object",
                "required": ["message"],
                "additionalProperties": False,
                "anyOf": [{"required": [k]} for k in _OUTCOMES],
                "properties": {
                    "modality": {
                        "description": "Resolved by rule precedence; every avoid accumulates.",
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": False,
                        "properties": {
                            "preferred": {"anyOf": [modality, {"$ref": "#/$defs/param"}]},
                            "acceptable": {"type": "array", "items": modality},
                            "avoid": {"type": "array", "items": modality},
                        },
                    },
                    "injectates": {
                        "description": "Per category the most restrictive recommendation wins.",
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["category", "recommendation"],
                            "additionalProperties": False,
                            "properties": {"category": {"type": "string", "enum": list(INJECTATE_CATEGORIES)}, "recommendation": {"type": "string", "enum": list(RECOMMENDATIONS)}},
                        },
                    },
                    "deferral": {
                        "type": "object",
                        "required": ["reason", "severity"],
                        "additionalProperties": False,
                        "properties": {
                            "reason": {"type": "string", "enum": list(DEFERRAL_REASONS)},
                            "severity": {"type": "string", "enum": list(SEVERITIES), "description": "HARD: not now; SOFT: only after clinician review."},
                            "scope": {"type": "string", "enum": list(SCOPES), "description": "PROCEDURE, or the injectate category it blocks (default PROCEDURE)."},
                        },
                    },
                    "caution": {**_NONBLANK, "description": "A caution code, e.g. PLATELETS_BORDERLINE."},
                    "missing_data": {**_NONBLANK, "description": "A missing-data code; may name {alias.field}."},
                    "message": {**_NONBLANK, "description": "Shown to people; {alias.field} and {$parameter} are filled in."},
                },
            },
            "evidence": {
                "type": "object",
                "required": ["citation", "strength"],
                "additionalProperties": False,
                "properties": {"citation": _NONBLANK, "strength": {**_NONBLANK, "description": "Kind of source and provenance tag, e.g. 'consensus guideline [V]'."}},
            },
            "rule": {
                "type": "object",
                "required": ["id", "version", "title", "category", "then", "rationale", "evidence"],
                "additionalProperties": False,
                "oneOf": [{"required": ["when"]}, {"required": ["when_any"]}],
                "properties": {
                    "id": {"type": "string", "pattern": _RULE_ID.pattern, "description": "Upper-case words joined by hyphens, e.g. DEF-INR-HIGH."},
                    "version": {"type": "string", "pattern": _SEMVER.pattern, "description": "Semantic version of this rule."},
                    "title": _NONBLANK,
                    "category": {"type": "string", "enum": list(CATEGORIES)},
                    "precedence": {"type": "integer", "description": "Modality resolution: the higher wins (default 0)."},
                    "exclusive": {"type": "boolean", "description": "When this rule fires its outcome is the whole decision: no other rule's outcome is added (default false)."},
                    "when": {"$ref": "#/$defs/alternative"},
                    "when_any": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/alternative"}, "description": "Alternatives; the rule fires once per alternative that holds."},
                    "then": {"$ref": "#/$defs/then"},
                    "rationale": _NONBLANK,
                    "evidence": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/evidence"}},
                },
            },
        }
    )
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint rules file (rulesets/<id>/rules/*.yaml)",
        "description": "A list of rules. Generated by needlepoint.authoring.lint; `needlepoint rules lint` checks what a schema cannot (references, codes, rules that never fire, bands).",
        "type": ["array", "null"],
        "items": {"$ref": "#/$defs/rule"},
        "$defs": defs,
    }


def _code_item(system: str, prefix: bool) -> dict:
    if system in CODE_VOCABULARIES:
        return {"type": "string", "enum": list(CODE_VOCABULARIES[system])}
    pattern = (PREFIX_PATTERNS if prefix else CODE_PATTERNS).get(system)
    item: dict[str, Any] = {"type": "string"} if prefix else {"type": ["string", "integer"]}
    if pattern:
        item["pattern"] = pattern
    return item


def _valuesets_schema() -> dict:
    systems = {}
    for system in CODE_SYSTEMS:
        codes = {"type": "array", "items": _code_item(system, False)}
        long_form = {"codes": codes}
        if system in PREFIX_SYSTEMS:
            long_form["prefixes"] = {"type": "array", "items": _code_item(system, True), "description": "codes that start with one of these match"}
        systems[system] = {"anyOf": [codes, {"type": "object", "additionalProperties": False, "properties": long_form}]}
    code_lists = {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": systems}
    value_set = {
        "type": "object",
        "required": ["title"],
        "additionalProperties": False,
        "anyOf": [{"required": ["codes"]}, {"required": ["groups"]}],
        "properties": {
            "title": _NONBLANK,
            "source": {"type": "string"},
            "note": {"type": "string"},
            "codes": {"$ref": "#/$defs/codeLists"},
            "groups": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/$defs/codeLists"}, "description": "Named members (e.g. one per agent); the value set is their union."},
        },
    }
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint value sets (rulesets/<id>/valuesets/*.yaml)",
        "type": ["object", "null"],
        "additionalProperties": {"$ref": "#/$defs/valueSet"},
        "$defs": {"codeLists": code_lists, "valueSet": value_set},
    }


def _parameters_schema() -> dict:
    scalar = {"type": ["number", "string", "boolean"]}
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint site parameters (rulesets/<id>/parameters.yaml)",
        "type": ["object", "null"],
        "propertyNames": {"pattern": _PARAM_NAME.pattern},
        "additionalProperties": {
            "type": "object",
            "required": ["value", "provenance", "source", "description"],
            "additionalProperties": False,
            "properties": {
                "value": scalar,
                "unit": {"type": ["string", "null"], "description": "UCUM unit"},
                "provenance": {"type": "string", "enum": list(PROVENANCE_TAGS), "description": "V published and read, V2 secondary, R recalled, C local convention (needs sign-off), P payer."},
                "source": _NONBLANK,
                "description": _NONBLANK,
                "allowed": {"type": "array", "minItems": 1, "items": scalar},
            },
        },
    }


def _observations_schema() -> dict:
    assert all(re.fullmatch(r"[a-z0-9-]+", s) for s in CODE_SYSTEMS)  # nothing to escape (JS regexes reject needless escapes)
    systems = "|".join(CODE_SYSTEMS)
    conversion = {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "enum": list(UNIT_CONVERSIONS)}]}
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint observation concepts (rulesets/<id>/observations.yaml)",
        "type": ["object", "null"],
        "additionalProperties": {
            "type": "object",
            "required": ["title", "codes"],
            "additionalProperties": False,
            "properties": {
                "title": _NONBLANK,
                "codes": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": f"^({systems})#\\S+$"}, "description": "system#code, e.g. loinc#6301-6"},
                "unit": {"type": "string", "description": "Canonical unit that rules compare in; omit for coded results."},
                "units": {
                    "type": "object",
                    "propertyNames": {"pattern": "^[!-~]+$"},
                    "additionalProperties": conversion,
                    "description": "Accepted UCUM codes, matched exactly (case-sensitive), each with its factor to the canonical unit or a named conversion.",
                },
                "display_units": {
                    "type": "object",
                    "propertyNames": {"minLength": 1, "pattern": "^\\S(.*\\S)?$"},
                    "additionalProperties": conversion,
                    "description": "Free-text units as lab reports show them (FHIR Quantity.unit, e.g. K/uL), read only for a value without a UCUM code; list only text that cannot mean anything else for the concept.",
                },
                "plausible": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}, "description": "[low, high] in the canonical unit; values outside are set aside."},
            },
        },
    }


def _aggregates_schema() -> dict:
    kinds = [k for k in FACT_FIELDS if k != "summary"]
    defs = _pattern_defs(kinds)
    aggregate = {
        "type": "object",
        "required": ["description"],
        "additionalProperties": False,
        "oneOf": [{"required": ["count"]}, {"required": ["criteria"]}],
        "allOf": [{"if": {"required": ["count"], "properties": {"count": {"const": kind}}}, "then": {"properties": {"where": {"$ref": f"#/$defs/fields-{kind}"}}}} for kind in kinds],
        "properties": {
            "description": _NONBLANK,
            "count": {"type": "string", "enum": kinds, "description": "Count facts of this kind that pass where."},
            "where": {"type": ["object", "null"]},
            "criteria": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/positivePattern"}, "description": "Count the patterns that match at least one fact."},
            "distinct_groups_of": {"type": "string", "description": "Count the distinct groups of this value set the matching facts fall into."},
        },
    }
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint aggregates (rulesets/<id>/aggregates.yaml)",
        "type": ["object", "null"],
        "propertyNames": {"pattern": _ALIAS.pattern, "not": {"enum": list(RESERVED_FIELDS)}},
        "additionalProperties": {"$ref": "#/$defs/aggregate"},
        "$defs": {**defs, "aggregate": aggregate},
    }


def _ruleset_schema() -> dict:
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint rule set (rulesets/<id>/ruleset.yaml)",
        "type": "object",
        "required": ["id", "version", "title", "validation"],
        "additionalProperties": False,
        "properties": {
            "id": _NONBLANK,
            "version": {"type": "string", "pattern": _SEMVER.pattern},
            "title": _NONBLANK,
            "status": {"type": "string", "enum": list(STATUSES)},
            "validation": {**_NONBLANK, "description": "Who validated the rule set, or that nobody has."},
            "description": {"type": "string"},
            "requested_modality": {
                "type": "object",
                "propertyNames": {"enum": list(MODALITIES)},
                "additionalProperties": {"type": "string", "minLength": 1},
                "description": "Modality -> value set of order codes that mean the clinician chose it.",
            },
            "modality_bound_injectates": {
                "type": "object",
                "propertyNames": {"enum": list(INJECTATE_CATEGORIES)},
                "additionalProperties": {
                    "oneOf": [
                        {"type": "string", "enum": list(MODALITIES)},
                        {"type": "array", "items": {"type": "string", "enum": list(MODALITIES)}, "minItems": 1},
                    ]
                },
                "description": "Injectate category -> the modality (or modalities) it is only used with, e.g. IODINATED_CONTRAST: FLUOROSCOPY."
                " A decision whose modality avoids or does not retain them does not suggest the injectate.",
            },
        },
    }


def _overlay_schema() -> dict:
    return {
        "$schema": _SCHEMA,
        "title": "Needlepoint site overlay",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "site": _NONBLANK,
            "parameters": {"type": "object", "propertyNames": {"pattern": _PARAM_NAME.pattern}, "additionalProperties": {"type": ["number", "string", "boolean"]}},
        },
    }


def json_schemas() -> dict[str, dict]:
    """The JSON Schemas (draft 2020-12) of the rule-set files, by file name."""
    return {
        "rules.schema.json": _rules_schema(),
        "ruleset.schema.json": _ruleset_schema(),
        "parameters.schema.json": _parameters_schema(),
        "observations.schema.json": _observations_schema(),
        "aggregates.schema.json": _aggregates_schema(),
        "valuesets.schema.json": _valuesets_schema(),
        "overlay.schema.json": _overlay_schema(),
    }


def write_schemas(directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the rule-set JSON Schemas.")
    parser.add_argument("--write-schemas", metavar="DIR", required=True, type=Path)
    for written in write_schemas(parser.parse_args().write_schemas):
        print(written)
