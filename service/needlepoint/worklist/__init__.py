"""``needlepoint worklist``: a referral coordinator's worklist, in plain words.

The evaluation is the batch engine's (:mod:`needlepoint.batch`): the same inputs (a folder of
Bundles, a Bulk Data export, a CSV of referrals), the same decisions on the as-of and planned
dates, the same ``toRepeat`` items, the same process pool. This package only turns each batch
result row into a worklist row a non-clinician can act on, and shows it:

* :mod:`.rows`: the plain status (ready / needs data / deferred / needs clinician review /
  cannot evaluate), the "what to do" sentences, and the reasons with their rule titles;
* :mod:`.run`: drives the batch engine on every core with a progress callback, keeping the rows;
* :mod:`.writers`: the report as self-contained HTML, CSV or XLSX;
* :mod:`.html`: the table, its styles and its script, shared by the HTML report and the page;
* :mod:`.web`: the worklist page (upload, progress, sort/filter/search/export, explanations),
  a Starlette app mounted into ``needlepoint serve --http-port`` and run alone by
  ``needlepoint worklist --serve``.
"""
