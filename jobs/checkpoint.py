"""Checkpoints: DeepSpeed's sharded state + what DeepSpeed does not hold, through Ray Train.

Each rank writes its part into a local temporary folder and hands it to `ray.train.report`; Ray
Train merges the folders of all ranks into one checkpoint folder on the run's storage (local or
S3). DeepSpeed names its files by rank (ZeRO optimizer shards `zero_pp_rank_R_*`, experts
`expert_E_*`), so the parts never collide, and a resumed rank loads exactly its own files.

Besides DeepSpeed's model/optimizer/LR-schedule state, a checkpoint holds `trainer_state.json`
(step, samples seen, bad-data ledger; rank 0) and `rank{R}.pt` per rank: its RNG states (masking
and negative sampling draw from them, and a resumed run must draw what it would have) and its data
position (epoch, unit, offset and the epoch's steps: each rank reads its own deterministic stream).
"""

from __future__ import annotations

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
        engine.save_checkpoint(tmp, tag=DS_TAG)
        payload = {"rng": _rng_state(), "data_position": data_position}
        torch.save(payload, os.path.join(tmp, rank_file(rank)))
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
    per_rank = Path(folder, rank_file(rank))
    if saved_world is not None and saved_world != world:
        parts = [Path(folder, rank_file(r)) for r in range(int(saved_world))]
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
    path, _ = engine.load_checkpoint(folder, tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder!r} (tag {DS_TAG!r})")
    if saved.part is not None:
        _set_rng_state(saved.part["rng"])


def read_state(folder: str) -> TrainerState:
    return TrainerState(**json.loads(Path(folder, STATE_FILE).read_text()))


def dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"
