"""The engine against the reference interpreter: for seeded random patients, durable-rules must
fire exactly the rules, and match exactly the facts, that the Python semantics say it should."""

from __future__ import annotations

import pytest

from needlepoint.core.conditions import alternative_matches

from .patients import AS_OF, random_patients


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_engine_fires_what_the_reference_semantics_say(hip_evaluator, seed: int) -> None:
    ruleset = hip_evaluator.ruleset
    params = ruleset.param_values()
    checked_firings = 0
    for n, patient in enumerate(random_patients(250, seed=seed)):
        prepared, firings = hip_evaluator.firings(patient, AS_OF)
        # the engine sees one of each class of facts the rules cannot tell apart (Preparer.distinct)
        record_facts = [f for f in hip_evaluator.preparer.distinct(prepared) if f["t"] != "absent"]
        engine = {f.rule.id: f for f in firings}
        for rule in ruleset.rules:
            reference = {}
            for i, alternative in enumerate(rule.alternatives):
                matched = alternative_matches(alternative, record_facts, params)
                if matched is not None:
                    reference[i] = {alias: sorted(f["_fid"] for f in facts) for alias, facts in matched.items()}
            if not reference:
                assert rule.id not in engine, f"patient {n}: engine fired {rule.id}, reference did not"
                continue
            assert rule.id in engine, f"patient {n}: reference fires {rule.id}, engine did not"
            got = {
                i: {a: ids for a, ids in aliases.items() if a in reference.get(i, {})}
                for i, aliases in engine[rule.id].matched.items()
            }
            assert got == reference, f"patient {n}: {rule.id} matched different facts"
            checked_firings += 1
    assert checked_firings > 500  # the generator really exercises the rules


@pytest.mark.parametrize("seed", [31, 32])
def test_facts_that_are_alike_change_no_outcome(hip_evaluator, seed: int) -> None:
    """Asserting one fact of each alike class fires exactly the rules and alternatives that
    asserting every fact fires, and gives the same decision apart from which fact is named."""
    engine = hip_evaluator.engine
    resolved = 0
    for n, patient in enumerate(random_patients(250, seed=seed)):
        prepared = hip_evaluator.preparer.prepare(patient, AS_OF)
        every = sorted({name for name, _ in engine.run(prepared.facts)})
        distinct = hip_evaluator.preparer.distinct(prepared)
        assert sorted({name for name, _ in engine.run(distinct)}) == every, f"patient {n}"
        resolved += len(distinct) < len(prepared.facts)
    assert resolved > 20  # the generator really makes alike facts


def test_compiled_matchers_agree_with_the_reference_interpreter(hip_evaluator) -> None:
    from needlepoint.core.conditions import compile_matcher, pattern_matches

    ruleset = hip_evaluator.ruleset
    params = ruleset.param_values()
    patterns = [p for r in ruleset.rules for alt in r.alternatives for p in alt]
    patterns += [p for a in ruleset.aggregates for p in a.patterns]
    facts = [f for patient in random_patients(150, seed=8) for f in hip_evaluator.preparer.prepare(patient, AS_OF).facts]
    agreements = 0
    for pattern in patterns:
        match = compile_matcher(pattern, params)
        for fact in facts:
            if fact["t"] == pattern.kind:
                assert match(fact) == pattern_matches(pattern, fact, params), (pattern, fact)
                agreements += match(fact)
    assert agreements > 1000  # both outcomes were exercised, not only "no match"


def test_a_compiled_signature_answers_each_test_as_the_reference_interpreter(hip_evaluator) -> None:
    """compile_signature gives, in one call, the tags, each test's answer and the asked values."""
    from needlepoint.core.conditions import FieldTest, compile_signature, test_holds

    ruleset = hip_evaluator.ruleset
    params = ruleset.param_values()
    facts = [f for patient in random_patients(150, seed=8) for f in hip_evaluator.preparer.prepare(patient, AS_OF).facts]
    by_kind: dict[str, dict[FieldTest, str]] = {}
    for rule in ruleset.rules:
        for alternative in rule.alternatives:
            for pattern in alternative:
                for test in pattern.tests:
                    by_kind.setdefault(pattern.kind, {}).setdefault(test, pattern.alias)
    checked = 0
    for kind, tests in by_kind.items():
        fields = sorted({t.field for t in tests})
        signature = compile_signature([(alias, test) for test, alias in tests.items()], fields, params)
        for fact in facts:
            if fact["t"] == kind:
                expected = (
                    tuple(fact.get("_tags", ())),
                    tuple(test_holds(test, fact, params) for test in tests),
                    tuple(fact.get(name) for name in fields),
                )
                assert signature(fact) == expected, (kind, fact)
                checked += 1
    assert checked > 1000
