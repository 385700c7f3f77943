"""How a server is exposed: TLS (optionally mutual), token authentication, and the rule that an
unprotected server stays on the loopback interface.

:class:`SecurityConfig` is what ``needlepoint serve`` was told; it travels to every worker inside
``WorkerConfig``. :func:`exposure_problems` is the start-up rule: an address other machines can
reach needs TLS *and* caller authentication (a bearer token or a client certificate), unless the
operator passes ``--insecure``, which is then logged loudly.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from needlepoint.security.tokens import TokenPolicy

log = logging.getLogger("needlepoint.security")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# Calls that need no token: health checks, so that load balancers and orchestrators can probe the
# server without holding a credential. The answer is only SERVING/NOT_SERVING, no patient data.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The server's certificate chain and key (PEM files), and optionally the CA whose
    certificates clients must present (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def check(self) -> None:
        """Fail early, with a message naming the file, if the PEM files are unreadable, malformed,
        or the key does not belong to the certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.cert_file}: not a readable PEM certificate ({exc})") from None
        try:
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{self.key_file}: not a readable, unencrypted PEM private key ({type(exc).__name__})") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.PEM, public) != cert.public_key().public_bytes(
            serialization.Encoding.PEM, public
        ):
            raise ValueError(f"{self.key_file}: the key does not belong to the certificate {self.cert_file}")
        if self.client_ca_file is not None:
            try:
                x509.load_pem_x509_certificates(self.client_ca_file.read_bytes())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{self.client_ca_file}: not a readable PEM CA bundle ({exc})") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; with a client CA, a client certificate it signed is required."""
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Transport and caller authentication of a server. Picklable (crosses into workers)."""

    tls: TlsConfig | None = None
    tokens: TokenPolicy | None = None
    insecure: bool = False  # the operator accepts an unprotected non-loopback address

    @property
    def authenticates_callers(self) -> bool:
        """Callers prove who they are: a bearer token, or a client certificate (mutual TLS)."""
        return self.tokens is not None or (self.tls is not None and self.tls.client_ca_file is not None)

    def describe(self) -> str:
        """One line for the log: transport and authentication, no secrets."""
        if self.tls is None:
            transport = "plaintext"
        else:
            transport = "TLS with client certificates" if self.tls.client_ca_file else "TLS"
        auth = []
        if self.tokens is not None:
            auth.append(f"bearer tokens (aud {self.tokens.audience!r}, {len(self.tokens.issuers)} issuer(s))")
        if self.tls is not None and self.tls.client_ca_file is not None:
            auth.append("client certificates")
        return f"transport {transport}; caller authentication: {' and '.join(auth) or 'none'}"


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost). Wildcards
    (``0.0.0.0``, ``[::]``) and other names are not."""
    bare = host.strip("[]").lower()
    if bare in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def exposure_problems(host: str, security: SecurityConfig) -> list[str]:
    """What is missing for serving on ``host`` safely: nothing on loopback; elsewhere TLS (tokens
    and patient data must not cross the network in clear) and caller authentication."""
    if is_loopback(host):
        return []
    problems = []
    if security.tls is None:
        problems.append("no TLS (--tls-cert/--tls-key)")
    if not security.authenticates_callers:
        problems.append("no caller authentication (--auth-jwks/--auth-jku with --auth-issuer, or --client-ca)")
    return problems


def enforce_exposure(host: str, security: SecurityConfig) -> None:
    """Raise ValueError if ``host`` is exposed without protection and ``--insecure`` was not given;
    with ``--insecure``, log a warning that cannot be missed."""
    problems = exposure_problems(host, security)
    if not problems:
        return
    if not security.insecure:
        raise ValueError(
            f"refusing to serve on {host}, which other machines can reach, with {' and '.join(problems)}; "
            "bind 127.0.0.1, configure them, or pass --insecure"
        )
    log.warning(
        "INSECURE: serving on %s with %s; anyone who can reach it can read and send patient data", host, " and ".join(problems)
    )


def bind(server: grpc.aio.Server, address: str, security: SecurityConfig | None) -> int:
    """Add the listening port, with TLS when configured; the port (0 if it could not be bound)."""
    if security is not None and security.tls is not None:
        return server.add_secure_port(address, security.tls.server_credentials())
    return server.add_insecure_port(address)


def interceptors(security: SecurityConfig | None) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors ``security`` calls for: a bearer-token check when tokens are on."""
    if security is None or security.tokens is None:
        return []
    from needlepoint.security.interceptor import BearerTokenInterceptor
    from needlepoint.security.tokens import TokenValidator

    return [BearerTokenInterceptor(TokenValidator(security.tokens), open_prefixes=OPEN_METHOD_PREFIXES)]
