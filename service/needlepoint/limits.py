"""How large a request may be, on every road in: the one place these sizes are declared.

gRPC (``needlepoint.server``), CDS Hooks over HTTP (``needlepoint.cdshooks``) and the worklist
page (``needlepoint.worklist.web``) read their limits here; each road keeps its own answer to a
request over the limit (a gRPC status, an HTTP 413 with an OperationOutcome, a page).
"""

from __future__ import annotations

MIB = 1024 * 1024

# The largest FHIR bundle evaluated (INVALID_ARGUMENT at ``fhir_bundle`` beyond it), on the gRPC
# road and in ``needlepoint evaluate``.
MAX_BUNDLE_BYTES = 8 * MIB

# The limit on one gRPC request message (RESOURCE_EXHAUSTED beyond it, naming the message type): a
# bundle at the limit plus room for the rest of the request. Checked by the server's request
# deserializer (needlepoint.server.wire), so that one oversized EvaluateStream item gets its own
# error and the stream goes on.
MAX_MESSAGE_BYTES = MAX_BUNDLE_BYTES + 1 * MIB

# The gRPC transport's own limit, above which gRPC refuses a message before any of our code sees
# it (RESOURCE_EXHAUSTED for the whole call, a stream included). Set well above MAX_MESSAGE_BYTES
# so that the check above decides for every message of a plausible size.
MAX_TRANSPORT_BYTES = 4 * MAX_MESSAGE_BYTES

# The largest CDS Hooks request body (HTTP 413 beyond it): a bundle-sized prefetch plus room for
# JSON overhead.
MAX_CDS_HOOKS_BODY_BYTES = 16 * MIB

# The largest upload of files to the worklist page (HTTP 413 beyond it).
MAX_WORKLIST_UPLOAD_BYTES = 512 * MIB

# A request larger than this is read and evaluated with the cyclic garbage collector paused
# (needlepoint.server.service.collector_paused), on the gRPC and CDS Hooks roads alike.
LARGE_REQUEST_BYTES = 256 * 1024

# The memory large requests free is given back to the system once they add up to this many bytes
# (needlepoint.server.service.collector_paused): after every eighth 8 MiB request, after about every
# seventy-fifth of Synthea size (0.9 MB on average). It was 8 MiB while large bundles were read
# whole; read lazily they free far less, and giving it back every 8 MiB cost the Synthea road a
# fifth of its time (520 against 651 bundles/s in-process). At 64 MiB worker RSS stays bounded
# (bench/memory.py, 1,000 to 10,000 requests: +6.3 % with every 50th 8 MiB, +2.7 % with every 10th
# Synthea-size; at 8 MiB, +8.4 % with every 10th Synthea-size).
RETURN_MEMORY_BYTES = 64 * MIB


def declared_size(content_length: str | None) -> int | None:
    """The size an HTTP request declares (its ``Content-Length``), or None when it declares none
    that can be read. The body is still read no further than the limit: a header can lie."""
    if content_length is None or not content_length.isdigit():
        return None
    return int(content_length)
