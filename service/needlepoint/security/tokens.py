"""Validation of a signed JWT bearer token, independent of the transport that carried it.

The rules are those of CDS Hooks ("Trusting CDS Clients"), which the CDS Hooks endpoint will need
and the gRPC API applies as well:

* the header names an allowed asymmetric algorithm (ES384 or RS384; ES256/RS256 only when
  configured; ``none`` and HMAC never), ``typ`` ``JWT``, and a ``kid``;
* the key is the ``kid`` of the configured JWKS file, or, when the header has a ``jku``, of the JWK
  Set at that URL if the URL is on the allow-list (fetched with a timeout and cached);
* the signature verifies; ``iss`` is on the allow-list; ``aud`` is (or contains) the configured
  audience; ``exp`` and ``iat`` are present and, within a small clock skew, the token is current;
  its lifetime (``exp - iat``) is bounded;
* ``jti`` has not been seen before by this process (a replay cache that remembers each ``jti`` of
  an issuer until the token expires).

A token that fails raises :class:`TokenError`, the only error of this module at validation time.
Its ``reason`` is one of a fixed set of phrases and never contains the token, a claim value or a
key id, so it is safe to log; callers still answer the client with a bare "unauthenticated".
Configuration problems (an unreadable JWKS file, a symmetric key) raise ``ValueError`` at start-up.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK
from jwt.exceptions import (
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)

from needlepoint.security import RECOMMENDED_ALGORITHMS, SUPPORTED_ALGORITHMS

log = logging.getLogger("needlepoint.security")

_KEY_TYPE = {"ES": "EC", "RS": "RSA"}  # JWK kty of each algorithm family
MAX_TOKEN_BYTES = 8 * 1024  # a longer "token" is rejected before it is parsed
MAX_JWKS_BYTES = 256 * 1024  # a larger JWK Set (file or jku) is refused
JKU_REFETCH_COOLDOWN = 30.0  # seconds between fetches of one jku (unknown kid, or a failure)


class TokenError(Exception):
    """A token that is not accepted. ``reason`` is a fixed phrase, never a value from the token,
    so it may be logged; the client should be told nothing more than "unauthenticated"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a valid token is. Picklable: it crosses into worker processes.

    ``audience`` is compared with ``aud`` (for CDS Hooks the endpoint's URL; for gRPC a configured
    name). ``issuers`` is the ``iss`` allow-list. Keys come from ``jwks_file`` (re-read when it
    changes, so keys rotate without a restart) and/or from the ``jku`` URLs in ``jku_allowlist``
    (each cached for ``jku_cache_seconds``). ``clock_skew`` seconds are tolerated on ``exp``,
    ``iat`` and ``nbf``; tokens living longer than ``max_lifetime`` seconds are refused, which
    also bounds how long the replay cache must remember a ``jti``. With ``replay_protection`` off,
    ``jti`` is neither required nor remembered (for callers that reuse one token across calls).
    """

    audience: str
    issuers: tuple[str, ...]
    jwks_file: Path | None = None
    jku_allowlist: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = RECOMMENDED_ALGORITHMS
    clock_skew: float = 60.0
    max_lifetime: float = 3600.0
    replay_protection: bool = True
    replay_cache_size: int = 100_000
    jku_cache_seconds: float = 300.0
    jku_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("token authentication needs an audience")
        if not self.issuers or not all(self.issuers):
            raise ValueError("token authentication needs at least one allowed issuer")
        if self.jwks_file is None and not self.jku_allowlist:
            raise ValueError("token authentication needs keys: a JWKS file or an allowed jku URL")
        unsupported = sorted(set(self.algorithms) - set(SUPPORTED_ALGORITHMS))
        if unsupported or not self.algorithms:
            raise ValueError(f"algorithms must be among {', '.join(SUPPORTED_ALGORITHMS)}; not {unsupported}")
        if not 0 <= self.clock_skew <= 300:
            raise ValueError("clock skew must be between 0 and 300 seconds")
        if self.max_lifetime <= 0 or self.replay_cache_size <= 0:
            raise ValueError("max lifetime and replay cache size must be positive")


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a validated token: the registered ones typed, everything in ``raw``."""

    issuer: str
    subject: str | None
    jti: str | None
    issued_at: float
    expires: float
    raw: Mapping[str, Any] = field(repr=False)


