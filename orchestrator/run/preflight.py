"""Checks that make an impossible run say so before anything starts: one line each, exit 2.

Three kinds, run by `mmpt run` on the driver before Ray starts:

- storage: the run directory can be written (not under a file, not in a kernel filesystem such
  as /proc or /sys, a bucket that exists and these credentials may read);
- the S3 endpoint: it speaks http(s) and answers within `ENDPOINT_TIMEOUT_S` (a dead endpoint is
  refused at once; one that accepts and never answers would otherwise hang every request);
- the data: every rank's share of epoch 0 holds at least one optimizer step
  (`train.batch_size × train.grad_accum` samples), and of the held-out set one retrieval
  candidate set (`eval.batch_size`). Without this a rank with no full batch ends every epoch at
  once and the run loops forever (`--set train.batch_size=1000000`). Shards are streamed, not
  decoded (reader.sample_flags: the structural checks), each rank's only until its step is
  full, and for at most `DATA_CHECK_S` seconds: past that the train loop's own check (an epoch
  without a step is an error, jobs/data/stream.py) is the guard. Data whose every sample is bad
  ends here with the error-budget message.
"""

from __future__ import annotations

import http.client
import logging
import os
import posixpath
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from jobs import storage
from jobs.config import RunConfig
from orchestrator.config import ConfigError

if TYPE_CHECKING:
    from orchestrator.run.data_plan import DataPlan
    from orchestrator.run.files import RunFiles

log = logging.getLogger(__name__)

ENDPOINT_TIMEOUT_S = 10.0
DATA_CHECK_S = 30.0
# Kernel filesystems: writes there fail late and oddly (ENOENT on mkdir in /proc, EROFS in /sys).
_VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")


def _s3_uris(cfg: RunConfig) -> list[str]:
    uris: list[str] = [cfg.storage.path]
    for src in cfg.data.sources():
        uris += [src.shards] if isinstance(src.shards, str) else list(src.shards)
    if cfg.data.eval:
        uris += [cfg.data.eval] if isinstance(cfg.data.eval, str) else list(cfg.data.eval)
    uris += [u for u in (cfg.data.tokenizer, cfg.model.init.text, cfg.model.init.vision) if u]
    return [u for u in uris if storage.is_remote(u)]


def check_endpoint(cfg: RunConfig, timeout_s: float = ENDPOINT_TIMEOUT_S) -> None:
    """The S3 endpoint the run's s3:// URIs go to answers HTTP, or one ConfigError line."""
    if not _s3_uris(cfg):
        return
    endpoint = storage.StorageOptions.of(cfg.storage).resolved().endpoint_url
    if endpoint is None:
        return  # AWS itself: the bucket checks below tell what is wrong
    field = "storage.endpoint_url" if cfg.storage.endpoint_url else "AWS_ENDPOINT_URL"
    if problem := storage.endpoint_problem(endpoint):
        raise ConfigError([f"{field} = {endpoint!r}: {problem}"])
    if problem := _http_problem(endpoint, timeout_s):
        raise ConfigError([f"{field} = {endpoint!r}: {problem}"])


def _http_problem(endpoint: str, timeout_s: float) -> str | None:
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    conn = kind(parsed.hostname or "", parsed.port, timeout=timeout_s)
    try:
        conn.request("HEAD", "/")
        conn.getresponse()  # any status: something that speaks HTTP is there
    except TimeoutError:
        return f"accepted the connection but sent no answer within {timeout_s:g} s"
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc})"
    except (OSError, http.client.HTTPException) as exc:
        return f"unreachable ({' '.join(str(exc).split())[:120] or type(exc).__name__})"
    finally:
        conn.close()
    return None


def check_storage(cfg: RunConfig, files: RunFiles) -> None:
    """The run directory can be created and written, without creating anything yet."""
    field = f"storage.path = {cfg.storage.path!r}"
    if storage.is_remote(files.uri):
        _check_bucket(field, files)
        return
    target = Path(files.uri)
    if any(target == Path(root) or Path(root) in target.parents for root in _VIRTUAL_ROOTS):
        raise ConfigError([f"{field}: {target} is in a kernel filesystem ({target.parts[1]}); "
                           "choose a folder on a disk"])
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError([f"{field}: {existing} is a file, so {target} cannot be created under it"])
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"{field}: {existing} is not writable by this user, so {target} cannot be created"])


