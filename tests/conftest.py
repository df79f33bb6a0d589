"""Shared fixtures. Kept small and free of Ray so unit tests stay fast."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no slow instance-metadata probes on a laptop
}


@dataclass
class S3Server:
    """A running S3-protocol server (moto) on loopback."""

    endpoint_url: str
    region: str = "us-east-1"
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def env(self) -> dict[str, str]:
        """Env vars that point AWS clients (boto3, pyarrow, Ray workers' runtime_env) here."""
        return {**_FAKE_AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": self.region}

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one when `name` is None) and return its name."""
        import boto3

        name = name or f"bucket-{next(self._names)}"
        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)
        client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1 (random port) with fake credentials in the env for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    server.stop()


# Real PostgreSQL / Prometheus servers on 127.0.0.1 (tests/services.py).
from tests.services import postgres_server  # noqa: E402,F401 - a fixture, registered by import
