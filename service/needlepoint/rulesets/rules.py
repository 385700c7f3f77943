"""The builder's part for ``rules/*.yaml``: rules, their patterns (the condition language),
outcomes and message placeholders. A mixin of :class:`~needlepoint.rulesets.builder.Builder`,
which supplies the reporting helpers and the parameters, value sets, concepts and aggregates
read before the rules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from needlepoint.core.conditions import FACT_FIELDS, OPERATORS, ORDERING_OPERATORS, FieldTest, ParamRef, Pattern
from needlepoint.core.ruleset import TEMPLATE, TEMPLATE_FIELDS, parse_placeholder

from . import format as fmt
from .diagnostics import describe, suggest
from .reader import Document

if TYPE_CHECKING:
    from .builder import AggregateEntry, ConceptEntry, ParamEntry


@dataclass
class PatternEntry:
    """A parsed pattern and where it is written."""

    pattern: Pattern
    doc: Document
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
        """Where ``test`` is written: its operator's key, or its field's for the shorthand."""
        if test is None:
            return self.path
        p = self.body + (test.field, test.op)
        return p if p in self.doc.keys else self.body + (test.field,)


@dataclass
class RuleEntry:
    """A rule whose conditions and outcome the builder could read, with where it is written."""

    id: str
    doc: Document
    path: tuple
    raw: dict
    precedence: int
    alts: list[list[PatternEntry]]
    preferred: str | None  # resolved through its parameter
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


def fits(ftype: str, value: Any) -> bool:
    if ftype == "number":
        return fmt.number(value)
    if ftype == "bool":
        return isinstance(value, bool)
    if ftype == "string":
        return isinstance(value, str)
    return True


class RuleChecks:
    if TYPE_CHECKING:
        # What Builder supplies: the definitions read before the rules, the rules read so far
        # and the reporting and structure helpers (mypy checks Builder's against these).
        params: dict[str, ParamEntry]
        values: dict[str, Any]
        concepts: dict[str, ConceptEntry]
        aggregates: dict[str, AggregateEntry]
        rules: list[RuleEntry]
        rule_ids: dict[str, tuple[Document, tuple]]
        rule_count: int
        used_params: set[str]

        def error(
            self, code: str, doc: Document, path: Iterable, message: str, *, key: bool = True, at: tuple[int, int] | None = None
        ) -> None: ...

        def mapping(
            self,
            doc: Document,
            path: tuple,
            value: Any,
            record: fmt.Record | None,
            what: str,
            *,
            allowed: Iterable[str] | None = None,
        ) -> bool: ...

        def check_scalars(self, doc: Document, path: tuple, value: dict, record: fmt.Record, what: str) -> bool: ...

        def enum(self, doc: Document, path: tuple, value: Any, allowed: tuple, what: str) -> bool: ...

        def param_ref(self, doc: Document, path: tuple, name: str, what: str) -> bool: ...

        def value_set_ref(self, doc: Document, path: tuple, vs_id: Any, what: str) -> bool: ...

    # -- patterns --

    def check_pattern(
        self, doc: Document, path: tuple, raw: Any, alias: str, summary_fields: set[str], what: str
    ) -> PatternEntry | None:
        """Check a pattern (``{kind: {field: test}}`` or ``{not: ...}``) and parse it."""
        inner, ipath, negated = raw, path, False
        if isinstance(raw, dict) and "not" in raw:
            if len(raw) != 1:
                other = next(k for k in raw if k != "not")
                self.error(
                    "NP001",
                    doc,
                    path + (other,),
                    f"{what}: `not:` negates one pattern and stands alone; give {other!r} its own alias",
                )
                return None
            inner, ipath, negated = raw["not"], path + ("not",), True
        if not isinstance(inner, dict) or len(inner) != 1:
            if isinstance(inner, dict) and len(inner) > 1:
                second = list(inner)[1]
                self.error(
                    "NP001",
                    doc,
                    ipath + (second,),
                    f"{what}: a pattern tests one fact kind, but this one names {', '.join(map(str, inner))}; give each its own "
                    "alias",
                )
            else:
                self.error(
                    "NP002",
                    doc,
                    ipath,
                    f"{what}: a pattern is one fact kind mapped to its field tests, e.g. {{observation: {{concept: inr}}}}; got "
                    f"{describe(inner)}",
                    key=False,
                )
            return None
        ((kind, body),) = inner.items()
        if kind not in FACT_FIELDS:
            self.error(
                "NP005",
                doc,
                ipath + (kind,),
                f"{what}: unknown fact kind {kind!r}{suggest(kind, FACT_FIELDS)}; known: {', '.join(FACT_FIELDS)}",
            )
            return None
        tests = self.check_body(doc, ipath + (kind,), kind, body, summary_fields, what)
        if tests is None:
            return None
        return PatternEntry(Pattern(alias, kind, tuple(tests), negated), doc, path, ipath + (kind,), what)

    def check_body(
        self, doc: Document, bpath: tuple, kind: str, body: Any, summary_fields: set[str], what: str
    ) -> list[FieldTest] | None:
        """The field tests of a pattern, or None when any is wrong."""
        if body is None:
            return []
        if not isinstance(body, dict):
            self.error(
                "NP002",
                doc,
                bpath,
                f"{what}: the field tests of {kind} are a mapping of field to test; got {describe(body)}",
                key=False,
            )
            return None
        fields = dict.fromkeys(summary_fields, "number") if kind == "summary" else FACT_FIELDS[kind]
        tests: list[FieldTest] | None = []
        for fld, spec in body.items():
            fpath = bpath + (fld,)
            if fld not in fields:
                if kind == "summary":
                    known = ", ".join(sorted(fields)) or "none"
                    self.error(
                        "NP005",
                        doc,
                        fpath,
                        f"{what}: no aggregate named {fld!r}{suggest(fld, fields)}; summary fields (aggregates.yaml): {known}",
                    )
                else:
                    self.error(
                        "NP005",
                        doc,
                        fpath,
                        f"{what}: {kind} has no field {fld!r}{suggest(fld, fields)}; fields: {', '.join(sorted(fields))}",
                    )
                tests = None
                continue
            found = self.check_field(doc, fpath, kind, fld, fields[fld], spec, what)
            if found is None:
                tests = None
            elif tests is not None:
                tests.extend(found)
        return tests

    def check_field(
        self, doc: Document, fpath: tuple, kind: str, fld: str, ftype: str, spec: Any, what: str
    ) -> list[FieldTest] | None:
        name = f"{kind}.{fld}"
        shorthand = not isinstance(spec, dict)
        if not shorthand and not spec:
            self.error(
                "NP002", doc, fpath, f"{what}: {name} has no test; write {{operator: value}} with one of {', '.join(OPERATORS)}"
            )
            return None
        tests: list[FieldTest] | None = []

        def fail() -> None:
            nonlocal tests
            tests = None

        for op, raw in ({"eq": spec} if shorthand else spec).items():
            opath = fpath if shorthand else fpath + (op,)
            if op not in OPERATORS:
                self.error(
                    "NP001",
                    doc,
                    opath,
                    f"{what}: unknown operator {op!r}{suggest(op, OPERATORS)}; use one of {', '.join(OPERATORS)}",
                )
                fail()
                continue
            if op == "exists":
                if not isinstance(raw, bool):
                    self.error("NP002", doc, opath, f"{what}: exists takes true or false; got {describe(raw)}", key=False)
                    fail()
                elif ftype == "codes":
                    self.error(
                        "NP002", doc, fpath, f"{what}: coded fields are tested by value-set membership only: {{in: value-set-id}}"
                    )
                    fail()
                elif tests is not None:
                    tests.append(FieldTest(fld, op, raw))
                continue
            if ftype == "codes":
                if op != "in" or not isinstance(raw, str):
                    self.error(
                        "NP002",
                        doc,
                        opath,
                        f"{what}: {name} is coded and is tested by value-set membership only: {{in: value-set-id}}",
                    )
                    fail()
                elif not self.value_set_ref(doc, opath, raw, what):
                    fail()
                elif tests is not None:
                    tests.append(FieldTest(fld, op, raw))
                continue
            if op == "in":
                if not isinstance(raw, list) or not raw:
                    self.error(
                        "NP002", doc, opath, f"{what}: in takes a non-empty list of values; got {describe(raw)}", key=False
                    )
                    fail()
                    continue
                good = True
                for i, item in enumerate(raw):
                    if isinstance(item, str) and item.startswith("$"):
                        self.error(
                            "NP002",
                            doc,
                            opath + (i,),
                            f"{what}: parameters are not expanded inside in: lists; {item} would be compared as text",
                            key=False,
                        )
                        good = False
                    elif not fits(ftype, item):
                        self.error("NP002", doc, opath + (i,), f"{what}: {name} is a {ftype}; got {describe(item)}", key=False)
                        good = False
                    else:
                        good = self.check_concept(doc, opath + (i,), kind, fld, item, what) and good
                if not good:
                    fail()
                elif tests is not None:
                    tests.append(FieldTest(fld, op, tuple(raw)))
                continue
            if op in ORDERING_OPERATORS and ftype != "number":
                self.error("NP002", doc, opath, f"{what}: {op} compares numbers, but {name} is a {ftype}")
                fail()
                continue
            if isinstance(raw, str) and raw.startswith("$"):
                pname = raw[1:]
                if not self.param_ref(doc, opath, pname, what):
                    fail()
                    continue
                value = self.values.get(pname)
                if not fits(ftype, value):
                    self.error("NP002", doc, opath, f"{what}: ${pname} is {describe(value)}, but {name} is a {ftype}", key=False)
                    fail()
                elif op == "eq" and not self.check_concept(doc, opath, kind, fld, value, what, param=pname):
                    fail()
                elif tests is not None:
                    tests.append(FieldTest(fld, op, ParamRef(pname)))
                continue
            if not fits(ftype, raw):
                self.error("NP002", doc, opath, f"{what}: {name} is a {ftype}; got {describe(raw)}", key=False)
                fail()
            elif op == "eq" and not self.check_concept(doc, opath, kind, fld, raw, what):
                fail()
            elif tests is not None:
                tests.append(FieldTest(fld, op, raw))
        return tests

    def check_concept(
        self, doc: Document, path: tuple, kind: str, fld: str, value: Any, what: str, param: str | None = None
    ) -> bool:
        """An observation concept named in a test must be defined in observations.yaml."""
        if (kind, fld) != ("observation", "concept") or value in self.concepts:
            return True
        shown = f"${param} = {value!r}" if param else repr(value)
        self.error(
            "NP005",
            doc,
            path,
            f"{what}: unknown observation concept {shown}{suggest(value, self.concepts)}; observations.yaml defines "
            f"{', '.join(self.concepts) or 'none'}",
            key=False,
        )
        return False

    # -- rules/*.yaml --

    def check_rules_file(self, doc: Document) -> None:
        if not doc.loaded:
            return
        content = doc.value if doc.value is not None else []
        if not isinstance(content, list):
            self.error(
                "NP002",
                doc,
                (),
                f"a rules file is a list of rules (each item starts with '- id:'); got {describe(content)}",
                key=False,
            )
            return
        for i, raw in enumerate(content):
            self.check_rule(doc, (i,), raw)

    def check_rule(self, doc: Document, path: tuple, raw: Any) -> None:
        if not isinstance(raw, dict):
            self.error(
                "NP002",
                doc,
                path,
                f"a rule is a mapping with id, version, title, category, when, then, rationale and evidence; got {describe(raw)}",
                key=False,
            )
            return
        self.rule_count += 1
        rid = raw.get("id") if isinstance(raw.get("id"), str) else None
        what = rid or f"the rule at line {doc.pos(path, key=False)[0]}"
        self.mapping(doc, path, raw, fmt.RULE, what)
        self.check_scalars(doc, path, raw, fmt.RULE, what)
        valid = True
        if rid is not None and fmt.RULE_ID.match(rid):
            if rid in self.rule_ids:
                odoc, opath = self.rule_ids[rid]
                self.error(
                    "NP015",
                    doc,
                    path + ("id",),
                    f"rule {rid} is already defined at {odoc.rel}:{odoc.pos(opath, key=False)[0]}",
                    key=False,
                )
            else:
                self.rule_ids[rid] = (doc, path)
        precedence = raw.get("precedence", 0)
        if (
            isinstance(precedence, bool)
            or not isinstance(precedence, int)
            or not fmt.MIN_PRECEDENCE <= precedence <= fmt.MAX_PRECEDENCE
        ):
            self.error(
                "NP002",
                doc,
                path + ("precedence",),
                f"{what}: precedence is a whole number from {fmt.MIN_PRECEDENCE} to {fmt.MAX_PRECEDENCE} (higher wins); got "
                f"{describe(precedence)}",
                key=False,
            )
            precedence, valid = 0, False
        self.check_rationale(doc, path, raw, what)
        alts = self.check_conditions(doc, path, raw, what)
        outcome = self.check_then(doc, path + ("then",), raw.get("then"), what) if "then" in raw else None
        if isinstance(raw.get("then"), dict):
            self.check_templates(doc, path + ("then",), raw["then"], alts, what)
        if rid and alts is not None and outcome is not None and valid:
            self.rules.append(RuleEntry(rid, doc, path, raw, precedence, alts, **outcome))

    def check_rationale(self, doc: Document, path: tuple, raw: dict, what: str) -> None:
        """A rule says why it exists, and each evidence entry cites its source. (A missing rationale
        is reported as a missing required key, NP011; that a rule cites evidence at all is lint's
        policy, NP011 there.)"""
        rationale = raw.get("rationale", "(absent)")
        if rationale is None or (isinstance(rationale, str) and not rationale.strip()):
            self.error("NP011", doc, path + ("rationale",), f"{what}: the rationale is empty")
        elif not isinstance(rationale, str):
            self.error(
                "NP002",
                doc,
                path + ("rationale",),
                f"{what}: rationale must be text; got {describe(rationale)}",
                key=False,
            )
        evidence = raw.get("evidence")
        if evidence is None or evidence == []:
            return
        if not isinstance(evidence, list):
            self.error(
                "NP002",
                doc,
                path + ("evidence",),
                f"{what}: evidence is a list of {{citation, strength}}; got {describe(evidence)}",
                key=False,
            )
            return
        for i, item in enumerate(evidence):
            epath = path + ("evidence", i)
            if not self.mapping(doc, epath, item, fmt.EVIDENCE, f"{what} evidence[{i}]"):  # a missing citation is NP011
                continue
            citation = item.get("citation")
            if "citation" in item and (not isinstance(citation, str) or not citation.strip()):
                self.error("NP011", doc, epath + ("citation",), f"{what} evidence[{i}] has no citation")
            self.check_scalars(doc, epath, item, fmt.EVIDENCE, f"{what} evidence[{i}]")

    def check_conditions(self, doc: Document, path: tuple, raw: dict, what: str) -> list[list[PatternEntry]] | None:
        """The alternatives of a rule, parsed; None when any pattern is broken."""
        if ("when" in raw) == ("when_any" in raw):
            if "when" in raw:
                self.error(
                    "NP001",
                    doc,
                    path + ("when_any",),
                    f"{what}: a rule has when (all patterns) or when_any (alternatives), not both",
                )
            else:
                self.error(
                    "NP001", doc, path, f"{what}: missing when (all patterns) or when_any (a list of alternatives)", key=False
                )
            return None
        if "when" in raw:
            blocks = [(path + ("when",), raw["when"])]
        else:
            items = raw["when_any"]
            if not isinstance(items, list) or not items:
                self.error(
                    "NP002",
                    doc,
                    path + ("when_any",),
                    f"{what}: when_any is a non-empty list of alternatives; got {describe(items)}",
                    key=False,
                )
                return None
            blocks = [(path + ("when_any", i), block) for i, block in enumerate(items)]
        alts: list[list[PatternEntry]] | None = []
        for bpath, block in blocks:
            if not isinstance(block, dict) or not block:
                self.error(
                    "NP002",
                    doc,
                    bpath,
                    f"{what}: a mapping of alias to pattern, e.g. {{inr: {{observation: {{concept: inr}}}}}}; got "
                    f"{describe(block)}",
                    key=False,
                )
                alts = None
                continue
            pats: list[PatternEntry] | None = []
            for alias, spec in block.items():
                if not isinstance(alias, str) or not fmt.ALIAS.match(alias):
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
                self.error(
                    "NP002",
                    doc,
                    bpath,
                    f"{what}: an alternative needs at least one positive pattern (one that is not `not:`)",
                    key=False,
                )
                alts = None
            elif alts is not None:
                alts.append(pats)
        return alts

    def check_then(self, doc: Document, tpath: tuple, then: Any, what: str) -> dict | None:
        if not self.mapping(doc, tpath, then, fmt.THEN, f"{what} then"):
            return None
        ok = True
        if not any(then.get(k) for k in fmt.OUTCOMES):
            self.error("NP001", doc, tpath, f"{what}: then needs at least one of {', '.join(fmt.OUTCOMES)}")
            ok = False
        preferred, acceptable, avoid = None, (), ()
        modality = then.get("modality")
        modalities = fmt.MODALITY.values("preferred")
        if modality is not None and self.mapping(doc, tpath + ("modality",), modality, fmt.MODALITY, f"{what} modality"):
            mpath = tpath + ("modality",)
            pref = modality.get("preferred")
            if isinstance(pref, str) and pref.startswith("$"):
                pname = pref[1:]
                if not self.param_ref(doc, mpath + ("preferred",), pname, f"{what} modality.preferred"):
                    ok = False
                else:
                    preferred = self.values.get(pname)
                    param = self.params[pname]
                    bad = [v for v in (param.allowed or (preferred,)) if v not in modalities]
                    if bad:
                        self.error(
                            "NP002",
                            doc,
                            mpath + ("preferred",),
                            f"{what}: {pref} can be {bad[0]!r}, which is not a modality ({', '.join(modalities)}); give the "
                            "parameter allowed: [...] modalities",
                            key=False,
                        )
                        ok = False
            elif pref is not None:
                if self.enum(doc, mpath + ("preferred",), pref, modalities, f"{what} modality.preferred"):
                    preferred = pref
                else:
                    ok = False
            lists = {}
            for key in ("acceptable", "avoid"):
                items = modality.get(key, [])
                if not isinstance(items, list):
                    self.error(
                        "NP002",
                        doc,
                        mpath + (key,),
                        f"{what}: modality.{key} is a list of modalities; got {describe(items)}",
                        key=False,
                    )
                    ok, items = False, []
                for i, m in enumerate(items):
                    ok = self.enum(doc, mpath + (key, i), m, fmt.MODALITY.values(key), f"{what} modality.{key}") and ok
                lists[key] = tuple(m for m in items if m in modalities)
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
                self.error(
                    "NP002",
                    doc,
                    tpath + ("injectates",),
                    f"{what}: injectates is a list of {{category, recommendation}}; got {describe(items)}",
                    key=False,
                )
                ok, items = False, []
            seen: set[str] = set()
            for i, inj in enumerate(items):
                ipath = tpath + ("injectates", i)
                if not self.mapping(doc, ipath, inj, fmt.INJECTATE, f"{what} injectates[{i}]"):
                    ok = False
                    continue
                good = (
                    self.check_scalars(doc, ipath, inj, fmt.INJECTATE, f"{what} injectates[{i}]")
                    and {"category", "recommendation"} <= inj.keys()
                )
                if good and inj["category"] in seen:
                    self.error(
                        "NP015",
                        doc,
                        ipath + ("category",),
                        f"{what}: {inj['category']} is recommended twice in one outcome",
                        key=False,
                    )
                    good = False
                if good:
                    seen.add(inj["category"])
                    injectates.append((inj["category"], inj["recommendation"]))
                ok = ok and good
        deferral = then.get("deferral")
        if deferral is not None:
            dpath = tpath + ("deferral",)
            if self.mapping(doc, dpath, deferral, fmt.DEFERRAL, f"{what} deferral"):
                good = (
                    self.check_scalars(doc, dpath, deferral, fmt.DEFERRAL, f"{what} deferral")
                    and {"reason", "severity"} <= deferral.keys()
                )
                ok = ok and good
            else:
                ok = False
        ok = self.check_scalars(doc, tpath, then, fmt.THEN, f"{what} then") and ok
        if not ok:
            return None
        return {
            "preferred": preferred,
            "acceptable": acceptable,
            "avoid": avoid,
            "injectates": injectates,
            "deferral": deferral,
            "caution": then.get("caution"),
            "missing_data": then.get("missing_data"),
        }

    def check_templates(self, doc: Document, tpath: tuple, then: dict, alts: list[list[PatternEntry]] | None, what: str) -> None:
        for key in ("message", "missing_data"):
            text = then.get(key)
            if not isinstance(text, str):
                continue
            kpath = tpath + (key,)
            for ref in TEMPLATE.findall(text):
                at = doc.find_text(kpath, "{" + ref + "}") or doc.pos(kpath, key=False)
                placeholder = parse_placeholder(ref)
                if placeholder is None:
                    self.error(
                        "NP005",
                        doc,
                        kpath,
                        f"{what} then.{key}: {{{ref}}} is not a placeholder: {{alias}}, {{alias.field}}, {{alias.when+$param}}, "
                        "{$param} or {$param.since}",
                        at=at,
                    )
                    continue
                if placeholder.param is not None:
                    if placeholder.param in self.params:
                        self.used_params.add(placeholder.param)
                        if placeholder.modifier and not isinstance(self.values.get(placeholder.param), (int, float)):
                            self.error(
                                "NP002",
                                doc,
                                kpath,
                                f"{what} then.{key}: {{{ref}}} counts days, but ${placeholder.param} is not a number",
                                at=at,
                            )
                    else:
                        self.error(
                            "NP004",
                            doc,
                            kpath,
                            f"{what} then.{key}: {{{ref}}} names no parameter{suggest(placeholder.param, self.params)}",
                            at=at,
                        )
                alias, fld = placeholder.alias, placeholder.field
                if alias is None or alts is None:  # a parameter, checked above; or no patterns to bind it
                    continue
                bound = [{p.alias: p for p in alt if not p.negated} for alt in alts]
                having = [i for i, b in enumerate(bound) if alias in b]
                if not having:
                    known = sorted({a for b in bound for a in b})
                    self.error(
                        "NP005",
                        doc,
                        kpath,
                        f"{what} then.{key}: {{{ref}}} names no matched fact; the aliases are "
                        f"{', '.join(known)}{suggest(alias, known)}",
                        at=at,
                    )
                    continue
                if len(having) < len(alts):
                    missing = next(i for i in range(len(alts)) if i not in having)
                    self.error(
                        "NP005",
                        doc,
                        kpath,
                        f"{what} then.{key}: {{{ref}}} names {alias!r}, which alternative {missing} does not match; every "
                        "alternative must bind it",
                        at=at,
                    )
                    continue
                for kind in dict.fromkeys(bound[i][alias].kind for i in having):
                    known_fields = set(self.aggregates) if kind == "summary" else set(FACT_FIELDS[kind])
                    if fld and fld not in TEMPLATE_FIELDS and fld not in known_fields:
                        self.error(
                            "NP005",
                            doc,
                            kpath,
                            f"{what} then.{key}: {{{ref}}}: {kind} has no field {fld!r}{suggest(fld, known_fields)}",
                            at=at,
                        )