class KeySet:
    """Public keys by ``kid``, from a JWK Set document, prepared for each algorithm on first use."""

    def __init__(self, document: bytes | str, origin: str) -> None:
        """Parse a JWK Set. Raises ValueError (naming ``origin``) for anything but a set of public
        EC or RSA signing keys, each with a unique ``kid``."""
        try:
            parsed = json.loads(document)
        except ValueError:
            raise ValueError(f"{origin}: not a JSON JWK Set") from None
        keys = parsed.get("keys") if isinstance(parsed, dict) else None
        if not isinstance(keys, list) or not keys:
            raise ValueError(f"{origin}: a JWK Set needs a non-empty 'keys' list")
        self._jwks: dict[str, dict[str, Any]] = {}
        for index, jwk_data in enumerate(keys):
            where = f"{origin}: keys[{index}]"
            if not isinstance(jwk_data, dict):
                raise ValueError(f"{where}: not an object")
            kid = jwk_data.get("kid")
            if not isinstance(kid, str) or not kid:
                raise ValueError(f"{where}: every key needs a 'kid'")
            if kid in self._jwks:
                raise ValueError(f"{where}: kid {kid!r} appears twice")
            if jwk_data.get("kty") not in _KEY_TYPE.values():
                raise ValueError(f"{where}: only EC and RSA keys are accepted (symmetric keys never)")
            if any(private in jwk_data for private in ("d", "p", "q")):
                raise ValueError(f"{where}: holds private key material; publish public keys only")
            if jwk_data.get("use", "sig") != "sig":
                raise ValueError(f"{where}: 'use' must be 'sig'")
            self._jwks[kid] = jwk_data
        self._prepared: dict[tuple[str, str], PyJWK] = {}

    def __contains__(self, kid: str) -> bool:
        return kid in self._jwks

    def key(self, kid: str, algorithm: str) -> PyJWK | None:
        """The key ``kid`` for ``algorithm``; None if there is no such kid. Raises TokenError if the
        key cannot serve that algorithm (another ``alg``, key type or curve)."""
        prepared = self._prepared.get((kid, algorithm))
        if prepared is not None:
            return prepared
        jwk_data = self._jwks.get(kid)
        if jwk_data is None:
            return None
        if jwk_data.get("alg", algorithm) != algorithm or jwk_data["kty"] != _KEY_TYPE[algorithm[:2]]:
            raise TokenError("key does not fit the algorithm")
        try:
            prepared = PyJWK(jwk_data, algorithm=algorithm)
            prepared.Algorithm.prepare_key(prepared.key)  # checks the curve against the algorithm
        except PyJWTError:
            raise TokenError("key does not fit the algorithm") from None
        self._prepared[(kid, algorithm)] = prepared
        return prepared


