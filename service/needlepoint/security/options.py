"""Command-line options for security: ``serve``'s TLS and token authentication, and the matching
client options of ``evaluate --server``. Each decorator collects its options into one keyword
argument (``security`` or ``connection``), so commands gain one parameter, not ten."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from needlepoint.security import RECOMMENDED_ALGORITHMS, SUPPORTED_ALGORITHMS

if TYPE_CHECKING:
    from needlepoint.security.transport import SecurityConfig

DEFAULT_AUDIENCE = "needlepoint.v1.DecisionService"
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

_SERVER_OPTIONS = [
    click.option("--tls-cert", type=_FILE, help="PEM certificate chain of the server: serve TLS (with --tls-key)."),
    click.option(
        "--tls-key", type=_FILE, help="PEM private key of --tls-cert (unencrypted; keep it readable by the server only)."
    ),
    click.option("--client-ca", type=_FILE, help="PEM CA bundle: require client certificates it signed (mutual TLS)."),
    click.option(
        "--auth-jwks",
        type=_FILE,
        help="JWK Set file of the public keys that sign callers' bearer tokens; re-read when it changes.",
    ),
    click.option(
        "--auth-jku",
        multiple=True,
        metavar="URL",
        help="A JWK Set URL tokens may name in 'jku' (allow-list, cached 5 min); repeatable.",
    ),
    click.option(
        "--auth-issuer",
        multiple=True,
        metavar="ISS",
        help="An allowed token issuer ('iss'); repeatable, required with token auth.",
    ),
    click.option(
        "--auth-audience", default=DEFAULT_AUDIENCE, show_default=True, help="The audience ('aud') tokens must be issued for."
    ),
    click.option(
        "--auth-algorithm",
        multiple=True,
        type=click.Choice(SUPPORTED_ALGORITHMS),
        help=f"An accepted signing algorithm; repeatable (default: {', '.join(RECOMMENDED_ALGORITHMS)}).",
    ),
    click.option(
        "--auth-clock-skew",
        type=click.FloatRange(0, 300),
        default=60.0,
        show_default=True,
        help="Seconds of clock difference tolerated on exp/iat/nbf.",
    ),
    click.option(
        "--auth-max-lifetime",
        type=click.FloatRange(1, 86400),
        default=3600.0,
        show_default=True,
        help="Longest token lifetime (exp - iat) accepted, in seconds.",
    ),
    click.option(
        "--auth-reuse-tokens",
        is_flag=True,
        help="Let a token be used for many calls until it expires (no jti replay check); by default each jti is accepted once.",
    ),
    click.option(
        "--insecure",
        is_flag=True,
        help="Allow serving a non-loopback address without TLS or caller authentication (logged as a warning).",
    ),
]


def server_security_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the TLS and token options to ``command`` and pass it ``security=SecurityConfig``
    (a usage error for inconsistent options: a key without a certificate, an issuer without keys)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {
            name: kwargs.pop(name)
            for name in list(kwargs)
            if name.startswith(("tls_", "auth_")) or name in ("client_ca", "insecure")
        }
        kwargs["security"] = security_config(**values)
        return command(*args, **kwargs)

    for option in reversed(_SERVER_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def security_config(
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    client_ca: Path | None = None,
    auth_jwks: Path | None = None,
    auth_jku: tuple[str, ...] = (),
    auth_issuer: tuple[str, ...] = (),
    auth_audience: str = DEFAULT_AUDIENCE,
    auth_algorithm: tuple[str, ...] = (),
    auth_clock_skew: float = 60.0,
    auth_max_lifetime: float = 3600.0,
    auth_reuse_tokens: bool = False,
    insecure: bool = False,
) -> SecurityConfig:
    """The SecurityConfig the options describe, with the files checked now (a bad certificate or
    JWKS file stops ``serve`` before any worker starts). Raises click.UsageError."""
    from needlepoint.security.tokens import TokenPolicy, TokenValidator
    from needlepoint.security.transport import SecurityConfig, TlsConfig

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise click.UsageError("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
    tls = TlsConfig(tls_cert, tls_key, client_ca) if tls_cert is not None and tls_key is not None else None
    tokens = None
    if auth_jwks is not None or auth_jku:
        if not auth_issuer:
            raise click.UsageError("token authentication needs at least one --auth-issuer")
        try:
            tokens = TokenPolicy(
                audience=auth_audience,
                issuers=tuple(auth_issuer),
                jwks_file=auth_jwks.resolve() if auth_jwks is not None else None,
                jku_allowlist=tuple(auth_jku),
                algorithms=tuple(auth_algorithm) or RECOMMENDED_ALGORITHMS,
                clock_skew=auth_clock_skew,
                max_lifetime=auth_max_lifetime,
                replay_protection=not auth_reuse_tokens,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    elif auth_issuer:
        raise click.UsageError("--auth-issuer needs keys: --auth-jwks FILE or --auth-jku URL")
    try:
        if tls is not None:
            tls.check()
        if tokens is not None and tokens.jwks_file is not None:
            TokenValidator(tokens)  # parses the JWKS file
    except (OSError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    return SecurityConfig(tls=tls, tokens=tokens, insecure=insecure)


_CLIENT_OPTIONS = [
    click.option("--tls-ca", type=_FILE, help="With --server: connect over TLS, trusting this PEM CA bundle."),
    click.option("--tls-cert", type=_FILE, help="With --server: PEM client certificate for mutual TLS (with --tls-key)."),
    click.option("--tls-key", type=_FILE, help="With --server: PEM private key of --tls-cert."),
    click.option(
        "--token",
        envvar="NEEDLEPOINT_TOKEN",
        metavar="JWT",
        help="With --server: bearer token to send "
        "(better from $NEEDLEPOINT_TOKEN or --token-file: a command line is visible to other users).",
    ),
    click.option("--token-file", type=_FILE, help="With --server: read the bearer token from this file."),
]


def client_connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the client TLS and token options to ``command`` and pass it ``connection``: the keyword
    arguments for ``NeedlepointClient`` (tls_ca, tls_cert, tls_key, token)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tls_ca, tls_cert, tls_key = kwargs.pop("tls_ca"), kwargs.pop("tls_cert"), kwargs.pop("tls_key")
        token, token_file = kwargs.pop("token"), kwargs.pop("token_file")
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        if token is not None and token_file is not None:
            raise click.UsageError("give --token or --token-file, not both")
        if token_file is not None:
            token = token_file.read_text().strip()
        connection = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key, "token": token or None}
        kwargs["connection"] = {k: v for k, v in connection.items() if v is not None}
        return command(*args, **kwargs)

    for option in reversed(_CLIENT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
