"""The checks that make an impossible run say so before Ray starts (orchestrator/run/preflight.py): the run
directory, the S3 endpoint (dead, silent, wrong credentials, missing bucket), a tokenizer that is not
one, and data too small or too bad for one step. Each is one ConfigError line within a bounded time."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import storage
from jobs.data.formats import ShardWriter
from orchestrator.config import ConfigError, load_config
from orchestrator.run import preflight
from orchestrator.run.data_plan import plan_data
from orchestrator.run.files import RunFiles

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"


def _problem(fn, *args, **kwargs) -> str:  # noqa: ANN001 - any check
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    (line,) = info.value.problems
    assert "\n" not in line
    return line


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jobs.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic(str(out), samples=96, shards=4, seed=1, image_size=32, eval_samples=24, vocab_size=200)
    return out


def _cfg(data: Path, storage_path: Path | str, *extra: str):  # noqa: ANN202 - RunConfig
    return load_config(QUICKSTART, [f"data.train={data}/train", f"data.eval={data}/eval", "data.image_size=32",
                                    "model.patch_size=8", f"storage.path={storage_path}", "eval.batch_size=8",
                                    "eval.max_samples=16", *extra])


# -- the run directory ------------------------------------------------------------------------------


def test_storage_under_a_file_is_one_line(shapes: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = _cfg(shapes, blocker / "deeper")
    assert _problem(preflight.check_storage, cfg, RunFiles(cfg)) == (
        f"storage.path = '{blocker}/deeper': {blocker} is a file, so {blocker}/deeper/runs/quickstart cannot be "
        "created under it")


@pytest.mark.parametrize("root", ["/proc", "/sys", "/proc/self/fd"])
def test_storage_in_a_kernel_filesystem_is_one_line(shapes: Path, root: str) -> None:
    cfg = _cfg(shapes, f"{root}/mmpt")
    line = _problem(preflight.check_storage, cfg, RunFiles(cfg))
    assert line.startswith(f"storage.path = '{root}/mmpt': ") and "kernel filesystem" in line
    assert not Path(root, "mmpt").exists()


def test_storage_in_a_writable_folder_passes_and_creates_nothing(shapes: Path, tmp_path: Path) -> None:
    cfg = _cfg(shapes, tmp_path / "new" / "root")
    preflight.check_storage(cfg, RunFiles(cfg))
    assert not (tmp_path / "new").exists()


# -- the S3 endpoint --------------------------------------------------------------------------------


@pytest.fixture()
def silent_endpoint() -> Iterator[str]:
    """Accepts connections and never answers (a wedged proxy, a firewall that black-holes)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_endpoint_is_one_line_at_once(shapes: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_dead_port()}"
    cfg = _cfg(shapes, "s3://bucket/x", f"storage.endpoint_url={url}")
    started = time.monotonic()
    assert _problem(preflight.check_endpoint, cfg) == (
        f"storage.endpoint_url = '{url}': connection refused (nothing listens there)")
    assert time.monotonic() - started < 5


def test_an_endpoint_that_never_answers_is_one_line_in_bounded_time(shapes: Path, silent_endpoint: str) -> None:
    cfg = _cfg(shapes, "s3://bucket/x", f"storage.endpoint_url={silent_endpoint}")
    started = time.monotonic()
    assert _problem(preflight.check_endpoint, cfg, timeout_s=1.0) == (
        f"storage.endpoint_url = '{silent_endpoint}': accepted the connection but sent no answer within 1 s")
    assert time.monotonic() - started < 5


