"""Checkpoints: DeepSpeed's sharded state + what DeepSpeed does not hold, through Ray Train.

Each rank writes its part into a local temporary folder and hands it to `ray.train.report`; Ray
Train merges the folders of all ranks into one checkpoint folder on the run's storage (local or
S3). DeepSpeed names its files by rank (ZeRO optimizer shards `zero_pp_rank_R_*`, experts
`expert_E_*`), so the parts never collide, and a resumed rank loads exactly its own files.

Besides DeepSpeed's model/optimizer/LR-schedule state, a checkpoint holds `trainer_state.json`
(step, epoch, data position; rank 0) and `rng_rank{R}.pt` (each rank's RNG state), because
masking and negative sampling draw from the RNG and a resumed run must draw what it would have.
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
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@contextmanager
def staged(engine: Any, state: TrainerState, rank: int) -> Iterator[str]:
    """Write this rank's part of a checkpoint into a temporary folder and yield its path.

    Collective: every rank must enter it at the same step (DeepSpeed's save synchronises).
    """
    with tempfile.TemporaryDirectory(prefix="mmpt-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"trainer_state": asdict(state)})
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        yield tmp


def restore(engine: Any, folder: str, rank: int) -> TrainerState:
    """Load DeepSpeed's state and this rank's RNG from a checkpoint folder."""
    path, client = engine.load_checkpoint(folder, tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder!r} (tag {DS_TAG!r})")
    rng_file = Path(folder, f"rng_rank{rank}.pt")
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**client["trainer_state"])


def read_state(folder: str) -> TrainerState:
    return TrainerState(**json.loads(Path(folder, STATE_FILE).read_text()))


def dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"