class _JwksFile:
    """The keys of a JWKS file, re-read when the file changes (looked at only for an unknown kid,
    so rotation needs no restart and costs nothing on the common path)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = self._stat()
        self.keys = self._read()

    def _stat(self) -> tuple[int, int]:
        stat = os.stat(self._path)
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> KeySet:
        data = self._path.read_bytes()
        if len(data) > MAX_JWKS_BYTES:
            raise ValueError(f"{self._path}: larger than {MAX_JWKS_BYTES} bytes")
        return KeySet(data, str(self._path))

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the keys were replaced. A broken new version is
        logged and the previous keys stay."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            keys = self._read()
        except (OSError, ValueError) as exc:
            log.warning("JWKS file not reloaded, keeping the previous keys: %s", exc)
            return False
        self._stamp, self.keys = stamp, keys
        log.info("JWKS file %s reloaded", self._path)
        return True


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: the allow-list names the URL keys come from, not a first hop."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class _RemoteKeySets:
    """JWK Sets fetched from allow-listed ``jku`` URLs, each cached for a while."""

    def __init__(self, allowlist: tuple[str, ...], lifetime: float, timeout: float, clock: Callable[[], float]) -> None:
        self._allowlist = frozenset(allowlist)
        self._lifetime = lifetime
        self._timeout = timeout
        self._clock = clock
        self._sets: dict[str, tuple[KeySet, float]] = {}  # url -> (keys, fetched at)
        self._last_attempt: dict[str, float] = {}
        self._lock = threading.Lock()

    def allowed(self, url: str) -> bool:
        return url in self._allowlist

    def cached(self, url: str, kid: str) -> KeySet | None:
        """The cached set of ``url`` if it is fresh and knows ``kid``; None when a fetch is due."""
        entry = self._sets.get(url)
        if entry is None:
            return None
        keys, fetched = entry
        if self._clock() - fetched > self._lifetime or kid not in keys:
            return None
        return keys

    def fetch(self, url: str) -> KeySet | None:
        """Fetch ``url`` now unless it was tried within the cooldown; the set (new or cached), or
        None if there is none. Blocking: async callers run it in a thread."""
        with self._lock:
            now = self._clock()
            if now - self._last_attempt.get(url, -math.inf) < JKU_REFETCH_COOLDOWN:
                entry = self._sets.get(url)
                return entry[0] if entry else None
            self._last_attempt[url] = now
        try:
            with _OPENER.open(url, timeout=self._timeout) as response:  # allow-listed URL, no redirects
                document = response.read(MAX_JWKS_BYTES + 1)
            if len(document) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = KeySet(document, url)
        except (OSError, ValueError) as exc:
            log.warning("cannot fetch the JWK Set at %s: %s", url, exc)
            entry = self._sets.get(url)
            return entry[0] if entry else None
        self._sets[url] = (keys, self._clock())
        return keys


class ReplayCache:
    """The ``jti`` of every accepted token, per issuer, until the token expires.

    Bounded: when ``capacity`` unexpired entries are held, new tokens are refused ("fail closed")
    rather than forgetting one that could then be replayed. Thread-safe.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def remember(self, key: tuple[str, str], expires: float, now: float) -> None:
        """Record ``key`` until ``expires``. Raises TokenError if it is already recorded, or if the
        cache is full of unexpired entries."""
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                expiry, old = heapq.heappop(self._heap)
                if self._expiry.get(old) == expiry:
                    del self._expiry[old]
            if key in self._expiry:
                raise TokenError("token replayed")
            if len(self._expiry) >= self._capacity:
                log.warning("replay cache full (%d tokens); refusing new tokens until some expire", self._capacity)
                raise TokenError("replay cache full")
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, key))


