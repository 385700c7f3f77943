"""Facts in, decision out: the one entry point of the core.

An :class:`Evaluator` owns one rule set, compiled into the engine once. ``decide`` gives the
typed decision (:mod:`.decision`), ``evaluate`` its contract JSON. Both are deterministic for
the same record, rule set digest and instant, and safe to call from many threads at once (each
call holds its own engine session).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from .compiler import compile_ruleset, rule_id_of
from .decision import Decision
from .durable import CompiledRules
from .prepare import PreparedFacts, Preparer
from .record import ObservationCodes, PatientRecord, RecordError
from .resolve import Firing, Resolver
from .ruleset import Rule, RuleSet


def format_instant(instant: dt.datetime) -> str:
    """RFC 3339 in UTC with a Z, as the protobuf JSON mapping renders a Timestamp."""
    instant = instant.astimezone(dt.timezone.utc)
    # YYYY-MM-DDTHH:MM:SS: isoformat reads as strftime does, in a third of the time, from the
    # year 1000 on (strftime does not pad earlier years to four digits)
    text = instant.isoformat()[:19] if instant.year >= 1000 else instant.strftime("%Y-%m-%dT%H:%M:%S")
    if instant.microsecond:
        text += f".{instant.microsecond:06d}".rstrip("0")
    return text + "Z"


class Evaluator:
    def __init__(self, ruleset: RuleSet, *, pool_size: int = 64):
        self.ruleset = ruleset
        self.preparer = Preparer(ruleset)
        self.engine = CompiledRules(compile_ruleset(ruleset), name=f"{ruleset.id}@{ruleset.version}", pool_size=pool_size)
        self.resolver = Resolver(ruleset)
        self._rules = {r.id: r for r in ruleset.rules}
        self._engine_names: dict[str, tuple[Rule, int]] = {}  # engine rule name -> (rule, alternative)
        # the Observations some rule reads; an adapter need not map the others (see Preparer)
        self.observation_codes: ObservationCodes = self.preparer.observation_codes

    def firings(
        self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None
    ) -> tuple[PreparedFacts, list[Firing]]:
        """The prepared facts and every rule that fired, before conflict resolution.
        ``checkpoint`` is called between the stages; it may raise to stop the evaluation (a caller
        whose deadline has passed)."""
        prepared = self.preparer.prepare(record, as_of)
        if checkpoint is not None:
            checkpoint()
        return prepared, self.run_prepared(prepared)

    def run_prepared(self, prepared: PreparedFacts) -> list[Firing]:
        """Every rule that fires on already prepared facts, with the facts each alias matched."""
        by_rule: dict[str, Firing] = {}
        repeated: list[tuple[dict[str, list[int]], str]] = []  # aliases that matched more than one fact, once each
        names = self._engine_names
        for engine_name, matched in self.engine.run(self.preparer.distinct(prepared)):
            named = names.get(engine_name)
            if named is None:  # first firing of this rule alternative: name it once
                rule_id, alternative = rule_id_of(engine_name)
                named = names[engine_name] = (self._rules[rule_id], alternative)
            rule, alternative = named
            firing = by_rule.get(rule.id)
            if firing is None:
                firing = by_rule[rule.id] = Firing(rule, {})
            aliases = firing.matched.get(alternative)
            if aliases is None:
                aliases = firing.matched[alternative] = {}
            for alias, fact in matched.items():
                ids = aliases.get(alias)
                if ids is None:
                    aliases[alias] = [fact["_fid"]]
                else:
                    ids.append(fact["_fid"])
                    if len(ids) == 2:
                        repeated.append((aliases, alias))
        for aliases, alias in repeated:  # each alias's facts once, in fact order
            aliases[alias] = sorted(set(aliases[alias]))
        return list(by_rule.values())

    def evaluate(self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None) -> dict:
        """The decision as the contract's JSON (see :meth:`decide`)."""
        return self.decide(record, as_of, checkpoint).to_json()

    def decide(self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None) -> Decision:
        """The decision as typed objects. ``checkpoint``, if given, is called between the stages
        (see :meth:`firings`)."""
        return self.decide_with_facts(record, as_of, checkpoint)[1]

    def evaluate_with_facts(
        self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None
    ) -> tuple[PreparedFacts, dict]:
        """The prepared facts and the decision's JSON (for tools that also inspect the facts)."""
        prepared, decision = self.decide_with_facts(record, as_of, checkpoint)
        return prepared, decision.to_json()

    def decide_with_facts(
        self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None
    ) -> tuple[PreparedFacts, Decision]:
        """The prepared facts and the typed decision."""
        if as_of.tzinfo is None:
            raise RecordError("asOf", "the evaluation instant needs a time zone (use UTC)")
        prepared, firings = self.firings(record, as_of, checkpoint)
        if checkpoint is not None:
            checkpoint()
        return prepared, self.resolver.decide(firings, prepared, format_instant(as_of))

    def close(self) -> None:
        self.engine.close()
