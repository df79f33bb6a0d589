"""The Ray Data pipeline reading from S3 through a proxy that fails 10 % of requests with 503
SlowDown: the epoch still delivers every sample exactly once."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from tests.services import relay

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that answers `rate` of requests with 503."""

    def __init__(self, upstream: str, rate: float, seed: int = 0) -> None:
        target = urlparse(upstream)
        rng, lock = random.Random(seed), threading.Lock()
        self.requests = self.failed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                with lock:
                    proxy.requests += 1
                    fail = rng.random() < rate
                    proxy.failed += fail
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                relay(self, target, body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def s3_shards(s3_server) -> Iterator[tuple[str, list[str]]]:  # noqa: ANN001 - fixture
    from jobs.data.formats import iter_shard
    from jobs.data.synth import write_synthetic
    from jobs.storage import StorageOptions

    bucket = s3_server.create_bucket("faulty-data")
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    res = write_synthetic(f"s3://{bucket}/shapes", samples=96, shards=3, seed=5, image_size=32, eval_samples=16,
                          options=opts)
    keys = [s.key for shard in res.train_shards for s in iter_shard(shard, opts)]
    yield f"s3://{bucket}/shapes", keys


def test_epoch_delivers_every_sample_once_through_failing_s3(ray_session, s3_server, s3_shards) -> None:
    from jobs.data.pipeline import PipelineSpec, sample_id
    from jobs.data.stream import RankStream
    from jobs.storage import StorageOptions, expand_shards

    root, keys = s3_shards
    with FaultyProxy(s3_server.endpoint_url, rate=0.10, seed=3) as proxy:
        opts = StorageOptions(endpoint_url=proxy.endpoint_url)
        shards = expand_shards(f"{root}/train", opts)
        spec = PipelineSpec(tokenizer_uri=f"{root}/tokenizer.json", image_size=32, max_text_len=24,
                            max_objects=3, storage=opts)
        stream = RankStream(shards, spec, batch_size=8, rank=0, world=1, seed=11)
        seen = [int(i) for batch in stream.epoch() for i in batch["sample_id"]]
    assert proxy.failed >= 1, f"the proxy injected no failure in {proxy.requests} requests"
    assert len(seen) == len(keys) == 96
    assert sorted(seen) == sorted(sample_id(k) for k in keys)  # every sample, exactly once


def test_mixture_draws_by_weight_and_resumes_exactly(ray_session, shapes_data) -> None:
    from itertools import islice

    from jobs.data.formats import iter_shard
    from jobs.data.pipeline import PipelineSpec, sample_id
    from jobs.data.stream import MixtureStream, RankStream
    from jobs.storage import StorageOptions, expand_shards

    shards = expand_shards(str(shapes_data / "train"))
    a_ids = {sample_id(s.key) for shard in shards[:2] for s in iter_shard(shard)}
    spec = PipelineSpec(tokenizer_uri=str(shapes_data / "tokenizer.json"), image_size=32, max_text_len=24,
                        max_objects=3, storage=StorageOptions())

    def mixture() -> MixtureStream:
        streams = [RankStream(part, spec, batch_size=8, rank=0, world=1, seed=1) for part in (shards[:2], shards[2:])]
        return MixtureStream(streams, [3.0, 1.0], seed=1, rank=0)

    mix = mixture()
    it = mix.epoch()
    head = [[int(i) for i in b["sample_id"]] for b in islice(it, 10)]
    saved = mix.state()
    tail = [[int(i) for i in b["sample_id"]] for b in islice(it, 30)]  # source A (128 samples) wraps an epoch
    origin = [0 if set(b) <= a_ids else 1 for b in head + tail]
    assert origin == [mix.choice(i) for i in range(40)]  # every batch from exactly one source
    assert 0.6 <= origin.count(0) / 40 <= 0.9  # weight 3:1

    resumed = mixture()
    resumed.load(saved)
    again = [[int(i) for i in b["sample_id"]] for b in islice(resumed.epoch(), 30)]
    assert again == tail  # the same batches after a restore, across source A's epoch boundary
