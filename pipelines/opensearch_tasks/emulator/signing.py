"""Server-side verification of Alibaba Cloud request signatures (ACS3 and legacy ROA).

The canonical forms mirror ``alibabacloud_tea_openapi.utils`` (``get_authorization`` for ACS3,
``Utils.get_string_to_sign`` for ROA HMAC-SHA1) with one server-side rule: the path that is signed is
the path *as received*, still percent-encoded. The SDK signs ``Params.pathname`` verbatim and sends
it verbatim (``requests`` only re-quotes characters that are not allowed in a URL), so a client must
percent-encode each path segment itself before calling (``a b`` -> ``a%20b``, ``/`` -> ``%2F``),
exactly like the generated OpenSearch SDK does with ``get_encode_param``. A client that signs the
decoded path is refused, as the real gateway would.

Errors never echo the secret, the signature or the security token.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote

ACS3 = "ACS3-HMAC-SHA256"
ROA_V1 = "ROA-HMAC-SHA1"
MAX_SKEW_SECONDS = 15 * 60
API_VERSION = "2017-12-25"
_REQUIRED_ACS3 = frozenset(
    {
        "host",
        "x-acs-action",
        "x-acs-version",
        "x-acs-date",
        "x-acs-signature-nonce",
        "x-acs-content-sha256",
    }
)


class AuthError(Exception):
    """A refused request: HTTP status, gateway error code and a message safe to return."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Credential:
    """A key the emulator accepts; STS keys also carry their token (and maybe an expiry)."""

    secret: str
    token: str | None = None
    expires_at: float | None = None  # wall-clock epoch seconds


@dataclass(frozen=True)
class AuthInfo:
    """Who signed an accepted request, and how."""

    scheme: str
    access_key_id: str


class NonceCache:
    """Remembers nonces for the skew window (two rotating generations: O(1), bounded)."""

    def __init__(self, window_seconds: float = MAX_SKEW_SECONDS) -> None:
        self._window = window_seconds
        self._lock = threading.Lock()
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self._rotated = time.monotonic()

    def seen(self, nonce: str) -> bool:
        """Record ``nonce``; True if it was already used."""
        with self._lock:
            now = time.monotonic()
            if now - self._rotated > self._window:
                self._previous, self._current, self._rotated = self._current, set(), now
            if nonce in self._current or nonce in self._previous:
                return True
            self._current.add(nonce)
            return False


