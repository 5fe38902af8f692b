"""The errors the command turns into exit codes, kept apart from the code that raises them so
that the command can tell them apart without importing dlt or Alibaba Cloud's SDK."""

from __future__ import annotations

from typing import Any


class UsageError(ValueError):
    """Bad options or configuration: exit code 2, one line, no traceback."""


class RunError(RuntimeError):
    """The run could not complete (locked file, failed instances, ...): exit code 1."""


class ModelsError(RuntimeError):
    """The SQL models cannot be built or read (a bad model file, models not built): exit code 1."""


# Codes that say the credentials themselves are wrong: every other request would fail the same way,
# so the run stops at the first one (and the CLI exits 2: a configuration error).
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthorization",
        "InvalidSecurityToken.Expired",
        "InvalidSecurityToken.Mismatch",
        "InvalidSecurityToken.MismatchWithAccessKey",
        "InvalidSecurityToken.Malformed",
        "InvalidTimeStamp.Expired",
    }
)
AUTH_CODE_HINTS = {
    "InvalidAccessKeyId.NotFound": "check the access key id",
    "SignatureDoesNotMatch": "check the access key secret",
    "IncompleteSignature": "check the access key secret",
    "MissingAuthorization": "set credentials (see the README, 'Configure')",
    "InvalidSecurityToken.Expired": "refresh the STS token",
    "InvalidSecurityToken.Mismatch": "the STS token does not belong to this access key",
    "InvalidAccessKeyId.Inactive": "the access key is disabled; enable it or use another",
    "InvalidTimeStamp.Expired": "the system clock is off; sync it (NTP)",
    "Forbidden.RAM": "grant the RAM user opensearch:ListFunctionTasks",
    "App.NotFound": "check the app group name (opensearch-tasks run --target APP/...)",
    "Instance.NotExist": "check the function and instance names",
}


class OpenSearchError(Exception):
    """An API call that failed for good. The message is safe to print (no secrets)."""

    def __init__(
        self,
        what: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        message: str | None = None,
        attempts: int = 1,
        retryable: bool = False,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.what = what
        self.code = code
        self.status = status
        self.request_id = request_id
        self.api_message = message
        self.attempts = attempts
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds
        super().__init__(self._render())

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable with every field (a reading process sends its errors to the loader)."""
        fields = {
            "code": self.code,
            "status": self.status,
            "request_id": self.request_id,
            "message": self.api_message,
            "attempts": self.attempts,
            "retryable": self.retryable,
            "retry_after_seconds": self.retry_after_seconds,
        }
        return _rebuild_error, (type(self), self.what, fields)

    @property
    def is_throttling(self) -> bool:
        """The server refused the request for its rate (flow control), not for what it asked."""
        return (self.code or "").startswith("Throttling") or self.status == 429

    @property
    def is_credentials_error(self) -> bool:
        """The credentials are wrong (not this request): no other request can succeed."""
        return self.code in CREDENTIAL_CODES

    def _render(self) -> str:
        parts = [self.what]
        if self.code:
            parts.append(f"code {self.code}")
        if self.status:
            parts.append(f"HTTP {self.status}")
        if self.api_message:
            parts.append(self.api_message)
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        if self.attempts > 1:
            parts.append(f"after {self.attempts} attempts")
        hint = AUTH_CODE_HINTS.get(self.code or "")
        if hint:
            parts.append(f"hint: {hint}")
        return ": ".join(parts[:1]) + (" (" + "; ".join(parts[1:]) + ")" if parts[1:] else "")


def _rebuild_error(kind: type[OpenSearchError], what: str, fields: dict[str, Any]) -> OpenSearchError:
    return kind(what, **fields)


class CredentialsError(OpenSearchError):
    """No usable credentials: a configuration error (exit code 2)."""
