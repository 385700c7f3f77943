"""Seeded random patients for differential, concurrency and benchmark runs.

Values cluster around the rule set's thresholds so that both sides of every boundary occur, and
a share of the data is deliberately broken (no unit, unknown unit, no date, missing side or
intent) so that the data-quality paths are exercised too.
"""

from __future__ import annotations

import datetime as dt
import random

from needlepoint.core.record import (
    Allergy,
    Code,
    Condition,
    InjectionOrder,
    Medication,
    Observation,
    PatientRecord,
    PlannedInjectate,
    PlannedSurgery,
    PriorInjection,
)

AS_OF = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.timezone.utc)

MEDICATIONS = [
    ("rxnorm", "855332"), ("atc", "B01AA03"), ("rxnorm", "1364430"), ("rxnorm", "309362"), ("rxnorm", "243670"),
    ("atc", "B01AB05"), ("atc", "A10AE04"), ("rxnorm", "860975"), ("atc", "J01CA04"), ("rxnorm", "849574"),
]  # fmt: skip
CONDITIONS = [
    ("icd10cm", "M16.11"), ("snomed", "239872002"), ("icd10cm", "M70.61"), ("icd10cm", "M54.16"), ("icd10cm", "E11.9"),
    ("icd10cm", "N18.4"), ("icd10cm", "K74.60"), ("icd10cm", "D66"), ("icd10cm", "Z33.1"), ("icd10cm", "L03.115"),
    ("icd10cm", "A41.9"), ("icd10cm", "M00.851"), ("icd10cm", "Z96.641"), ("icd10cm", "T84.50XA"), ("icd10cm", "Z95.2"),
    ("icd10cm", "M08.051"), ("icd10cm", "Z68.41"), ("icd10cm", "Z91.041"), ("icd10cm", "G57.11"), ("snomed", "15777000"),
]  # fmt: skip
OBSERVATIONS = [  # (loinc, unit, low, high)
    ("6301-6", "{INR}", 1.0, 4.5), ("777-3", "10*3/uL", 5, 80), ("8310-5", "Cel", 36.5, 39.5), ("8310-5", "[degF]", 97, 103),
    ("2339-0", "mg/dL", 80, 400), ("14749-6", "mmol/L", 4, 22), ("4548-4", "%", 5.0, 11.5), ("59261-8", "mmol/mol", 35, 100),
    ("39156-5", "kg/m2", 25, 50), ("33914-3", "mL/min/{1.73_m2}", 15, 90), ("1988-5", "mg/L", 1, 60), ("4537-7", "mm/h", 5, 80),
    ("6690-2", "10*3/uL", 4, 20), ("21198-7", "m[IU]/mL", 0, 60), ("np-obs:conservative-therapy-duration", "wk", 1, 12),
]  # fmt: skip
ALLERGENS = [
    ("atc", "V08AB02"),
    ("snomed", "300913006"),
    ("atc", "H02AB08"),
    ("atc", "N01BB02"),
    ("atc", "N01BA02"),
    ("snomed", "91930004"),
]
INJECTATES = [
    "corticosteroid",
    "local-anesthetic",
    "hyaluronic-acid",
    "platelet-rich-plasma",
    "iodinated-contrast",
    "gadolinium-contrast",
]
TARGETS = ["hip-intra-articular", "hip-intra-articular", "greater-trochanteric-bursa", "iliopsoas-bursa", "gluteal-tendon"]


def _code(pair: tuple[str, str]) -> Code:
    return Code(pair[0], pair[1])


def random_patient(rng: random.Random, as_of: dt.datetime = AS_OF) -> PatientRecord:
    def ago(max_days: float) -> dt.datetime:
        return as_of - dt.timedelta(days=rng.uniform(0, max_days))

    rec = PatientRecord(sex=rng.choice(["female", "male", "female", "unknown"]))
    if rng.random() < 0.95:
        rec.birth_date = (as_of - dt.timedelta(days=rng.uniform(8, 90) * 365.25)).date()
    rec.conditions = [Condition([_code(c)]) for c in rng.sample(CONDITIONS, rng.randint(0, 4))]
    rec.medications = [Medication([_code(m)]) for m in rng.sample(MEDICATIONS, rng.randint(0, 3))]
    for loinc, unit, low, high in rng.sample(OBSERVATIONS, rng.randint(0, 6)):
        system, code = ("np-obs", loinc.split(":", 1)[1]) if loinc.startswith("np-obs:") else ("loinc", loinc)
        roll = rng.random()
        rec.observations.append(
            Observation(
                codes=[Code(system, code)],
                effective=None if roll < 0.03 else ago(rng.choice([1, 3, 10, 40, 400])),
                value=round(rng.uniform(low, high), 1),
                unit=None if 0.03 <= roll < 0.06 else ("furlongs" if 0.06 <= roll < 0.08 else unit),
            )
        )
    if rng.random() < 0.15:
        rec.observations.append(
            Observation(
                [Code("loinc", "82810-3")], ago(2), value_code=Code("snomed", rng.choice(["77386006", "60001007", "261665006"]))
            )
        )
    for allergen in rng.sample(ALLERGENS, rng.randint(0, 2)):
        rec.allergies.append(Allergy([_code(allergen)], severity=rng.choice([None, "mild", "moderate", "severe"])))
    for _ in range(rng.choice([0, 0, 1, 2, 4])):
        rec.prior_injections.append(
            PriorInjection(
                [Code("cpt", "20610")],
                ago(rng.choice([60, 120, 400])),
                target=rng.choice(TARGETS + [None]),
                side=rng.choice(["left", "right", "both", None]),
                agents=[Code("rxnorm", rng.choice(["10759", "6387"]))],
            )
        )
    if rng.random() < 0.2:
        rec.planned_surgeries.append(
            PlannedSurgery(
                [Code("cpt", "27130")], as_of + dt.timedelta(days=rng.uniform(-10, 250)), side=rng.choice(["left", "right", None])
            )
        )
    rec.order = InjectionOrder(
        target=rng.choice(TARGETS),
        side=rng.choice(["left", "right", "both", "right", "left", None]),
        intent=rng.choice(["diagnostic", "therapeutic", "diagnostic-and-therapeutic", "arthrography", "therapeutic", None]),
        codes=[Code("cpt", c) for c in rng.sample(["20610", "77002", "20611", "27093"], rng.randint(0, 1))],
        reasons=[_code(c) for c in rng.sample(CONDITIONS[:4], rng.randint(0, 1))],
    )
    rec.planned_injectates = [PlannedInjectate([Code("np-injectate", c)]) for c in rng.sample(INJECTATES, rng.randint(0, 2))]
    rec.flags = rng.sample(
        ["suspected-septic-joint", "ultrasound-failed", "hot-painful-joint", "non-weight-bearing"], rng.choice([0, 0, 0, 1, 2])
    )
    return rec


def random_patients(n: int, seed: int = 7) -> list[PatientRecord]:
    rng = random.Random(seed)
    return [random_patient(rng) for _ in range(n)]
