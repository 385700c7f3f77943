"""Each durable-rules 2.0.28 defect the design can meet: proof that the defect is real in the raw
engine (so these tests can fail), and proof that the service is not exposed to it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import durable_rules_engine as raw
import orjson
import pytest

from needlepoint.core.compiler import compile_ruleset
from needlepoint.core.durable import MAX_FACT_PROPERTIES, CompiledRules, EngineError, SidPool, fnv1a_32
from needlepoint.core.evaluator import Evaluator
from needlepoint.core.record import Code, Condition, InjectionOrder, PatientRecord
from needlepoint.core.ruleset import RuleSetError
from needlepoint.rulesets import build_ruleset

from .patients import AS_OF, random_patients

COLLIDING = ("enc-1062789", "enc-1279192")  # the pair our engine study found


def _drain(handle: int, offset: int) -> list[str]:
    fired = []
    result = raw.start_action_for_state(handle, offset)
    actions = result[1] if result else None
    while actions:
        fired += list(orjson.loads(actions))
        actions = raw.complete_and_start_action(handle, offset)
    return fired


def _run_python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120, check=False
    )


# --- B3: sessions are keyed by a 32-bit hash of the sid ------------------------------------


def test_fnv_matches_the_engines_session_hash() -> None:
    assert fnv1a_32(COLLIDING[0]) == fnv1a_32(COLLIDING[1]) == 0xFA9DB60B


def test_colliding_sids_really_mix_patients_in_the_raw_engine() -> None:
    rules = {"join": {"all": [{"a": {"kind": "warfarin"}}, {"b": {"kind": "inr"}}]}, "__session": {"all": [{"m": {"$s": 1}}]}}
    handle = raw.create_ruleset("collide", orjson.dumps(rules).decode())
    try:
        _, off_a = raw.assert_facts(handle, orjson.dumps([{"sid": COLLIDING[0], "kind": "warfarin"}]).decode())
        fired_a = _drain(handle, off_a)
        _, off_b = raw.assert_facts(handle, orjson.dumps([{"sid": COLLIDING[1], "kind": "inr"}]).decode())
        fired_b = _drain(handle, off_b)
        assert "join" in fired_a + fired_b, "patient A's warfarin joined patient B's INR"
    finally:
        raw.delete_state(handle, COLLIDING[0])
        raw.delete_ruleset(handle)


def test_sid_pool_never_hands_out_colliding_sids() -> None:
    pool = SidPool(size=3, candidates=[COLLIDING[0], COLLIDING[1], "a", "b"])
    sids = [pool.acquire() for _ in range(3)]
    assert COLLIDING[1] not in sids
    assert len({fnv1a_32(s) for s in sids}) == 3


def test_default_pool_hashes_are_distinct() -> None:
    pool = SidPool(size=256)
    sids = [pool.acquire() for _ in range(256)]
    assert len({fnv1a_32(s) for s in sids}) == 256


# --- B1: delete_state on a session where nothing fired ---------------------------------------

_NOTHING_FIRES = """
    import durable_rules_engine as d, orjson, sys
    rules = {"r": {"all": [{"m": {"$and": [{"t": "x"}, {"v": 1}]}}]}}
    if sys.argv[-1] == "sentinel":
        from needlepoint.core.durable import CompiledRules
        engine = CompiledRules(rules)
        for i in range(300):
            assert engine.run([{"t": "y", "v": 2, "_fid": 0}]) == []
    else:
        h = d.create_ruleset("t", orjson.dumps(rules).decode())
        for i in range(300):
            rc, off = d.assert_facts(h, orjson.dumps([{"sid": f"s{i}", "t": "y", "v": 2}]).decode())
            res = d.start_action_for_state(h, off)
            d.delete_state(h, f"s{i}")
    print("survived")
"""
_PERTURB = {"GLIBC_TUNABLES": "glibc.malloc.perturb=165"}  # makes the uninitialised free deterministic


def test_raw_delete_state_after_nothing_fired_crashes() -> None:
    proc = _run_python(_NOTHING_FIRES.replace("sys.argv[-1]", "'raw'"), _PERTURB)
    assert proc.returncode != 0 and "survived" not in proc.stdout


def test_sentinel_rule_makes_sessions_where_nothing_fires_safe() -> None:
    proc = _run_python(_NOTHING_FIRES.replace("sys.argv[-1]", "'sentinel'"), _PERTURB)
    assert proc.returncode == 0, proc.stderr
    assert "survived" in proc.stdout


# The adapter's failure path: a session where nothing fired is deleted because its retraction
# failed. The sentinel rule is what makes that delete safe; without it the same code crashes.
_FAILED_RETRACTION = """
    import needlepoint.core.durable as engine_module
    from needlepoint.core.durable import CompiledRules
    engine = CompiledRules({"r": {"all": [{"m": {"$and": [{"t": "x"}, {"v": 1}]}}]}}, pool_size=1, sentinel=SENTINEL)
    engine_module._dre.retract_facts = lambda handle, payload: (5, 0)  # every retraction fails
    for i in range(300):
        assert engine.run([{"t": "y", "v": 2, "_fid": 0}]) == []  # nothing fires; the session is deleted
    print("survived")
