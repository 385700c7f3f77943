"""Code shapes: is a code well-formed for its system? ICD-10-CM, LOINC (with its mod-10 check
digit), RxNorm, ATC, SNOMED CT (shape, partition, Verhoeff check digit), CPT and the np-*
vocabularies; and codes that YAML reads as a different number (``00100`` becomes 64). The
shapes themselves are declared in :mod:`needlepoint.rulesets.format` (the JSON Schemas use them
too); lint reports what is wrong as NP006."""

from __future__ import annotations

import re

from needlepoint.rulesets.diagnostics import ERROR, WARNING, suggest
from needlepoint.rulesets.format import CODE_PATTERNS, CODE_SHAPES, CODE_VOCABULARIES, PREFIX_PATTERNS


def article(phrase: str) -> str:
    """The phrase with its indefinite article (by sound for the code-system names)."""
    an = phrase[:1].lower() in "aeiou" or phrase.split(" ", maxsplit=1)[0] in (
        "icd10cm",
        "rxnorm",
        "snomed",
        "np-target",
        "np-intent",
        "np-injectate",
        "np-flag",
        "np-obs",
    )
    return f"{'an' if an else 'a'} {phrase}"


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
            return ERROR, f"not {article(system)} code{suggest(code, allowed)}; known: {', '.join(allowed)}"
        return None
    pattern = (PREFIX_PATTERNS if prefix else CODE_PATTERNS).get(system)
    if pattern is None:
        return None
    if not re.fullmatch(pattern, code):
        return ERROR, f"not {article(system)} {'prefix' if prefix else 'code'}: expected {CODE_SHAPES[system]}"
    if system == "snomed":
        partition = code[-3:-1]
        if partition not in ("00", "10"):
            kind = {"01": "a description", "11": "a description", "02": "a relationship", "12": "a relationship"}.get(
                partition, "not a concept"
            )
            return ERROR, f"partition identifier {partition} marks {kind} id; a value set lists concept ids (partition 00 or 10)"
        if not verhoeff_valid(code):
            return ERROR, "the Verhoeff check digit is wrong (a mistyped or truncated SCTID)"
    if system == "loinc":
        number, _, check = code.partition("-")
        expected = loinc_check_digit(number)
        if expected is None:  # (the pattern above already rules this out)
            return ERROR, f"not a loinc code: expected {CODE_SHAPES['loinc']}"
        if check != str(expected):
            return WARNING, f"the mod-10 check digit should be {expected} ({number}-{expected}); verify the code"
    return None

