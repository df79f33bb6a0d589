"""Checkpoints: DeepSpeed's sharded state + what DeepSpeed does not hold, through Ray Train.

Each rank writes its part into a local temporary folder and hands it to `ray.train.report`; Ray
Train merges the folders of all ranks into one checkpoint folder on the run's storage (local or
S3). DeepSpeed names its files by rank (ZeRO optimizer shards `zero_pp_rank_R_*`, experts
`expert_E_*`), so the parts never collide, and a resumed rank loads exactly its own files.

Besides DeepSpeed's model/optimizer/LR-schedule state, a checkpoint holds `trainer_state.json`
(step, samples seen, bad-data ledger; rank 0) and `rank{R}.pt` per rank: its RNG states (masking
and negative sampling draw from them, and a resumed run must draw what it would have) and its data
position (epoch, shard, offset: each rank reads its own deterministic stream).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


@contextmanager
def staged(engine: Any, state: TrainerState, rank: int, data_position: dict[str, Any]) -> Iterator[str]:
    """Write this rank's part of a checkpoint into a temporary folder and yield its path.

    Collective: every rank must enter it at the same step (DeepSpeed's save synchronises).
    """
    with tempfile.TemporaryDirectory(prefix="mmpt-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"trainer_state": asdict(state)})
        torch.save({"rng": _rng_state(), "data_position": data_position}, os.path.join(tmp, rank_file(rank)))
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        yield tmp


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


@dataclass
class Restored:
    state: TrainerState
    data_position: dict[str, Any] | None  # None: this rank had no position (world size changed)


def restore(engine: Any, folder: str, rank: int) -> Restored:
    """Load DeepSpeed's state, this rank's RNG and its data position from a checkpoint folder."""
    path, client = engine.load_checkpoint(folder, tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder!r} (tag {DS_TAG!r})")
    per_rank = Path(folder, rank_file(rank))
    position = None
    if per_rank.exists():
        saved = torch.load(per_rank, weights_only=False)
        _set_rng_state(saved["rng"])
        position = saved["data_position"]
    return Restored(TrainerState(**client["trainer_state"]), position)


def read_state(folder: str) -> TrainerState:
    return TrainerState(**json.loads(Path(folder, STATE_FILE).read_text()))


def dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"
