"""Checkpoints: DeepSpeed's sharded state + what DeepSpeed does not hold, through Ray Train.

Each rank writes its part into a local temporary folder and hands it to `ray.train.report`; Ray
Train merges the folders of all ranks into one checkpoint folder on the run's storage (local or
S3). DeepSpeed names its files by rank (ZeRO optimizer shards `zero_pp_rank_R_*`, experts
`expert_E_*`), so the parts never collide, and a resumed rank loads exactly its own files.

Besides DeepSpeed's model/optimizer/LR-schedule state, a checkpoint holds `trainer_state.json`
(step, samples seen, bad-data ledger; rank 0) and `rank{R}.pt` per rank: its RNG states (masking
and negative sampling draw from them, and a resumed run must draw what it would have) and its data
position (epoch, unit, offset and the epoch's steps: each rank reads its own deterministic stream).

Layout: each rank's files lie under a prefix of their own, `<hash>-rank<R>/` (its `rank<R>.pt` and
its DeepSpeed files under `ds/`), `trainer_state.json` at the top. Object stores throttle writes
per key prefix (S3: ~3,500 PUT/s per prefix), and a thousand ranks uploading into one folder at the
same moment is one prefix; the hash spreads neighbouring ranks over the key space. DeepSpeed loads
from one folder holding every rank's files: `deepspeed_view` links them into one for the load.
Checkpoints of the earlier flat layout (`ds/`, `rank<R>.pt` at the top) still load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a resumed run needs beyond DeepSpeed's own state."""

    step: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def stage(engine: Any, state: TrainerState, rank: int, data_position: dict[str, Any]) -> str:
    """Write this rank's part of a checkpoint into a new temporary folder; the caller owns (deletes) it.

    Collective: every rank must call it at the same step (DeepSpeed's save synchronises).
    """
    tmp = tempfile.mkdtemp(prefix="mmpt-ckpt-")
    try:
        part = os.path.join(tmp, part_dir(rank))
        engine.save_checkpoint(part, tag=DS_TAG)
        payload = {"rng": _rng_state(), "data_position": data_position}
        torch.save(payload, os.path.join(part, rank_file(rank)))
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def report(metrics: dict[str, Any], engine: Any, state: TrainerState, rank: int, data_position: dict[str, Any], *,
           background: bool) -> None:
    """`ray.train.report` with this rank's part of a checkpoint of `state.step`.

    background: Ray Train uploads the part from a thread (CheckpointUploadMode.ASYNC) and the step
    loop goes on; each rank's report reaches the controller only once its upload is done, and the
    controller registers a checkpoint only when every rank has reported it, so a checkpoint that
    a resume can pick is always complete. The local folder is deleted after its upload, either way.
    Only the write to local disk (DeepSpeed's save, the RNG, the data position) stays on the step.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    folder = stage(engine, state, rank, data_position)
    mode = CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=dir_name(state.step), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)


@contextmanager
def staged(engine: Any, state: TrainerState, rank: int, data_position: dict[str, Any]) -> Iterator[str]:
    """Write this rank's part of a checkpoint into a temporary folder and yield its path.

    Collective: every rank must enter it at the same step (DeepSpeed's save synchronises).
    """
    tmp = stage(engine, state, rank, data_position)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def part_dir(rank: int) -> str:
    """The prefix of rank `rank`'s files in a checkpoint: a short hash first, so that neighbouring
    ranks' keys lie apart (an object store partitions its key space by prefix)."""
    return f"{hashlib.sha1(f'rank{rank}'.encode()).hexdigest()[:4]}-rank{rank}"


def rank_path(folder: str | Path, rank: int) -> Path:
    """Where rank `rank`'s `rank<R>.pt` lies in a checkpoint folder (this layout, or the flat one)."""
    spread = Path(folder, part_dir(rank), rank_file(rank))
    return spread if spread.exists() or not Path(folder, rank_file(rank)).exists() else Path(folder, rank_file(rank))


def ds_files(folder: str | Path) -> list[Path]:
    """Every DeepSpeed file of a checkpoint, whichever rank wrote it (each rank's `ds/`, or the flat one)."""
    return sorted(p for pattern in (f"*-rank*/{DS_TAG}/*", f"{DS_TAG}/*") for p in Path(folder).glob(pattern)
                  if p.is_file())


@contextmanager
def deepspeed_view(folder: str | Path) -> Iterator[str]:
    """A folder DeepSpeed can load from (`<view>/ds/` holding every rank's files): links to the
    ranks' files in a temporary folder, or `folder` itself for a checkpoint of the flat layout."""
    files = ds_files(folder)
    if all(p.parent == Path(folder, DS_TAG) for p in files):
        yield str(folder)
        return
    view = tempfile.mkdtemp(prefix="mmpt-ckpt-view-")
    try:
        os.makedirs(os.path.join(view, DS_TAG))
        for p in files:
            os.symlink(p.resolve(), os.path.join(view, DS_TAG, p.name))
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


@dataclass
class Saved:
    """What a checkpoint holds for one rank besides DeepSpeed's state: readable before the engine exists,
    so the data pipeline can start from the saved position while DeepSpeed initialises."""

    state: TrainerState
    part: dict[str, Any] | None  # this rank's {"rng", "data_position"}; None: the world size changed
    # the world size changed: every old rank's data position, by old rank (the stream regroups them)
    world_positions: list[dict[str, Any]] | None = None

    @property
    def data_position(self) -> dict[str, Any] | None:
        return None if self.part is None else self.part["data_position"]


def read(folder: str, rank: int, world: int) -> Saved:
    """The trainer state and this rank's part; a part missing at an unchanged world size is an error.

    At a different world size no rank takes an old rank's part (nor its RNG): the data positions of
    all old ranks come back instead, for the stream to deal what they had left of their epoch to the
    new ranks (RankStream.regroup; README: resuming on another number of workers).
    """
    state = read_state(folder)
    saved_world = state.extra.get("world")
    per_rank = rank_path(folder, rank)
    if saved_world is not None and saved_world != world:
        parts = [rank_path(folder, r) for r in range(int(saved_world))]
        if missing := [p.name for p in parts if not p.exists()]:
            raise RuntimeError(f"checkpoint {folder!r} of {saved_world} ranks lacks {', '.join(missing)}: "
                               "incomplete, refusing to resume from it")
        log.warning("checkpoint of %s ranks resumed on %d: the interrupted epoch's rest is dealt to the new ranks",
                    saved_world, world)
        return Saved(state, None, [torch.load(p, weights_only=False)["data_position"] for p in parts])
    if not per_rank.exists():
        if saved_world == world:  # every rank wrote its part: a missing one means a torn checkpoint
            raise RuntimeError(f"checkpoint {folder!r} lacks {rank_file(rank)}: incomplete, refusing to resume from it")
        return Saved(state, None)
    return Saved(state, torch.load(per_rank, weights_only=False))


def restore(engine: Any, folder: str, saved: Saved) -> None:
    """Load DeepSpeed's model/optimizer/LR-schedule state, and this rank's RNG when it has a part."""
    with deepspeed_view(folder) as view:
        path, _ = engine.load_checkpoint(view, tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder!r} (tag {DS_TAG!r})")
    if saved.part is not None:
        _set_rng_state(saved.part["rng"])


def read_state(folder: str) -> TrainerState:
    return TrainerState(**json.loads(Path(folder, STATE_FILE).read_text()))


def dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"