def test_an_env_endpoint_that_is_not_http_names_the_variable(shapes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:21")
    cfg = _cfg(shapes, "s3://bucket/x")
    assert _problem(preflight.check_endpoint, cfg) == (
        "AWS_ENDPOINT_URL = 'ftp://127.0.0.1:21': an S3 endpoint must use http:// or https://, not ftp://")


def test_local_runs_probe_no_endpoint(shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_dead_port()}")
    preflight.check_endpoint(_cfg(shapes, tmp_path))  # nothing on S3: nothing to reach


def test_s3_missing_bucket_and_wrong_credentials_are_one_line(shapes: Path, s3_server,  # noqa: ANN001
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(shapes, "s3://no-such-bucket/runs", f"storage.endpoint_url={s3_server.endpoint_url}")
    preflight.check_endpoint(cfg)  # moto answers
    assert _problem(preflight.check_storage, cfg, RunFiles(cfg)) == (
        "storage.path = 's3://no-such-bucket/runs': bucket 'no-such-bucket' does not exist (create it, or fix the name)")
    bucket = s3_server.create_bucket()
    cfg = _cfg(shapes, f"s3://{bucket}/runs", f"storage.endpoint_url={s3_server.endpoint_url}")
    preflight.check_storage(cfg, RunFiles(cfg))
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now on
    started = time.monotonic()
    line = _problem(preflight.check_storage, cfg, RunFiles(cfg))
    assert line.startswith(f"storage.path = 's3://{bucket}/runs': ") and "check the credentials" in line
    assert time.monotonic() - started < 15
    bad_data = load_config(QUICKSTART, [f"data.train=s3://{bucket}/train/", f"storage.path={shapes}",
                                        f"storage.endpoint_url={s3_server.endpoint_url}"])
    line = _problem(plan_data, bad_data, RunFiles(bad_data))
    assert line.startswith(f"data.train = 's3://{bucket}/train/': ") and "check the credentials" in line


# -- the tokenizer and the data ---------------------------------------------------------------------


def test_a_tokenizer_file_that_is_not_a_tokenizer_is_one_line(shapes: Path, tmp_path: Path) -> None:
    fake = tmp_path / "tokenizer.json"
    fake.write_text(json.dumps({"hello": "world"}))
    cfg = _cfg(shapes, tmp_path, f"data.tokenizer={fake}")
    line = _problem(plan_data, cfg, RunFiles(cfg))
    assert line.startswith(f"data.tokenizer = '{fake}': not a Hugging Face tokenizer.json (")


def test_a_batch_larger_than_a_ranks_share_is_one_line(shapes: Path, tmp_path: Path) -> None:
    cfg = _cfg(shapes, tmp_path, "train.batch_size=1000000")
    files = RunFiles(cfg)
    line = _problem(preflight.check_data, cfg, plan_data(cfg, files), files)
    assert line.startswith("train.batch_size = 1000000: a step needs 1000000 samples per worker, but worker 0's "
                           "share of data.train holds 48 (4 shards over 2 workers")


def test_grad_accum_counts_into_the_step(shapes: Path, tmp_path: Path) -> None:
    cfg = _cfg(shapes, tmp_path, "train.batch_size=16", "train.grad_accum=4")
    files = RunFiles(cfg)
    line = _problem(preflight.check_data, cfg, plan_data(cfg, files), files)
    assert line.startswith("train.batch_size = 16: a step needs 64 samples per worker (batch_size × grad_accum 4)")
    ok = _cfg(shapes, tmp_path, "train.batch_size=16", "train.grad_accum=3")
    preflight.check_data(ok, plan_data(ok, RunFiles(ok)), RunFiles(ok))


def test_an_eval_set_smaller_than_the_candidate_set_is_one_line(shapes: Path, tmp_path: Path) -> None:
    cfg = _cfg(shapes, tmp_path, "eval.batch_size=16", "eval.max_samples=16")
    files = RunFiles(cfg)
    assert _problem(preflight.check_data, cfg, plan_data(cfg, files), files) == (
        "eval.batch_size = 16: the retrieval candidate set needs that many held-out samples per worker, but "
        "eval.max_samples=16 over 2 workers gives 8; lower eval.batch_size or raise eval.max_samples")
    cfg = _cfg(shapes, tmp_path, "eval.batch_size=16", "eval.max_samples=512")
    line = _problem(preflight.check_data, cfg, plan_data(cfg, files), files)
    assert line.startswith("eval.batch_size = 16: the retrieval candidate set needs 16 held-out samples per worker, "
                           "but worker 0's share of data.eval holds 12")


def _bad_tar(path: Path, n: int) -> None:
    with ShardWriter(str(path)) as w:
        for i in range(n):
            w.write(f"k{i:04d}", {"jpg": b"\xff\xd8 junk"})  # no caption: every sample is bad


def test_data_whose_every_shard_is_bad_ends_with_the_error_budget(shapes: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    for s in range(3):
        _bad_tar(bad / f"{s:05d}.tar", 10)
    pq.write_table(pa.table({"jpg": [b"x"], "text": ["wrong column"]}), bad / "00003.parquet")
    cfg = _cfg(shapes, tmp_path, f"data.train={bad}", f"data.tokenizer={shapes}/tokenizer.json", "data.eval=null")
    files = RunFiles(cfg)
    started = time.monotonic()
    line = _problem(preflight.check_data, cfg, plan_data(cfg, files), files)
    assert time.monotonic() - started < 10
    assert line.startswith("training data: ") and "data.max_bad_fraction=0.05" in line
    assert "missing_caption: " in line and "bad_schema: 1" in line
    assert "00003.parquet (1 of 1: no column 'caption'" in line


def test_the_data_check_gives_up_quietly_past_its_budget(shapes: Path, tmp_path: Path) -> None:
    cfg = _cfg(shapes, tmp_path, "train.batch_size=1000000")
    files = RunFiles(cfg)
    plan = plan_data(cfg, files)
    started = time.monotonic()
    preflight.check_data(cfg, plan, files, budget_s=0.0)  # no verdict in time: the train loop checks
    assert time.monotonic() - started < 2


def test_data_that_fits_passes(shapes: Path, tmp_path: Path) -> None:
    cfg = _cfg(shapes, tmp_path, "train.batch_size=8")
    files = RunFiles(cfg)
    preflight.check_data(cfg, plan_data(cfg, files), files)
    assert not storage.exists(files.uri)
