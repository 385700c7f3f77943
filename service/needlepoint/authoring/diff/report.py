"""The report of ``needlepoint rules diff``: the versions, what changed in the rule set, every case
that is not the same under both, and the summaries by field and by rule that the renderers show."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from needlepoint.authoring.diff.compare import FIELDS, CaseOutcome, RulesetChanges

EXIT_SAME = 0
EXIT_CHANGED = 1
EXIT_CANNOT_RUN = 2


@dataclass
class VersionInfo:
    label: str
    id: str
    version: str
    digest: str
    layers: tuple[str, ...]


@dataclass
class RuleSummary:
    rule: str
    title: str
    fired_differently: int = 0  # cases
    how: Counter = field(default_factory=Counter)  # how it fired differently -> cases
    decisions_changed: int = 0  # changed cases where it is responsible for a change
    fields: Counter = field(default_factory=Counter)  # field -> cases where it changed it


@dataclass
class DiffReport:
    old: VersionInfo
    new: VersionInfo
    changes: RulesetChanges
    cases_dir: str
    as_of: str | None  # --as-of
    default_as_of: str
    outcomes: list[CaseOutcome]  # every case not the same under both versions, in input order
    same: int
    skipped: list[tuple[str, str]]
    titles: dict[str, str]
    order: dict[str, int]
    jobs: int
    seconds: float
    old_seconds: float
    new_seconds: float

    def of(self, status: str) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def total(self) -> int:
        return self.same + len(self.outcomes)

    @property
    def changed(self) -> list[CaseOutcome]:
        return self.of("changed")

    @property
    def one_sided_errors(self) -> list[CaseOutcome]:
        """Cases that evaluate under one version and fail under the other: a change too."""
        return [o for o in self.of("error") if (o.old_error is None) != (o.new_error is None)]

    @property
    def exit_code(self) -> int:
        return EXIT_CHANGED if self.changed or self.one_sided_errors else EXIT_SAME

    def field_counts(self) -> dict[str, int]:
        counts = Counter(name for o in self.changed for name in {c.field for c in o.changes})
        return {name: counts[name] for name in FIELDS if counts[name]}

    def transitions(self) -> list[tuple[str, str, Any, Any, int]]:
        """(field, item, old, new, cases), most frequent first."""
        counts = Counter((c.field, c.item, c.old, c.new) for o in self.changed for c in o.changes)
        return [(*key, n) for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], FIELDS.index(kv[0][0]), kv[0][1]))]

    def by_rule(self) -> list[RuleSummary]:
        rules: dict[str, RuleSummary] = {}

        def summary(rid: str) -> RuleSummary:
            return rules.setdefault(rid, RuleSummary(rid, self.titles.get(rid, "")))

        for o in self.outcomes:
            for f in o.firings:
                s = summary(f.rule)
                s.fired_differently += 1
                s.how[f.how] += 1
            responsible: dict[str, set[str]] = {}
            for c in o.changes:
                for rid in c.rules:
                    responsible.setdefault(rid, set()).add(c.field)
            for rid, fields in responsible.items():
                s = summary(rid)
                s.decisions_changed += 1
                s.fields.update(fields)
        return sorted(
            rules.values(),
            key=lambda s: (-s.decisions_changed, -s.fired_differently, self.order.get(s.rule, len(self.order)), s.rule),
        )