class Headers:
    """Minimal view of request headers: lower-case name -> list of values (as received)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._d: dict[str, list[str]] = {}
        for name, value in pairs:
            self._d.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header."""
        values = self._d.get(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of a header."""
        return self._d.get(name, [])

    def names(self) -> list[str]:
        """Lower-case names of the headers present."""
        return list(self._d)


def scheme_of(authorization: str | None) -> str | None:
    """The signature scheme an Authorization header claims (for request records)."""
    if not authorization:
        return None
    if authorization.startswith(ACS3 + " "):
        return ACS3
    if authorization.startswith("acs "):
        return ROA_V1
    return "unknown"


def acs3_canonical_query(query: Mapping[str, str]) -> str:
    """Same as ``alibabacloud_tea_openapi.utils.get_canonical_query_string``."""
    return "&".join(f"{k}={quote(query[k], safe='~')}" for k in sorted(query))


def roa_canonical_resource(raw_path: str, query: Mapping[str, str]) -> str:
    """Same as ``Utils._get_canonicalized_resource`` (values unencoded, '' -> bare key)."""
    if not query:
        return raw_path
    parts = [k if query[k] == "" else f"{k}={query[k]}" for k in sorted(query)]
    return f"{raw_path}?{'&'.join(parts)}"


def _parse_acs3(value: str) -> tuple[str, list[str], str]:
    try:
        fields = dict(part.strip().split("=", 1) for part in value[len(ACS3) :].strip().split(","))
        ak, signed, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
    except (ValueError, KeyError):
        raise AuthError(400, "IncompleteSignature", "The Authorization header is malformed.") from None
    names = [n for n in signed.split(";") if n]
    if not ak or not names or not signature:
        raise AuthError(400, "IncompleteSignature", "The Authorization header is malformed.")
    return ak, names, signature


class Verifier:
    """Checks a request's signature against the configured keys."""

    def __init__(self, credentials: Mapping[str, Credential]) -> None:
        self.credentials = dict(credentials)
        self.nonces = NonceCache()

    def verify(
        self, method: str, raw_path: str, query: Mapping[str, str], headers: Headers, body: bytes
    ) -> AuthInfo:
        """Accept the request (returning who signed it) or raise ``AuthError``."""
        auth = headers.get("authorization")
        if not auth:
            raise AuthError(400, "MissingAuthorization", "The Authorization header is missing.")
        if auth.startswith(ACS3 + " "):
            info = self._acs3(method, raw_path, query, headers, body, auth)
        elif auth.startswith("acs "):
            info = self._roa(method, raw_path, query, headers, auth)
        else:
            raise AuthError(400, "IncompleteSignature", "Unsupported signature algorithm.")
        version = headers.get("x-acs-version")
        if version is not None and version != API_VERSION:
            raise AuthError(400, "InvalidVersion", f"Specified version is not valid: {version}.")
        nonce = headers.get("x-acs-signature-nonce")
        if nonce and self.nonces.seen(nonce):
            raise AuthError(400, "SignatureNonceUsed", "The request signature nonce has been used.")
        return info

    def _credential(self, ak: str) -> Credential:
        cred = self.credentials.get(ak)
        if cred is None:
            raise AuthError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        return cred

    def _acs3(
        self,
        method: str,
        raw_path: str,
        query: Mapping[str, str],
        headers: Headers,
        body: bytes,
        auth: str,
    ) -> AuthInfo:
        ak, names, signature = _parse_acs3(auth)
        cred = self._credential(ak)
        signed = set(names)
        missing = _REQUIRED_ACS3 - signed
        unsigned = {n for n in headers.names() if n.startswith("x-acs-")} - signed
        if missing or unsigned:
            raise AuthError(
                400,
                "IncompleteSignature",
                f"Headers must be signed: {', '.join(sorted(missing | unsigned))}.",
            )
        _check_fresh_iso(headers.get("x-acs-date") or "")
        payload_hash = headers.get("x-acs-content-sha256", "")
        if payload_hash != hashlib.sha256(body).hexdigest():
            raise AuthError(400, "SignatureDoesNotMatch", "The content hash does not match.")
        canon_headers = "".join(f"{n}:{_joined(headers.get_all(n))}\n" for n in sorted(signed))
        canonical = "\n".join(
            (
                method,
                raw_path or "/",
                acs3_canonical_query(query),
                canon_headers,
                ";".join(sorted(signed)),
                payload_hash,
            )
        )
        to_sign = f"{ACS3}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        expected = hmac.new(cred.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise AuthError(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
            )
        self._check_token(ak, cred, headers)
        return AuthInfo(ACS3, ak)

    def _roa(
        self, method: str, raw_path: str, query: Mapping[str, str], headers: Headers, auth: str
    ) -> AuthInfo:
        ak, sep, signature = auth[4:].strip().rpartition(":")
        if not sep or not ak or not signature:
            raise AuthError(400, "IncompleteSignature", "The Authorization header is malformed.")
        cred = self._credential(ak)
        date = headers.get("date")
        if not date:
            raise AuthError(400, "IncompleteSignature", "The Date header is missing.")
        _check_fresh_http_date(date)
        method_header = headers.get("x-acs-signature-method")
        if method_header not in (None, "HMAC-SHA1"):
            raise AuthError(400, "IncompleteSignature", "Unsupported signature method.")
        head = "\n".join(
            (
                method,
                (headers.get("accept") or ""),
                (headers.get("content-md5") or ""),
                (headers.get("content-type") or ""),
                date,
            )
        )
        canon_headers = "".join(
            f"{n}:{headers.get(n)}\n" for n in sorted(headers.names()) if n.startswith("x-acs-")
        )
        to_sign = f"{head}\n{canon_headers}{roa_canonical_resource(raw_path, query)}"
        digest = hmac.new(cred.secret.encode(), to_sign.encode(), hashlib.sha1).digest()
        if not hmac.compare_digest(base64.b64encode(digest), signature.encode()):
            raise AuthError(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
            )
        self._check_token(ak, cred, headers)
        return AuthInfo(ROA_V1, ak)

    @staticmethod
    def _check_token(ak: str, cred: Credential, headers: Headers) -> None:
        token = headers.get("x-acs-security-token")
        declared = headers.get("x-acs-accesskey-id")
        if declared is not None and declared != ak:
            raise AuthError(400, "InvalidSecurityToken.Mismatch", "The access key does not match.")
        if cred.token is None:
            if token is not None:
                raise AuthError(
                    400,
                    "InvalidSecurityToken.Mismatch",
                    "A security token was sent with a permanent access key.",
                )
            return
        if token is None or not hmac.compare_digest(token.encode(), cred.token.encode()):
            raise AuthError(
                400,
                "InvalidSecurityToken.Mismatch",
                "The security token is missing or does not match the access key.",
            )
        if cred.expires_at is not None and time.time() >= cred.expires_at:
            raise AuthError(400, "InvalidSecurityToken.Expired", "The security token has expired.")


