"""The gRPC server: ``needlepoint.v1.DecisionService`` over the core.

* :mod:`.convert`: wire messages <-> core objects (PatientContext <-> PatientRecord, decision dict
  -> Decision, RuleSet -> Ruleset);
* :mod:`.errors`: failures -> gRPC statuses with google.rpc details;
* :mod:`.engine`: loaded rule sets and the evaluation of one EvaluateRequest (also used by the CLI);
* :mod:`.servicer`: the grpc.aio servicer, with health and reflection;
* :mod:`.worker`: one serving process;
* :mod:`.supervisor`: N worker processes on one port, replaced when they die; the rule-set catalog;
* :mod:`.reload`: rule-set versions, snapshots, validation and the one watcher (``serve --watch``);
* :mod:`.calls`: the interceptor that drains calls on shutdown and records them;
* :mod:`.metrics`: Prometheus metrics over all processes (``serve --metrics-port``).
"""
