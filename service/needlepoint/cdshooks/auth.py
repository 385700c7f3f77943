"""CDS Hooks client authentication: the spec's JWT bearer check on every call, discovery included.

CDS Hooks ("Trusting CDS Clients") wants the token's ``aud`` to be *the exact URL of the endpoint
being called*: a token minted for discovery cannot be spent on the service, nor one minted for a
call on its feedback endpoint. So :class:`JwtAuthenticator` keeps one
:class:`~needlepoint.security.tokens.TokenValidator` per endpoint URL, each the configured
:class:`~needlepoint.security.tokens.TokenPolicy` with that URL as its audience. Everything else
(ES384/RS384 only, ``kid``, keys from the JWKS file or an allow-listed ``jku``, the ``iss``
allow-list, ``exp``/``iat`` with skew, bounded lifetime, the ``jti`` replay cache) is the shared
validator's, unchanged. Since a token is valid at one URL only, a ``jti`` remembered by that URL's
validator cannot be replayed anywhere else.

Endpoint URLs are built from the configured public base URL (what the EHR calls, e.g.
``https://cds.example.org:8443``) and the request's path, never from the request's Host header,
which the caller controls. Validators exist only for the endpoints this service has (discovery,
each loaded rule set's service and feedback, the overrides page), so a caller cannot make the
process grow by inventing paths: any other path is refused like a bad token.

A refusal raises :class:`~needlepoint.cdshooks.app.Unauthorized` (the app answers a bare 401).
The log gets the path and the validator's fixed reason (``token expired``, ``audience not
accepted``...), never the token, a claim or a key id. On success the claims are put in the
request's state (``request.state.claims``) so that the decision log can name the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable

from starlette.requests import Request

from needlepoint.security.tokens import TokenError, TokenPolicy, TokenValidator

log = logging.getLogger("needlepoint.cdshooks")

_SERVICE_PATH = re.compile(r"/cds-services/([A-Za-z0-9._-]{1,200})(/feedback)?")
FIXED_PATHS = ("/cds-services", "/overrides")  # endpoints that are not per rule set


class Unauthorized(Exception):
    """Raised by an ``authenticate`` hook to refuse a request (answered with a bare 401)."""


def bearer(request: Request) -> str:
    """The token of the request's one ``Authorization: Bearer`` header; TokenError otherwise."""
    values = request.headers.getlist("authorization")
    if len(values) != 1:
        raise TokenError("no bearer token" if not values else "more than one authorization entry")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("no bearer token")
    return token.strip()


class JwtAuthenticator:
    """The ``authenticate`` hook of :func:`~needlepoint.cdshooks.app.create_app` for a JWT policy.

    ``base_url`` is the service's public base URL (scheme, host, port, and a path prefix if a
    proxy adds one); ``service_ids`` returns the ids of the CDS services served now (the loaded
    rule sets), so a rule set loaded later gets its validators on first use. ``policy.audience``
    is ignored: each endpoint's URL is its audience. One instance per process.
    """

    def __init__(
        self,
        policy: TokenPolicy,
        base_url: str,
        service_ids: Callable[[], Iterable[str]],
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.policy = policy
        self.base_url = base_url.rstrip("/")
        self._service_ids = service_ids
        self._clock = clock
        self._validators: dict[str, TokenValidator] = {}

    def audience(self, path: str) -> str | None:
        """The exact URL a token for ``path`` must name in ``aud``; None for a path that is no
        endpoint of this service."""
        if path in FIXED_PATHS:
            return self.base_url + path
        match = _SERVICE_PATH.fullmatch(path)
        if match and match[1] in set(self._service_ids()):
            return self.base_url + path
        return None

    def validator(self, audience: str) -> TokenValidator:
        """The validator for one endpoint URL, made on first use (the JWKS file is parsed then)."""
        validator = self._validators.get(audience)
        if validator is None:
            policy = dataclasses.replace(self.policy, audience=audience)
            validator = TokenValidator(policy) if self._clock is None else TokenValidator(policy, clock=self._clock)
            self._validators[audience] = validator
        return validator

    async def __call__(self, request: Request) -> None:
        """Let the request through with a valid token for its endpoint; Unauthorized otherwise."""
        path = request.url.path
        audience = self.audience(path)
        try:
            if audience is None:
                raise TokenError("no such endpoint")
            claims = await self.validator(audience).validate_async(bearer(request))
        except TokenError as exc:
            # a known endpoint's path is ours to log; any other path is the caller's text and is not
            log.info("401 %s %s: %s", request.method if request.method in ("GET", "POST", "OPTIONS") else "-",
                     path if audience is not None else "(not an endpoint)", exc.reason)
            raise Unauthorized() from None
        request.state.claims = claims