"""


def test_without_the_sentinel_the_failure_path_crashes() -> None:
    proc = _run_python(_FAILED_RETRACTION.replace("SENTINEL", "False"), _PERTURB)
    assert proc.returncode != 0 and "survived" not in proc.stdout


def test_with_the_sentinel_the_failure_path_is_safe() -> None:
    proc = _run_python(_FAILED_RETRACTION.replace("SENTINEL", "True"), _PERTURB)
    assert proc.returncode == 0, proc.stderr
    assert "survived" in proc.stdout


# --- reserved fields, and no session id is ever lost ---------------------------------------------


@pytest.mark.parametrize("field", ["id", "sid"])
def test_a_fact_with_a_reserved_field_is_refused_before_the_engine_sees_it(field: str) -> None:
    engine = CompiledRules({"r": {"all": [{"m": {"k": "good"}}]}}, pool_size=1)
    with pytest.raises(EngineError, match="reserved field"):
        engine.run([{"k": "good", field: "x", "_fid": 0}])
    assert [n for n, _ in engine.run([{"k": "good", "_fid": 0}])] == ["r"]


def test_a_fact_the_engine_cannot_be_sent_does_not_leak_its_session() -> None:
    engine = CompiledRules({"r": {"all": [{"m": {"k": "good"}}]}}, pool_size=1, )
    for _ in range(engine.pool.limit + 5):  # more failures than there are sessions to lose
        with pytest.raises(EngineError):
            engine.run([{"k": object(), "_fid": 0}])  # orjson cannot encode it
    assert [n for n, _ in engine.run([{"k": "good", "_fid": 0}])] == ["r"]


def test_the_pool_never_waits_and_refuses_past_its_limit() -> None:
    pool = SidPool(1, limit=2)
    first, second = pool.acquire(), pool.acquire()  # the second is minted on demand
    assert fnv1a_32(first) != fnv1a_32(second)
    with pytest.raises(EngineError, match="in use"):
        pool.acquire()  # at once, not after a timeout
    pool.release(first)
    assert pool.acquire() == first


def test_a_retired_sid_is_given_back_even_when_no_replacement_can_be_minted() -> None:
    pool = SidPool(1, limit=2, candidates=["a", "b"])
    first, second = pool.acquire(), pool.acquire()
    pool.retire(first)  # its replacement would be a third candidate: there is none
    pool.retire(second)
    # nothing is free and nothing can be minted, but both sids were counted back in: the pool
    # says so, rather than "all 2 engine sessions are in use" as a leaked count would
    with pytest.raises(EngineError, match="candidates exhausted"):
        pool.acquire()


@pytest.mark.parametrize("name", ["t", "id", "sid"])
def test_an_aggregate_named_after_a_reserved_field_is_refused(name: str) -> None:
    docs = _documents([_rule("CAU-PROBE", {"s": {"summary": {}}})])
    docs["aggregates"] = {name: {"count": "condition", "description": "probe"}}
    with pytest.raises(RuleSetError, match="reserved by the engine") as caught:
        build_ruleset(docs)
    assert caught.value.where == f"aggregates.yaml.{name}"


# --- B5: large value sets and long equality lists hang the engine -----------------------------


def _documents(rules: list, value_sets: dict | None = None) -> dict:
    return {
        "ruleset": {"id": "probe", "version": "1.0.0", "title": "probe", "validation": "test only"},
        "parameters": {},
        "value_sets": value_sets or {},
        "observations": {},
        "aggregates": {},
        "rules": [(f"rules.yaml:{i}", r) for i, r in enumerate(rules)],
    }


def _rule(rule_id: str, when: dict) -> dict:
    return {
        "id": rule_id,
        "version": "1.0.0",
        "title": rule_id,
        "category": "caution",
        "when": when,
        "then": {"caution": rule_id, "message": "m"},
        "rationale": "r",
    }


def test_a_five_thousand_code_value_set_costs_the_engine_one_test() -> None:
    codes = [f"{100000 + i}" for i in range(5000)]
    ruleset = build_ruleset(
        _documents(
            [_rule("CAU-BIG-SET", {"c": {"condition": {"code": {"in": "big"}}}})],
            {"big": {"title": "big", "codes": {"snomed": codes}}},
        )
    )
    definition = compile_ruleset(ruleset)
    assert len(orjson.dumps(definition)) < 400  # the codes never reach the engine
    evaluator = Evaluator(ruleset)
    hit = PatientRecord(
        conditions=[Condition([Code("snomed", codes[4321])])], order=InjectionOrder("hip-intra-articular", "left", "therapeutic")
    )
    miss = PatientRecord(
        conditions=[Condition([Code("snomed", "99")])], order=InjectionOrder("hip-intra-articular", "left", "therapeutic")
    )
    assert [e["ruleId"] for e in evaluator.evaluate(hit, AS_OF).get("explanations", [])] == ["CAU-BIG-SET"]
    assert "explanations" not in evaluator.evaluate(miss, AS_OF)


def test_too_many_equality_tests_are_refused_at_compile_time_not_hung_on() -> None:
    flags = [f"flag-{i}" for i in range(450)]
    ruleset = build_ruleset(_documents([_rule("CAU-MANY", {"f": {"flag": {"name": {"in": flags}}}})]))
    with pytest.raises(RuleSetError, match="distinct equality tests"):
        compile_ruleset(ruleset)


# --- B7: a fact with more than 254 properties truncates the batch -----------------------------


def test_raw_engine_silently_drops_facts_after_an_oversized_one() -> None:
    code = """
        import durable_rules_engine as d, orjson
        rules = {"r": {"all": [{"m": {"k": "good"}}]}, "__session": {"all": [{"m": {"$s": 1}}]}}
        h = d.create_ruleset("t", orjson.dumps(rules).decode())
        big = {"sid": "s", "k": "big", **{f"p{i}": i for i in range(300)}}
        rc, off = d.assert_facts(h, orjson.dumps([{"sid": "s", "k": "x"}, big, {"sid": "s", "k": "good"}]).decode())
        res = d.start_action_for_state(h, off); fired = []
        a = res[1] if res else None
        while a:
            fired += list(orjson.loads(a)); a = d.complete_and_start_action(h, off)
        print("good fired" if "r" in fired else "good dropped")
    """
    proc = _run_python(code)
    assert "good dropped" in proc.stdout, proc.stdout + proc.stderr


def test_engine_adapter_refuses_an_oversized_fact_before_the_engine_sees_it() -> None:
    engine = CompiledRules({"r": {"all": [{"m": {"k": "good"}}]}})
    big = {"k": "big", **{f"p{i}": i for i in range(MAX_FACT_PROPERTIES + 1)}}
    with pytest.raises(EngineError, match="properties"):
        engine.run([big, {"k": "good"}])
    assert [name for name, _ in engine.run([{"k": "good", "_fid": 0}])] == ["r"]  # the pool is intact
    # The engine flattens nested objects, so their leaves count: few keys, too many properties.
    nested = {"k": "big", "n": {f"p{i}": i for i in range(MAX_FACT_PROPERTIES)}}
    with pytest.raises(EngineError, match=f"{MAX_FACT_PROPERTIES + 1} properties"):
        engine.run([nested])
    # a nested fact within the limit, and a flat one at it, are asserted as any other
    small = {"k": "good", "_fid": 0, "n": {f"p{i}": i for i in range(MAX_FACT_PROPERTIES - 3)}}
    full = {"k": "good", "_fid": 1, **{f"p{i}": i for i in range(MAX_FACT_PROPERTIES - 2)}}
    assert [name for name, _ in engine.run([small, full])] == ["r", "r"]


# --- negations: a blocked negation in one rule suppresses another rule's negation -------------


def test_raw_engine_negation_crosstalk_between_rules() -> None:
    rules = {
        "A": {
            "all": [
                {"o": {"$and": [{"t": "order"}, {"ia": True}]}},
                {"n$not": {"$and": [{"t": "order"}, {"intent": "arthrography"}]}},
            ]
        },
        "B": {
            "all": [
                {"o": {"$and": [{"t": "order"}, {"intent": "therapeutic"}]}},
                {"n$not": {"$and": [{"t": "condition"}, {"oa": 1}]}},
            ]
        },
        "__session": {"all": [{"m": {"$s": 1}}]},
    }
    handle = raw.create_ruleset("negation", orjson.dumps(rules).decode())
    try:
        facts = [
            {"sid": "n1", "t": "order", "ia": True, "intent": "therapeutic", "_fid": 0},
            {"sid": "n1", "t": "condition", "oa": 1, "_fid": 1},
        ]
        _, offset = raw.assert_facts(handle, orjson.dumps(facts).decode())
        fired = _drain(handle, offset)
        raw.delete_state(handle, "n1")
    finally:
        raw.delete_ruleset(handle)
    # Correct semantics: A fires (no arthrography order), B does not (the condition exists).
    assert set(fired) - {"__session"} != {"A"}, "the engine no longer has the defect; the workaround can go"


def test_evaluator_is_not_exposed_to_the_negation_crosstalk() -> None:
    docs = _documents(
        [
            _rule("CAU-A", {"o": {"order": {"intra_articular": True}}, "n": {"not": {"order": {"intent": "arthrography"}}}}),
            _rule("CAU-B", {"o": {"order": {"intent": "therapeutic"}}, "n": {"not": {"condition": {"code": {"in": "oa"}}}}}),
        ],
        {"oa": {"title": "oa", "codes": {"icd10cm": {"prefixes": ["M16"]}}}},
    )
    evaluator = Evaluator(build_ruleset(docs))
    record = PatientRecord(
        conditions=[Condition([Code("icd10cm", "M16.11")])], order=InjectionOrder("hip-intra-articular", "left", "therapeutic")
    )
    fired = [e["ruleId"] for e in evaluator.evaluate(record, AS_OF)["explanations"]]
    assert fired == ["CAU-A"]


# --- threads: no cross-talk between patients evaluated at the same time ---------------------


def test_concurrent_evaluations_get_exactly_the_single_thread_answers(hip_evaluator) -> None:
    patients = random_patients(400, seed=11)
    expected = [hip_evaluator.evaluate(p, AS_OF) for p in patients]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for _ in range(3):
                for i in range(offset, len(patients), 8):
                    decision = hip_evaluator.evaluate(patients[i], AS_OF)
                    if i in results and results[i] != decision:
                        raise AssertionError(f"patient {i} answered differently on a repeat")
                    results[i] = decision
        except BaseException as exc:  # noqa: BLE001 - surfaced below, in the test's thread
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave threads between every C call
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    mismatches = [i for i, d in enumerate(expected) if results[i] != d]
    assert mismatches == []


# --- session reuse: a session is empty between patients, and a suspect one is never reused ---


def test_reused_sessions_hold_nothing_between_patients(hip_evaluator) -> None:
    engine = hip_evaluator.engine
    for patient in random_patients(200, seed=5):
        hip_evaluator.evaluate(patient, AS_OF)
    sids = [engine.pool.acquire() for _ in range(engine.pool.size)]
    try:
        used = [sid for sid in sids if sid in engine._started]
        assert used, "the pool was exercised"
        for sid in used:
            assert [f for f in engine.session_facts(sid) if "$s" not in f] == []
    finally:
        for sid in sids:
            engine.pool.release(sid)


def test_a_failed_retraction_retires_the_session(monkeypatch) -> None:
    engine = CompiledRules({"r": {"all": [{"m": {"k": "good"}}]}}, pool_size=1)
    first = engine.pool.acquire()
    engine.pool.release(first)
    assert [n for n, _ in engine.run([{"k": "good", "_fid": 0}])] == ["r"]
    import needlepoint.core.durable as engine_module

    monkeypatch.setattr(engine_module._dre, "retract_facts", lambda handle, payload: (5, 0))
    engine.run([{"k": "good", "_fid": 0}])
    monkeypatch.undo()
    replacement = engine.pool.acquire()
    assert replacement != first  # the suspect session's sid is gone for good
    engine.pool.release(replacement)
    assert [n for n, _ in engine.run([{"k": "good", "_fid": 0}])] == ["r"]


def test_the_reused_session_holds_no_fact_of_the_previous_patient(hip_ruleset) -> None:
    """The pool hands the session just released to the next evaluation. Each patient's decision
    must be the same whether the session's previous patient was empty or the fullest record of
    the sample (one that fires many rules): a fact left behind would fire rules for the next."""
    evaluator = Evaluator(hip_ruleset, pool_size=1)
    patients = random_patients(80, seed=23)
    fullest = max(patients, key=lambda p: len(evaluator.evaluate(p, AS_OF).get("explanations", [])))
    empty = PatientRecord(order=InjectionOrder("hip-intra-articular", "right", "therapeutic"))
    sid = evaluator.engine.pool.acquire()
    evaluator.engine.pool.release(sid)
    try:
        for patient in patients:
            evaluator.evaluate(empty, AS_OF)
            after_empty = evaluator.evaluate(patient, AS_OF)
            evaluator.evaluate(fullest, AS_OF)
            after_fullest = evaluator.evaluate(patient, AS_OF)
            assert after_fullest == after_empty
        assert evaluator.engine.pool.acquire() == sid  # one session served every evaluation
        evaluator.engine.pool.release(sid)
        assert [f for f in evaluator.engine.session_facts(sid) if "$s" not in f] == []
    finally:
        evaluator.close()


def test_the_pool_hands_out_the_most_recently_released_session_first() -> None:
    pool = SidPool(3)
    a, b, c = pool.acquire(), pool.acquire(), pool.acquire()
    pool.release(b)
    pool.release(a)
    assert pool.acquire() == a
    assert pool.acquire() == b
    pool.release(c)
    pool.retire(b)  # a retired sid's replacement is cold: it comes after the warm ones
    assert pool.acquire() == c
    assert pool.acquire() not in (a, b, c)
