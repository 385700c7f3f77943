"""``needlepoint rules diff OLD NEW --cases DIR``: the impact of a rule-set change on real cases.

Every case under DIR is evaluated under both versions, at the same instant, and the two decisions
are compared field by field. The report says how many decisions changed and in which field, case by
case with the rules that fired differently, and grouped by rule, as Markdown, HTML or JSON, so that
it can be attached to a change review. Exit code 0 when no decision changed, 1 when some did (or a
case evaluates under one version only), 2 when the diff cannot run (bad arguments, a rule set that
does not load).

**Versions.** OLD and NEW are each a rule-set directory (``rulesets/hip-injection``), the id of a
bundled rule set (``hip-injection``), or either of them followed by ``:`` and a site overlay file
(``rulesets/hip-injection:sites/north.yaml``). ``--old-overlay FILE`` / ``--new-overlay FILE`` say
the same. So a site overlay is diffed against its base with
``needlepoint rules diff hip-injection hip-injection:north.yaml --cases DIR``.

**Inputs** (DIR is searched recursively; a single file is accepted too; hidden files are ignored):

* ``*.json``: a FHIR R4 Bundle; a CDS Hooks request (an object with ``hook`` and ``context``);
  or one evaluate request, in the form of an NDJSON line below.
* ``*.yaml`` / ``*.yml``: rule-set test cases (:mod:`needlepoint.casefile`); each case is evaluated
  at its own ``as_of`` unless ``--as-of`` is given (relative dates such as ``days_before`` stay
  resolved against the case's own ``as_of``). Their ``expect`` is ignored.
* ``*.ndjson`` / ``*.jsonl``: an export of past requests, one JSON object a line::

      {"correlationId": "r-1", "asOf": "2025-06-02T09:00:00Z", "fhirBundle": {"resourceType": "Bundle", ...}}

  ``fhirBundle`` is a Bundle object, the Bundle's JSON text, or base64 (the protobuf JSON mapping
  of ``EvaluateRequest``, whose other fields are read too: ``context`` instead of ``fhirBundle``,
  and ``order``, which overrides the patient's order as the server does). ``correlationId`` and
  ``asOf`` are optional. A line may also be a bare Bundle or a CDS Hooks request; blank lines are
  ignored.

Other files, files that cannot be read, and JSON or YAML files that are none of the above are
skipped and listed in a note. An input that is recognised but cannot be evaluated (a Bundle
without a Patient, a case with an unknown code, a line that is not JSON) is an *error case*,
listed in the report; it never stops the run.

**Instant.** ``--as-of T`` evaluates every case at T. Otherwise a case uses its own instant (a
test case's ``as_of``, a request's ``asOf``), and inputs without one use the instant the run
started; both versions always see the same instant.

**Order.** ``--target/--side/--intent`` override the injection order of FHIR inputs (Bundles,
CDS Hooks requests, exported requests), field by field, as on every road
(:func:`needlepoint.intake.apply_order`): each one given replaces the input's own, the order an
exported request carries (its logged ``order``) included, so leave them off to replay what was
decided; a field they leave empty keeps the input's. Test cases are used as written.

**What is compared.** Modality (preferred, acceptable, avoid), injectates (category ->
recommendation), deferrals (``REASON`` or ``REASON/SCOPE`` -> severity), caution codes and
missing-data codes. Decision ids, the rule set's version and digest, messages and explanation
texts are not. For each changed case the report names the rules that fired differently (only
under OLD, only under NEW, or under both with different matched facts) and, for each changed
item, the rules responsible: the rules behind the item (its ``ruleIds``) that fired differently
or whose definition changed between the versions. A case whose rules fired differently without
changing the decision is listed separately. Above the cases, the report lists what changed in the
rule set itself (parameters, rules, value sets, observation concepts, aggregates).

**Speed.** Cases are evaluated by ``--jobs`` worker processes (default: one per CPU), each loading
both rule sets once; inputs are sent in chunks of about equal size. A progress bar is drawn on
standard error when it is a terminal and the run is long (``--progress`` / ``--no-progress``
force it either way); never on standard output.

**Modules.** :mod:`.versions` (OLD and NEW), :mod:`.inputs` (the files and their cases),
:mod:`.compare` (the comparison, pure), :mod:`.run` (evaluating every case under both, in worker
processes), :mod:`.report` and :mod:`.render` (JSON, Markdown, HTML); the command line is
:mod:`needlepoint.cli_diff`.
"""

from needlepoint.authoring.diff.compare import FIELDS, CaseOutcome, Change, FiringDiff, RulesetChanges, compare, ruleset_changes
from needlepoint.authoring.diff.render import render_html, render_markdown, to_json
from needlepoint.authoring.diff.report import EXIT_CANNOT_RUN, EXIT_CHANGED, EXIT_SAME, DiffReport
from needlepoint.authoring.diff.run import run_diff
from needlepoint.authoring.diff.versions import DiffError, Version, load_version, parse_version

__all__ = [
    "EXIT_CANNOT_RUN", "EXIT_CHANGED", "EXIT_SAME", "FIELDS", "CaseOutcome", "Change", "DiffError", "DiffReport", "FiringDiff",
    "RulesetChanges", "Version", "compare", "load_version", "parse_version", "render_html", "render_markdown", "run_diff",
    "ruleset_changes", "to_json",
]  # fmt: skip
