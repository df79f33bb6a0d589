"""Keeping credentials out of everything the controller writes or shows.

Policy: credentials (AWS keys, Ray's auth token, API tokens) reach a job through the cluster nodes'
own environment (instance role, KubeRay secret, `ray_cluster.yaml` env), never through the job:
a Ray job's entrypoint, runtime_env and metadata are stored in the cluster's GCS and shown by its
dashboard to anyone who can reach it. So `mmpt submit` refuses a job whose command line, runtime
env or metadata contains the value of a credential variable from the submitter's environment, and
every text the registry stores or the CLI prints from a cluster (messages, logs) is redacted with
the same values as a second line of defence.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

# Variable names whose values are secrets: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID,
# AWS_SESSION_TOKEN, RAY_AUTH_TOKEN, HF_TOKEN, WANDB_API_KEY, AZURE_STORAGE_KEY, PGPASSWORD, ...
_SECRET_NAME = re.compile(
    r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|PGPASSWORD|CREDENTIALS?|API_?KEY|ACCESS_KEY(_ID)?|PRIVATE_KEY|KEY)(_|$)",
    re.IGNORECASE,
)
# Shorter values are too likely to be ordinary words ("testing", "1") to redact everywhere.
_MIN_SECRET_LEN = 8
MASK = "***"


def is_credential_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def credential_values(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """{variable name: value} of the credential variables set in `env` (default: os.environ)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if is_credential_name(k) and len(v) >= _MIN_SECRET_LEN}


def leaks(texts: Iterable[str], secrets: Mapping[str, str]) -> list[str]:
    """Names of the credential variables whose value occurs in any of `texts` (values never returned)."""
    blob = "\n".join(texts)
    return sorted(name for name, value in secrets.items() if value in blob)


def redact(text: str, secrets: Mapping[str, str] | None = None) -> str:
    """`text` with every credential value replaced by ***, and URL passwords masked."""
    values = credential_values() if secrets is None else secrets
    for value in sorted(values.values(), key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(value, MASK)
    return _URL_PASSWORD.sub(rf"\1{MASK}@", text)


_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@", re.IGNORECASE)


def safe_url(url: str) -> str:
    """A URL fit to print: `postgresql://me:pw@db/x` -> `postgresql://me:***@db/x`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
