"""CDS Hooks in its secure mode, end to end: a real ``needlepoint serve --http-port`` (uvicorn, two
workers) over TLS, with the EHR's JWKS file, an allow-listed ``jku``, an ``iss`` allow-list, CORS
for one origin and a SQLite decision log. Every key and certificate is made here, at test time.

* the token matrix: good and bad tokens give 200 or a bare 401 exactly as the spec says, and no
  token (nor its signature) appears anywhere in the server's DEBUG log;
* the decision log road: an order-sign call is committed with its cards, feedback overriding a
  card lands in ``decisions overrides`` (text and the ``/overrides`` page), and the explanation
  page is served from the log by whichever worker takes the connection;
* every 200 answer passes the spec validator.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from needlepoint.cdshooks.discovery import prefetch_templates
from needlepoint.cdshooks.validate import validate_discovery, validate_response

from .test_cdshooks_http import SYNTHEA, full_prefetch, hip_order, hook_request, synthea

ISSUER = "https://ehr.example.org"
ORIGIN = "https://ehr.example.org"


# -- keys, certificates and tokens, made at test time ------------------------------------------------


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) else jwt.algorithms.RSAAlgorithm
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


class Ehr:
    """The EHR's side: signing keys (ES384, RS384, ES256 in the JWKS file; one more published at a
    jku URL; a rogue key nobody published), a CA and the server's certificate, and a minter."""

    def __init__(self, directory: Path) -> None:
        self.keys = {
            "es384": (ec.generate_private_key(ec.SECP384R1()), "ES384"),
            "rs384": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS384"),
            "es256": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
            "jku-es384": (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        }
        self.rogue = ec.generate_private_key(ec.SECP384R1())
        self.jwks_file = directory / "ehr-jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [_jwk(self.keys[k][0], k) for k in ("es384", "rs384", "es256")]}))
        self.jku_document = json.dumps({"keys": [_jwk(self.keys["jku-es384"][0], "jku-es384")]}).encode()
        self.ca_file, self.cert_file, self.key_file = self._pki(directory)
        self.minted: list[str] = []

    @staticmethod
    def _pki(directory: Path) -> tuple[Path, Path, Path]:
        now = dt.datetime.now(dt.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
        paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[2].write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return paths

    def token(self, aud: str, kid: str = "es384", *, key: Any = None, alg: str | None = None, header: dict | None = None,
              drop: tuple[str, ...] = (), **claims: Any) -> str:
        """A token for ``aud`` signed with ``kid``'s key: valid for five minutes unless told otherwise."""
        own_key, own_alg = self.keys.get(kid, (self.keys["es384"][0], "ES384"))
        now = int(time.time())
        payload = {
            "iss": ISSUER,
            "aud": aud,
            "sub": "ehr-client-1",
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            **claims,
        }
        for name in drop:
            payload.pop(name)
        token = jwt.encode(payload, key or own_key, algorithm=alg or own_alg, headers={"kid": kid, **(header or {})})
        self.minted.append(token)
        return token


def _unsigned(ehr: Ehr, aud: str) -> str:
    """alg none: a header and payload, no signature."""
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    now = int(time.time())
    token = b64({"alg": "none", "typ": "JWT", "kid": "es384"}) + "." + b64(
        {"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}) + "."
    ehr.minted.append(token)
    return token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_the_public_key(ehr: Ehr, aud: str) -> str:
    """The classic confusion attack: HMAC-SHA256 keyed with the published public key."""
    public = (
        ehr.keys["rs384"][0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rs384"}).encode())
    body = _b64(json.dumps({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}).encode())
    signature = _b64(hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest())
    token = f"{header}.{body}.{signature}"
    ehr.minted.append(token)
    return token


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    document = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Ehr:
    return Ehr(tmp_path_factory.mktemp("ehr"))


@pytest.fixture(scope="module")
def jku(ehr: Ehr) -> Iterator[str]:
    handler = type("Handler", (_JwksHandler,), {"document": ehr.jku_document})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


class Secure:
    """The running server and what a test needs to talk to it."""

    def __init__(self, process: Any, base: str, database: str, ehr: Ehr) -> None:
        self.process, self.base, self.database, self.ehr = process, base, database, ehr

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, verify=ssl.create_default_context(cafile=str(self.ehr.ca_file)), timeout=30)

    def bearer(self, path: str, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ehr.token(self.base + path, **kw)}"}


@pytest.fixture(scope="module")
def secure(server_process, ehr: Ehr, jku: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    with socket.socket() as probe:  # a free loopback port (the conftest fixture is per test)
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    database = f"sqlite:///{tmp_path_factory.mktemp('log') / 'decisions.sqlite3'}"
    process = server_process(
        2, "--http-port", str(http_port), "--tls-cert", str(ehr.cert_file), "--tls-key", str(ehr.key_file),
        "--auth-jwks", str(ehr.jwks_file), "--auth-issuer", ISSUER, "--auth-jku", jku, "--cors-origin", ORIGIN,
        "--database", database, "--log-level", "DEBUG",
    )
    try:
        process.wait_for(r"serving with 2 worker\(s\)", timeout=90)
        yield Secure(process, f"https://127.0.0.1:{http_port}", database, ehr)
    finally:
        code = process.stop()
    assert code == 0, "\n".join(process.lines[-40:])
    log = "\n".join(process.lines)
    assert ehr.minted, "the suite minted tokens"
    for token in ehr.minted:  # no token, nor any part that identifies one, reached the log
        for part in [token, *[p for p in token.split(".") if len(p) > 16]]:
            assert part not in log, "a token reached the log"
    assert "CDS Hooks on https://" in log and "bearer tokens required" in log
    for reason in ("algorithm not allowed", "audience not accepted", "token expired", "token replayed", "unknown key",
                   "issuer not allowed", "jku not allowed", "bad signature", "no bearer token"):
        assert f": {reason}" in log, f"no refusal logged for {reason!r}"  # each bad token was refused for its own reason


def _bare_401(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text[:200])
    assert response.content == b"" and response.headers.get("www-authenticate") == "Bearer"


# -- the token matrix -------------------------------------------------------------------------------

DISCOVERY = "/cds-services"
SERVICE = "/cds-services/hip-injection"

# name -> (function of (ehr, base, jku) giving the headers, expected status)
MATRIX: dict[str, tuple[Any, int]] = {
    "ES384 from the JWKS file": (lambda e, b, j: e.token(b + DISCOVERY), 200),
    "RS384 from the JWKS file": (lambda e, b, j: e.token(b + DISCOVERY, "rs384"), 200),
    "ES384 from an allow-listed jku": (lambda e, b, j: e.token(b + DISCOVERY, "jku-es384", header={"jku": j}), 200),
    "aud as a list holding the URL": (lambda e, b, j: e.token([b + DISCOVERY, "https://other.example"]), 200),
    "alg none": (lambda e, b, j: _unsigned(e, b + DISCOVERY), 401),
    "HS256 keyed with the public key": (lambda e, b, j: _hs256_with_the_public_key(e, b + DISCOVERY), 401),
    "ES256 (not configured)": (lambda e, b, j: e.token(b + DISCOVERY, "es256"), 401),
    "wrong aud: another endpoint's URL": (lambda e, b, j: e.token(b + SERVICE), 401),
    "wrong aud: the gRPC audience": (lambda e, b, j: e.token("needlepoint.v1.DecisionService"), 401),
    "wrong aud: http instead of https": (lambda e, b, j: e.token(b.replace("https:", "http:") + DISCOVERY), 401),
    "expired": (lambda e, b, j: e.token(b + DISCOVERY, iat=int(time.time()) - 900, exp=int(time.time()) - 300), 401),
    "issued in the future": (
        lambda e, b, j: e.token(b + DISCOVERY, iat=int(time.time()) + 900, exp=int(time.time()) + 1000),
        401,
    ),
    "lifetime over an hour": (lambda e, b, j: e.token(b + DISCOVERY, exp=int(time.time()) + 7200), 401),
    "no exp": (lambda e, b, j: e.token(b + DISCOVERY, drop=("exp",)), 401),
    "no jti": (lambda e, b, j: e.token(b + DISCOVERY, drop=("jti",)), 401),
    "unknown kid": (lambda e, b, j: e.token(b + DISCOVERY, "nobody", key=e.rogue, alg="ES384"), 401),
    "known kid, rogue key": (lambda e, b, j: e.token(b + DISCOVERY, key=e.rogue), 401),
    "no kid": (
        lambda e, b, j: jwt.encode(
            {"iss": ISSUER, "aud": b + DISCOVERY, "iat": int(time.time()), "exp": int(time.time()) + 60, "jti": "x"},
            e.keys["es384"][0],
            algorithm="ES384",
        ),
        401,
    ),
    "typ not JWT": (lambda e, b, j: e.token(b + DISCOVERY, header={"typ": "at+jwt"}), 401),
    "unlisted iss": (lambda e, b, j: e.token(b + DISCOVERY, iss="https://evil.example"), 401),
    "unlisted jku": (lambda e, b, j: e.token(b + DISCOVERY, "jku-es384", header={"jku": "http://127.0.0.1:9/jwks.json"}), 401),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MATRIX))
def test_token_matrix_on_discovery(secure: Secure, jku: str, case: str) -> None:
    make, expected = MATRIX[case]
    token = make(secure.ehr, secure.base, jku)
    secure.ehr.minted.append(token)
    with secure.client() as http:
        response = http.get(DISCOVERY, headers={"Authorization": f"Bearer {token}"})
    if expected == 200:
        assert response.status_code == 200, response.text
        assert validate_discovery(response.json()) == []
    else:
        _bare_401(response)


@pytest.mark.slow
def test_a_token_is_spent_once_and_missing_or_odd_headers_are_refused(secure: Secure) -> None:
    token = secure.ehr.token(secure.base + DISCOVERY)
    with secure.client() as http:
        assert http.get(DISCOVERY, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # replayed: the same jti again, on a new connection (another worker may take it: each keeps
        # its own cache, so this is checked on one connection first, which stays on one worker)
        _bare_401(http.get(DISCOVERY, headers={"Authorization": f"Bearer {token}"}))
        _bare_401(http.get(DISCOVERY))
        _bare_401(http.get(DISCOVERY, headers={"Authorization": f"Basic {token}"}))
        _bare_401(http.get(DISCOVERY, headers=[("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")]))
        # every CDS Hooks route, an unknown service and the overrides page need a token too
        _bare_401(http.post(SERVICE, json={}))
        _bare_401(http.post(SERVICE + "/feedback", json={"feedback": []}))
        _bare_401(http.post("/cds-services/no-such-service", json={}))
        _bare_401(http.get("/overrides"))
        _bare_401(http.get("/anything-else"))
        # a valid token for an endpoint that does not exist gets no further
        _bare_401(http.post("/cds-services/nope", json={}, headers=secure.bearer("/cds-services/nope")))


@pytest.mark.slow
def test_plaintext_http_is_refused_on_the_tls_port(secure: Secure) -> None:
    with httpx.Client(base_url=secure.base.replace("https:", "http:"), timeout=10) as http, pytest.raises(httpx.HTTPError):
        http.get(DISCOVERY, headers=secure.bearer(DISCOVERY))


@pytest.mark.slow
def test_cors_for_the_configured_origin_only(secure: Secure) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    with secure.client() as http:
        allowed = http.options(SERVICE, headers={"Origin": ORIGIN, **preflight})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        refused = http.options(SERVICE, headers={"Origin": "https://evil.example", **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        # a refusal still carries CORS headers, so the EHR's page can see it was a 401
        response = http.get(DISCOVERY, headers={"Origin": ORIGIN})
        _bare_401(response)
        assert response.headers["access-control-allow-origin"] == ORIGIN
        ok = http.get(DISCOVERY, headers={"Origin": ORIGIN, **secure.bearer(DISCOVERY)})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN


# -- the decision log road --------------------------------------------------------------------------


@pytest.mark.slow
def test_order_sign_is_logged_and_feedback_round_trips_into_the_overrides_report(
    secure: Secure, hip_ruleset, cli_command: list[str], cli_env: dict[str, str]
) -> None:
    patient_id, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    request = hook_request("order-sign", patient_id, hip_order(patient_id),
                           full_prefetch(prefetch_templates(hip_ruleset), patient_id, resources))
    with secure.client() as http:
        response = http.post(SERVICE, json=request, headers=secure.bearer(SERVICE))
    assert response.status_code == 200, response.text
    body = response.json()
    assert validate_response(body, strict=True) == []
    decision_id = response.headers["x-needlepoint-decision-id"]
    assert all(c["extension"]["dev.needlepoint.decisionId"] == decision_id for c in body["cards"])
    card = next(c for c in body["cards"] if "DATA-INR-CURRENT" in c["extension"].get("dev.needlepoint.ruleIds", ()))
    reason = card["overrideReasons"][0]
    comment = f"INR 2.3 this morning at the anticoagulation clinic ({uuid.uuid4().hex[:6]})"
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:05:31Z",
            "overrideReason": {"reason": reason, "userComment": comment}}
    with secure.client() as http:
        stored = http.post(SERVICE + "/feedback", json={"feedback": [item]}, headers=secure.bearer(SERVICE + "/feedback"))
        again = http.post(SERVICE + "/feedback", json={"feedback": [item]}, headers=secure.bearer(SERVICE + "/feedback"))
        bad = http.post(
            SERVICE + "/feedback",
            json={"feedback": [dict(item, overrideReason={})]},
            headers=secure.bearer(SERVICE + "/feedback"),
        )
    assert stored.json() == {"stored": 1, "duplicates": 0} and again.json() == {"stored": 0, "duplicates": 1}
    assert bad.status_code == 400 and "cds-fb-3" in bad.text

    # committed before the answer: the command reads it at once, from the database
    done = subprocess.run([*cli_command, "decisions", "overrides", "--database", secure.database, "--format", "json"],
                          capture_output=True, text=True, env=cli_env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    rule = next(r for r in json.loads(done.stdout)["rules"] if r["ruleId"] == "DATA-INR-CURRENT")
    assert rule["fired"] >= 1 and rule["shown"] >= 1 and rule["overridden"] == 1
    assert rule["reasons"] == [{**reason, "count": 1}]
    assert [c["comment"] for c in rule["comments"]] == [comment]
    text = subprocess.run([*cli_command, "decisions", "overrides", "--database", secure.database],
                          capture_output=True, text=True, env=cli_env, timeout=120, check=False).stdout
    print("\n" + text)  # the evidence, with pytest -s
    assert re.search(r"DATA-INR-CURRENT\s+\d+\s+\d+\s+0\s+1", text) and f"x {reason['display']} ({reason['code']})" in text

    with secure.client() as http:
        page = http.get("/overrides", headers=secure.bearer("/overrides"))
    assert page.status_code == 200 and "DATA-INR-CURRENT" in page.text and comment in page.text

    # the explanation page is read from the log: every worker serves it, without a token
    for _ in range(6):
        with secure.client() as fresh:
            explained = fresh.get(card["links"][0]["url"].replace(secure.base, ""))
        assert explained.status_code == 200, explained.text[:300]
        assert 'id="rule-DATA-INR-CURRENT"' in explained.text and explained.headers["referrer-policy"] == "no-referrer"
    assert card["links"][0]["url"].startswith(secure.base + "/decisions/" + decision_id)


# -- the command's rules ----------------------------------------------------------------------------


@pytest.mark.slow  # a process each; the fast suite keeps one refusal (test_cdshooks_http)
@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--http-port", "8080"], "--insecure-dev"),
        (["--http-port", "8080", "--cors-origin", "*", "--insecure-dev", "--cors-origin", "x"], "origin"),
        (
            ["--http-port", "8080", "--auth-jwks", "{jwks}", "--auth-issuer", ISSUER, "--cors-origin", "*"],
            "only with --insecure-dev",
        ),
        (
            ["--http-port", "8080", "--auth-jwks", "{jwks}", "--auth-issuer", ISSUER, "--host", "0.0.0.0", "--insecure"],
            "--http-base-url",
        ),
        (
            ["--http-port", "8080", "--auth-jwks", "{jwks}", "--auth-issuer", ISSUER, "--http-base-url", "ftp://x"],
            "--http-base-url",
        ),
        (
            [
                "--http-port",
                "8080",
                "--insecure-dev",
                "--host",
                "0.0.0.0",
                "--tls-cert",
                "{cert}",
                "--tls-key",
                "{key}",
                "--auth-jwks",
                "{jwks}",
                "--auth-issuer",
                ISSUER,
            ],
            "--insecure-dev on 0.0.0.0",
        ),
        (["--cors-origin", ORIGIN], "need --http-port"),
    ],
)
def test_serve_refuses_unsafe_cds_hooks_options(
    ehr: Ehr, cli_command: list[str], cli_env: dict[str, str], args: list[str], complaint: str
) -> None:
    args = [a.format(jwks=ehr.jwks_file, cert=ehr.cert_file, key=ehr.key_file) for a in args]
    done = subprocess.run(
        [*cli_command, "serve", "--database", "none", *args], capture_output=True, text=True, env=cli_env, timeout=60, check=False
    )
    assert done.returncode == 2 and complaint in done.stderr, done.stderr