def _check_bucket(field: str, files: RunFiles) -> None:
    from pyarrow.fs import FileType

    bucket = files.uri[len("s3://"):].split("/", 1)[0]
    try:
        fs, _ = storage.filesystem_for(files.uri, files.opts)
        info = fs.get_file_info(bucket)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{field}: {storage_error(exc)}"]) from None
    if info.type == FileType.NotFound:
        raise ConfigError([f"{field}: bucket {bucket!r} does not exist (create it, or fix the name)"])


def storage_error(exc: BaseException) -> str:
    """pyarrow's multi-line AWS error as one line a user acts on."""
    text = " ".join(str(exc).split())
    for hint, says in (("ACCESS_DENIED", "access denied: check the credentials (AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, ~/.aws, the instance role)"),
                       ("InvalidAccessKeyId", "the access key is not known to this endpoint: check the credentials"),
                       ("SignatureDoesNotMatch", "the secret key does not match the access key: check the credentials"),
                       ("NETWORK_CONNECTION", "the endpoint cannot be reached")):
        if hint in text:
            return f"{says} ({text[:160]})"
    return text[:240]


# -- the data: one step per rank ------------------------------------------------------------------


def check_data(cfg: RunConfig, plan: DataPlan, files: RunFiles, budget_s: float = DATA_CHECK_S) -> None:
    """Every rank's share of epoch 0 holds one step, and of the held-out set one candidate set."""
    world = cfg.scaling.num_workers
    per_rank_eval = -(-cfg.eval.max_samples // world)
    if plan.eval and per_rank_eval < cfg.eval.batch_size:
        raise ConfigError([f"eval.batch_size = {cfg.eval.batch_size}: the retrieval candidate set needs that many "
                           f"held-out samples per worker, but eval.max_samples={cfg.eval.max_samples} over {world} "
                           f"workers gives {per_rank_eval}; lower eval.batch_size or raise eval.max_samples"])
    from jobs.data.ledger import BadSampleLedger, DataBudgetExceeded, check_budget

    ledger = BadSampleLedger()
    checks: list[tuple[str, str, list[str], int, int | None]] = []  # (field, setting, shards, need, seed)
    sources = cfg.data.sources()
    need = cfg.train.batch_size * (cfg.train.grad_accum if len(sources) == 1 else 1)
    setting = (f"train.batch_size = {cfg.train.batch_size}: a step needs {need} samples per worker"
               + (f" (batch_size × grad_accum {cfg.train.grad_accum})" if need != cfg.train.batch_size else ""))
    for i, shards in enumerate(plan.train):
        checks.append(("data.train" if len(sources) == 1 else f"data.train.{i}.shards", setting, shards, need,
                       cfg.data.shuffle_seed))
    if plan.eval:
        checks.append(("data.eval", f"eval.batch_size = {cfg.eval.batch_size}: the retrieval candidate set needs "
                       f"{cfg.eval.batch_size} held-out samples per worker", plan.eval, cfg.eval.batch_size, None))
    from jobs.bounded import TookTooLong, call_within

    def work() -> list[tuple[tuple[str, str, list[str], int, int | None], tuple[int, int]]]:
        return [(c, short) for c in checks
                if (short := _shortest_share(c[2], c[3], c[4], world, files, cfg, ledger)) is not None]

    started = time.monotonic()
    try:
        shorts = call_within(work, budget_s, "mmpt-preflight-data")
    except TookTooLong:
        log.warning("data check gave up after %.0f s; the train loop checks each epoch itself", budget_s)
        return
    if not shorts:
        return
    totals = ledger.totals()
    if totals["bad"]:  # nothing usable because the data is bad: the error-budget message says why
        try:
            check_budget(totals, cfg.data.max_bad_fraction, min_samples=1)
        except DataBudgetExceeded as exc:
            raise ConfigError([f"training data: {exc}"]) from None
    (field, setting, shards, _, _), (rank, count) = shorts[0]
    raise ConfigError([f"{setting}, but worker {rank}'s share of {field} holds {count} "
                       f"({len(shards)} shards over {world} workers, checked in {time.monotonic() - started:.1f} s); "
                       "lower the batch size or use fewer workers"])


def _shortest_share(shards: list[str], need: int, seed: int | None, world: int, files: RunFiles, cfg: RunConfig,
                    ledger: Any) -> tuple[int, int] | None:
    """(rank, samples) of the rank whose epoch-0 share holds the fewest, when some rank holds fewer
    than `need`; None if all hold enough. Past the first short rank the others are counted too: the
    bad-sample counts then cover the whole data, for the error-budget message."""
    from jobs.data.reader import ReadSpec, sample_flags
    from jobs.data.units import rank_shards, rank_units

    spec = ReadSpec(image_size=cfg.data.image_size, storage=files.opts, image_column=cfg.data.image_column,
                    caption_column=cfg.data.caption_column)
    flags: dict[str, list[bool]] = {}

    def valid(shard: str) -> list[bool]:
        if shard not in flags:
            flags[shard], report = sample_flags(shard, spec)
            ledger.add(report)
        return flags[shard]

    short: tuple[int, int] | None = None
    for rank in range(world):
        have = 0
        mine, shared = rank_shards(shards, 0, rank, world, seed)
        # the samples the rank's stream reads: whole shards (read one by one, until the step is full),
        # or with fewer shards than ranks its units of them all
        parts = ((u.shard, u.start, u.stop) for u in rank_units(shards, lambda s: len(valid(s)), 0, rank, world,
                                                                  seed, cfg.data.unit_samples)) if shared else (
            (s, 0, None) for s in mine)
        for shard, start, stop in parts:
            have += sum(valid(shard)[start:stop])
            if have >= need and short is None:
                break
        if have < need and (short is None or have < short[1]):
            short = (rank, have)
    return short


# -- resuming on another number of workers ----------------------------------------------------------


def check_resume(cfg: RunConfig, files: RunFiles) -> None:
    """A checkpoint written by another number of workers resumes only without ZeRO partitioning.

    DeepSpeed refuses ZeRO 1-3 optimizer state partitioned over another data-parallel size
    ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
    currently supported"), and would say so only inside the workers, after start-up.
    """
    import json

    from pyarrow.fs import FileSelector, FileType

    from orchestrator.run.files import is_checkpoint

    fs, root = storage.filesystem_for(files.uri, files.opts)
    try:
        found = fs.get_file_info(FileSelector(root, allow_not_found=True))
    except OSError:
        return
    ckpts = sorted(i.base_name for i in found if i.type == FileType.Directory and is_checkpoint(i.base_name))
    if not ckpts:
        return
    try:
        state = json.loads(storage.read_text(storage.join(files.uri, ckpts[-1], "trainer_state.json"), files.opts))
    except (OSError, ValueError):
        return
    saved = state.get("extra", {}).get("world")
    workers, stage = cfg.scaling.num_workers, cfg.deepspeed.zero_stage
    if saved is not None and saved != workers and stage > 0:
        raise ConfigError([f"scaling.num_workers = {workers}: {ckpts[-1]} of runs/{cfg.name} was written by {saved} "
                           f"workers, and DeepSpeed cannot re-partition ZeRO-{stage} optimizer state over another "
                           f"number; resume with scaling.num_workers={saved}, or start anew with --fresh"])
    if cfg.moe.enabled and (old_ep := _saved_ep_size(fs, root, ckpts[-1])) not in (None, cfg.moe.ep_size):
        raise ConfigError([f"moe.ep_size = {cfg.moe.ep_size}: {ckpts[-1]} of runs/{cfg.name} holds the experts' optimizer "
                           f"state of moe.ep_size = {old_ep} (DeepSpeed saves it per expert-parallel rank and loads it "
                           f"only into as many); resume with moe.ep_size={old_ep}, or start anew with --fresh"])


def _saved_ep_size(fs: Any, root: str, ckpt: str) -> int | None:
    """The expert-parallel size a checkpoint was written with: DeepSpeed's optimizer files of its experts
    (`expp_rank_<r>_mp_rank_00_optim_states.pt`, one per expert-parallel rank, in the writing ranks'
    `ds/` folders: jobs.checkpoint's layout); None without any."""
    from pyarrow.fs import FileSelector

    try:
        found = fs.get_file_info(FileSelector(posixpath.join(root, ckpt), allow_not_found=True, recursive=True))
    except OSError:
        return None
    ranks = {i.base_name.split("_")[2] for i in found if i.base_name.startswith("expp_rank_")}
    return len(ranks) or None
