"""``needlepoint batch``: a worklist of referrals evaluated in bulk.

Inputs a coordinator can produce (:mod:`.referrals`): a folder of FHIR Bundles, a FHIR Bulk Data
export (:mod:`.bulk` groups its NDJSON resources into one Bundle per patient), or a CSV of
referrals pointing at either. Each referral is evaluated now and on its planned date, and the
results that will be too old by then are listed with the dates to repeat them (:mod:`.evaluate`).
Two engines give the same rows byte for byte: :mod:`.local` (a process pool on this machine) and
:mod:`.spark` (PySpark, ``local[*]`` or a cluster). :mod:`.output` writes NDJSON or Parquet,
sorted by referral id.
"""
