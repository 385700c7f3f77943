"""CDS Hooks 2.0 for Needlepoint: discovery, cards and feedback over HTTP, beside gRPC.

``discovery`` derives the services and prefetch templates from the rule set; ``request`` checks a
hook call, finds the hip injection orders and completes the prefetch; ``cards`` turns a decision
into cards (a pure function); ``validate`` checks documents against the spec's rules and
invariants; ``stores`` holds the feedback and decision-store protocols; ``page`` renders the
explanation page; ``app`` is the ASGI app factory and ``server`` runs it under uvicorn in a
worker's event loop.
"""
