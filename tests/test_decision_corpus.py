"""Every answer of the recorded corpus (tests/decision_corpus.py) is byte-identical today.

The corpus was recorded before the rule-set front end and the request path were rebuilt; a
refactor or a speed-up that changes one byte of one decision fails here, with the difference.
"""

from __future__ import annotations

import difflib

import pytest

from . import decision_corpus
from .real_records import bundle_paths


@pytest.fixture(scope="module")
def answers() -> dict[str, dict[str, str]]:
    return decision_corpus.compute()


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, str]]:
    return decision_corpus.load()


def _difference(item_id: str, now: dict[str, str] | None, then: dict[str, str] | None) -> str:
    if now is None or then is None:
        return f"{item_id}: {'no longer produced' if now is None else 'not in the recording'}"
    if "json" not in now or "json" not in then:
        return f"{item_id}: was {then}, is {now}"
    if now["json"] == then["json"]:
        return f"{item_id}: same JSON, protobuf bytes differ ({then['proto'][:12]} -> {now['proto'][:12]})"
    diff = difflib.unified_diff(then["json"].splitlines(), now["json"].splitlines(), "recorded", "now", lineterm="", n=2)
    return f"{item_id}:\n" + "\n".join(list(diff)[:40])


def test_the_corpus_covers_generated_patients_and_every_synthea_bundle(recorded: dict[str, dict[str, str]]) -> None:
    assert sum(k.startswith("generated:") for k in recorded) == decision_corpus.GENERATED
    assert sum(k.startswith("bundle:") for k in recorded) == decision_corpus.BUNDLES
    if not bundle_paths():
        pytest.skip("../shared/fixtures is not beside the repository")
    assert sum(k.endswith("@2025-06-02") for k in recorded) == len(bundle_paths())


def test_every_answer_is_byte_identical_to_the_recording(
    answers: dict[str, dict[str, str]], recorded: dict[str, dict[str, str]]
) -> None:
    if not bundle_paths():
        recorded = {k: v for k, v in recorded.items() if "@" not in k}
    changed = sorted(k for k in answers.keys() | recorded.keys() if answers.get(k) != recorded.get(k))
    assert not changed, f"{len(changed)} of {len(recorded)} answers changed:\n\n" + "\n\n".join(
        _difference(k, answers.get(k), recorded.get(k)) for k in changed[:3]
    )