_ISO_CACHE: dict[str, float] = {}


def _check_fresh_iso(value: str) -> None:
    ts = _ISO_CACHE.get(value)
    if ts is None:  # strptime is slow next to a lookup; a date string repeats for a whole second
        try:
            ts = calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            raise AuthError(400, "InvalidTimeStamp.Format", "x-acs-date is not valid.") from None
        if len(_ISO_CACHE) > 4096:
            _ISO_CACHE.clear()
        _ISO_CACHE[value] = ts
    _check_skew(ts)


def _joined(values: list[str]) -> str:
    """Header values as the SDK canonicalises them: stripped, sorted, comma-joined."""
    if len(values) == 1:
        return values[0].strip()
    return ",".join(sorted(v.strip() for v in values))


def _check_fresh_http_date(value: str) -> None:
    try:
        ts = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        raise AuthError(400, "InvalidTimeStamp.Format", "The Date header is not valid.") from None
    _check_skew(ts)


def _check_skew(ts: float) -> None:
    if abs(time.time() - ts) > MAX_SKEW_SECONDS:
        raise AuthError(
            400,
            "InvalidTimeStamp.Expired",
            "Specified time stamp or date value is expired (more than 15 minutes off).",
        )


def sign_acs3(
    method: str,
    raw_path: str,
    query: Mapping[str, str],
    host: str,
    access_key_id: str,
    secret: str,
    *,
    action: str = "ListFunctionTasks",
    security_token: str | None = None,
    body: bytes = b"",
    nonce: str | None = None,
    date: str | None = None,
) -> dict[str, str]:
    """Client-side ACS3 headers for a raw request (benchmarks and tests; the connector uses the SDK).

    ``raw_path`` must already be percent-encoded, as it will be sent.
    """
    headers = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": API_VERSION,
        "x-acs-date": date or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
        "accept": "application/json",
    }
    if security_token:
        headers["x-acs-accesskey-id"] = access_key_id
        headers["x-acs-security-token"] = security_token
    names = sorted(headers)
    canonical = "\n".join(
        (
            method,
            raw_path,
            acs3_canonical_query(query),
            "".join(f"{n}:{headers[n].strip()}\n" for n in names),
            ";".join(names),
            headers["x-acs-content-sha256"],
        )
    )
    to_sign = f"{ACS3}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"{ACS3} Credential={access_key_id},SignedHeaders={';'.join(names)},Signature={signature}"
    )
    return headers