class TokenValidator:
    """Validates tokens under a :class:`TokenPolicy`; one per process (it holds the key caches and
    the replay cache). ``clock`` (seconds since the epoch) is injectable for tests."""

    def __init__(self, policy: TokenPolicy, *, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self._clock = clock
        self._file = _JwksFile(policy.jwks_file) if policy.jwks_file is not None else None
        self._remote = _RemoteKeySets(policy.jku_allowlist, policy.jku_cache_seconds, policy.jku_timeout, clock)
        self._replay = ReplayCache(policy.replay_cache_size) if policy.replay_protection else None
        self._issuers = frozenset(policy.issuers)
        required = ["iss", "aud", "exp", "iat", *(["jti"] if policy.replay_protection else [])]
        self._options: jwt.types.Options = {
            "require": required,
            "verify_exp": False,  # times are checked below, against the injectable clock
            "verify_iat": False,
            "verify_nbf": False,
            "enforce_minimum_key_length": True,  # RSA below 2048 bits is refused
        }

    def validate(self, token: str) -> Claims:
        """The claims of a valid token, or TokenError. May fetch a ``jku`` (blocking)."""
        header = self._header(token)
        key = self._key(header, fetch=True)
        if key is None:  # not so when fetching; the check keeps the contract of _key visible
            raise TokenError("unknown key")
        return self._verify(token, header, key)

    async def validate_async(self, token: str) -> Claims:
        """:meth:`validate` for an event loop: a ``jku`` fetch, if one is due, runs in a thread."""
        header = self._header(token)
        key = self._key(header, fetch=False)
        if key is None:
            await asyncio.to_thread(self._remote.fetch, header["jku"])
            key = self._key(header, fetch=False)
            if key is None:
                raise TokenError("unknown key")
        return self._verify(token, header, key)

    def _header(self, token: str) -> dict[str, Any]:
        """The unverified header, checked: allowed ``alg``, ``typ`` JWT, a ``kid``, no ``crit``."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise TokenError("malformed token") from None
        if header.get("alg") not in self.policy.algorithms:
            raise TokenError("algorithm not allowed")
        if not isinstance(header.get("typ"), str) or header["typ"].upper() != "JWT":
            raise TokenError("token type is not JWT")
        if not isinstance(header.get("kid"), str) or not header["kid"]:
            raise TokenError("no key id")
        if "crit" in header:  # PyJWT already refuses extensions it does not know; none are wanted here
            raise TokenError("unsupported critical header")
        if "jku" in header and not (isinstance(header["jku"], str) and self._remote.allowed(header["jku"])):
            raise TokenError("jku not allowed")
        return header

    def _key(self, header: dict[str, Any], *, fetch: bool) -> PyJWK | None:
        """The verification key the header names. None only when ``fetch`` is false and a ``jku``
        fetch is due; TokenError when there is no such key."""
        kid, algorithm = header["kid"], header["alg"]
        if "jku" in header:
            url = header["jku"]
            keys = self._remote.cached(url, kid)
            if keys is None:
                if not fetch:
                    return None
                keys = self._remote.fetch(url)
        else:
            if self._file is None:
                raise TokenError("unknown key")
            keys = self._file.keys
            if kid not in keys and self._file.refresh():
                keys = self._file.keys
        key = keys.key(kid, algorithm) if keys is not None else None
        if key is None:
            raise TokenError("unknown key")
        return key

    def _verify(self, token: str, header: dict[str, Any], key: PyJWK) -> Claims:
        """Signature, issuer, audience, times, then (last, so that only valid tokens fill it) the
        replay cache."""
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[header["alg"]],
                audience=self.policy.audience,
                issuer=self._issuers,
                options=self._options,
            )
        except InvalidSignatureError:
            raise TokenError("bad signature") from None
        except MissingRequiredClaimError as exc:
            raise TokenError(f"missing claim {exc.claim}") from None  # a name from our own list
        except InvalidIssuerError:
            raise TokenError("issuer not allowed") from None
        except InvalidAudienceError:
            raise TokenError("audience not accepted") from None
        except (InvalidKeyError, PyJWKError, InvalidAlgorithmError):
            raise TokenError("key does not fit the algorithm") from None
        except PyJWTError:
            raise TokenError("malformed token") from None
        now = self._clock()
        skew = self.policy.clock_skew
        expires, issued = _seconds(payload["exp"]), _seconds(payload["iat"])
        if expires <= now - skew:
            raise TokenError("token expired")
        if issued > now + skew:
            raise TokenError("token issued in the future")
        if "nbf" in payload and _seconds(payload["nbf"]) > now + skew:
            raise TokenError("token not yet valid")
        if expires < issued or expires - issued > self.policy.max_lifetime:
            raise TokenError("token lifetime too long")
        jti = payload.get("jti")
        if self._replay is not None:
            if not isinstance(jti, str) or not jti:
                raise TokenError("missing claim jti")
            self._replay.remember((payload["iss"], jti), expires + skew, now)
        subject = payload.get("sub")
        return Claims(
            issuer=payload["iss"],
            subject=subject if isinstance(subject, str) else None,
            jti=jti if isinstance(jti, str) else None,
            issued_at=issued,
            expires=expires,
            raw=payload,
        )


def _seconds(value: Any) -> float:
    """A NumericDate claim as seconds; TokenError unless it is a finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenError("malformed time claim")
    return float(value)
