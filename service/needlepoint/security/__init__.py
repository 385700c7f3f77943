"""Security: who may call the service, over what transport, and what the logs may carry.

* :mod:`.tokens`: validation of a signed JWT bearer token (ES384/RS384, ``kid``, keys from a JWKS
  file or an allow-listed ``jku``, ``iss`` allow-list, ``aud``, ``exp``/``iat`` with skew, ``jti``
  replay cache). Transport-independent: the gRPC interceptor uses it now, the CDS Hooks endpoint
  will use the same code.
* :mod:`.transport`: TLS server credentials (optionally mutual TLS) and the rule that a server
  reachable from other machines must be protected unless the operator says ``--insecure``.
* :mod:`.interceptor`: the ``grpc.aio`` server interceptor that demands a valid bearer token.
* :mod:`.logsafe`: logging that cannot carry patient data (correlation ids as digests, exception
  messages withheld from tracebacks).
"""

RECOMMENDED_ALGORITHMS = ("ES384", "RS384")  # what CDS Hooks recommends: the default
SUPPORTED_ALGORITHMS = ("ES384", "RS384", "ES256", "RS256")  # the others only when configured
