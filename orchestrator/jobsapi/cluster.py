"""Talking to a Ray cluster's Jobs API: addresses, token auth, one-line errors.

Auth follows Ray's own token mode (docs.ray.io ray-security/token-auth): when `RAY_AUTH_MODE=token`
the client sends `Authorization: Bearer <token>`, the token read from `RAY_AUTH_TOKEN`, else the
file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (the order Ray's token loader uses).
We resolve the token ourselves and hand it to `JobSubmissionClient` as a header, so which token a
command used is explicit and can be named in an error, and it is never stored anywhere.

Without auth, anyone who reaches a Ray dashboard can submit a job, i.e. run arbitrary code on the
cluster (CVE-2023-48022, "ShadowRay"); `insecure_warning` says so for non-loopback addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator.jobsapi.credentials import redact, safe_url

_TIMEOUT_S = (10.0, 120.0)  # (connect, read): uploads of a working dir may take a while to answer
DEFAULT_PORT = 8265


class ClusterError(RuntimeError):
    """A problem the user can act on (address, auth, unknown job), as one line."""


class ClusterUnreachable(ClusterError):
    """The dashboard did not answer at all (refused, timed out): the cluster may be down."""


@dataclass(frozen=True)
class Auth:
    token: str | None = field(default=None, repr=False)
    source: str = "none"  # where the token came from, for messages; never the token itself

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass(frozen=True)
class ClusterJob:
    """One job as the cluster lists it (times in seconds since the epoch)."""

    id: str
    status: str
    message: str = ""
    entrypoint: str = ""
    start_time: float | None = None
    end_time: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    driver_exit_code: int | None = None
    error_type: str = ""  # Ray's JobErrorType of a FAILED job ("" when Ray gives none)


def check_address(address: str | None) -> str:
    """`http(s)://HOST[:PORT]` of a Ray dashboard, normalised; ClusterError otherwise."""
    if not address:
        raise ClusterError("--address is required: the Ray dashboard URL, e.g. http://127.0.0.1:8265 "
                           "(or set RAY_API_SERVER_ADDRESS)")
    parts = urlsplit(address.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path not in ("", "/"):
        raise ClusterError(f"--address {safe_url(address)!r}: expected the Ray dashboard's http(s)://HOST:PORT, "
                           f"e.g. http://127.0.0.1:{DEFAULT_PORT}")
    return address.strip().rstrip("/")


def is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_auth(env: Mapping[str, str] | None = None, home: Path | None = None) -> Auth:
    """The token this process would send, following Ray's token mode and lookup order."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return Auth()
    if env.get("RAY_AUTH_TOKEN"):
        return Auth(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else (home or Path.home()) / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise ClusterError(f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a "
                           f"file holding it ({path} is missing or empty); the head prints it with `ray get-auth-token`")
    return Auth(token, f"RAY_AUTH_TOKEN_PATH={path}" if env.get("RAY_AUTH_TOKEN_PATH") else str(path))


def insecure_warning(address: str, auth: Auth) -> str | None:
    """A warning for sending a job to a non-loopback cluster without token auth, else None."""
    if auth.token or is_loopback(address):
        return None
    return (f"submitting to {safe_url(address)} without authentication: anyone who can reach this Ray dashboard "
            "can run arbitrary code on the cluster (CVE-2023-48022); enable Ray token auth (RAY_AUTH_MODE=token "
            "on the cluster and here) or reach the dashboard through an SSH tunnel on 127.0.0.1")


# JobSubmissionClient always prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address it is
# given; a controller that talks to several clusters must not be redirected by its own environment.
_ENV_LOCK = threading.Lock()
_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in _ADDRESS_VARS if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _client_class() -> type:
    import requests
    from ray.job_submission import JobSubmissionClient

    class _Client(JobSubmissionClient):
        """Ray's client with request timeouts (Ray sets none: an unreachable head would hang a
        controller's loop) and auth failures turned into one-line ClusterErrors."""

        _mmpt_auth_source = "none"

        def _do_request(self, method: str, endpoint: str, *, data: bytes | None = None,
                        json_data: dict | None = None, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", _TIMEOUT_S)
            r = requests.request(method, self._address + endpoint, cookies=self._cookies, data=data,
                                 json=json_data, headers=self._headers, verify=self._verify, **kwargs)
            if r.status_code == 401:
                raise ClusterError(f"{self._address} requires Ray token authentication (HTTP 401): set "
                                   "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                                   "(the head prints its token with `ray get-auth-token`)")
            if r.status_code == 403:
                raise ClusterError(f"{self._address} rejected the token from {self._mmpt_auth_source} "
                                   "(HTTP 403): it is not this cluster's token")
            return r

    return _Client


_CLIENT_CLASS: type | None = None


def connect(address: str, auth: Auth | None = None) -> Any:
    """A JobSubmissionClient for the dashboard at `address` (connection and version checked)."""
    global _CLIENT_CLASS
    address = check_address(address)
    auth = resolve_auth() if auth is None else auth
    _CLIENT_CLASS = _CLIENT_CLASS or _client_class()
    client = object.__new__(_CLIENT_CLASS)
    client._mmpt_auth_source = auth.source  # read by _do_request during __init__'s version check
    with errors(address), _without_address_env():
        _CLIENT_CLASS.__init__(client, address, headers=auth.headers)
    return client


@contextlib.contextmanager
def errors(address: str) -> Iterator[None]:
    """Turn what a Jobs API call can raise for a user-fixable reason into one-line ClusterErrors."""
    import requests

    try:
        yield
    except ClusterError:
        raise
    except requests.exceptions.Timeout:
        raise ClusterUnreachable(f"{safe_url(address)}: the Ray dashboard did not answer within {_TIMEOUT_S[0]:.0f} s") from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise ClusterUnreachable(f"{safe_url(address)}: cannot reach a Ray dashboard there (is the head running, and is "
                           f"this its dashboard port, default {DEFAULT_PORT}?)") from None
    except requests.exceptions.RequestException as exc:
        raise ClusterError(f"{safe_url(address)}: request failed ({type(exc).__name__})") from None
    except RuntimeError as exc:  # Ray's client raises RuntimeError for any other HTTP error
        raise ClusterError(f"{safe_url(address)}: {redact(_one_line(exc))}") from None


def _one_line(exc: BaseException) -> str:
    """The first line of Ray's error; for a server-side traceback (a 400 carries one: "Request failed
    with status code 400: Traceback ..."), its status part and the exception's own last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip(" .")]  # Ray appends "." on a line
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Traceback (most recent call last)" in lines[0]:
        return f"{lines[0].split(': Traceback')[0]}: {lines[-1].rstrip('.')}"
    return lines[0]


def submit_job(client: Any, address: str, *, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
               metadata: dict[str, str]) -> str:
    """Send one job; ClusterError for what `errors` names, ValueError for a working dir Ray cannot pack."""
    with errors(address):
        return client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                 metadata=metadata)


def _enum_text(value: Any) -> str:
    """A str Enum's value (str() of one is its qualified name in Python 3.11), else the text."""
    return str(getattr(value, "value", value) or "")


def _seconds(ms: Any) -> float | None:
    return float(ms) / 1000.0 if ms else None


def list_jobs(client: Any, address: str) -> dict[str, ClusterJob]:
    """{submission id: ClusterJob} for every submitted job the cluster knows."""
    with errors(address):
        details = client.list_jobs()
    out: dict[str, ClusterJob] = {}
    for d in details:
        if not d.submission_id:  # drivers started with ray.init, not through the Jobs API
            continue
        status = getattr(d.status, "value", d.status)
        out[d.submission_id] = ClusterJob(
            id=d.submission_id, status=str(status), message=redact(d.message or ""), entrypoint=d.entrypoint or "",
            start_time=_seconds(d.start_time), end_time=_seconds(d.end_time), metadata=dict(d.metadata or {}),
            driver_exit_code=getattr(d, "driver_exit_code", None), error_type=_enum_text(getattr(d, "error_type", None)))
    return out


async def follow_logs(client: Any, job_id: str, redact: Callable[[str], str], quiet_s: float = 2.0) -> str:
    """Stream the job's log until the job ends; returns the raw text shown.

    Ray's websocket tail normally closes when the job ends, but it can stay open on a finished job; a status
    poll beside it ends the stream once the job is terminal and the log has been quiet for `quiet_s`.
    """
    import asyncio

    shown: list[str] = []
    last = time.monotonic()

    async def _stream() -> None:
        nonlocal last
        async for chunk in client.tail_job_logs(job_id):
            shown.append(chunk)
            last = time.monotonic()
            sys.stdout.write(redact(chunk))
            sys.stdout.flush()

    async def _watch() -> None:
        while True:
            await asyncio.sleep(0.5)
            ended = await asyncio.to_thread(lambda: client.get_job_status(job_id).is_terminal())
            if ended and time.monotonic() - last > quiet_s:
                return

    stream, watch = asyncio.create_task(_stream()), asyncio.create_task(_watch())
    await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stream, watch):
        task.cancel()
    await asyncio.gather(stream, watch, return_exceptions=True)
    if stream.done() and not stream.cancelled() and stream.exception() is not None:
        raise stream.exception()
    return "".join(shown)
