""""The run ended as an uninterrupted one would have": the same samples at every step on every rank
and the same final parameters. Shared by the fault-injection tests (worker kill, torn checkpoint,
head loss): they compare against one uninterrupted run of `COMPARED` (the `uninterrupted_run`
fixture, tests/integration/conftest.py); every run records `data.record_samples`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jobs.checkpoint import ds_files

# The runs the fault-injection tests compare: 9 steps, a committed checkpoint every 2, every step's
# sample ids recorded. Each test's own overrides (failures allowed, storage) do not change the numbers.
STEPS = 9
COMPARED = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 2, "data.record_samples": True,
            "eval.max_samples": 16}


def samples_per_step(run_dir: Path) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> sample ids; a step redone after a restart keeps its last record."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in sorted((run_dir / "samples").glob("rank*_*.json"), key=lambda p: p.stat().st_mtime_ns):
        rank = int(f.name[4:].split("_")[0])
        out.setdefault(rank, {}).update({int(k): v for k, v in json.loads(f.read_text()).items()})
    return out


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _tensors(val, f"{prefix}/{key}").items()}
    return {}


def final_params(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for f in ds_files(run_dir / f"checkpoint_{step:07d}"):
        if not f.name.endswith("model_states.pt"):
            continue
        state = torch.load(f, map_location="cpu", weights_only=False)
        params |= _tensors(state.get("module", state), f.name)
    return params


def assert_same_run(straight: Path, resumed: Path, steps: int = STEPS, per_step: int = 8) -> None:
    """`resumed` (interrupted, restarted) saw what `straight` saw, step by step, and ended equal."""
    a, b = samples_per_step(straight), samples_per_step(resumed)
    assert sorted(b) == [0, 1]
    for rank in (0, 1):
        assert sorted(b[rank]) == list(range(1, steps + 1))
        assert b[rank] == a[rank]  # the same samples at every step, on every rank
        ids = [i for s in sorted(b[rank]) for i in b[rank][s]]
        assert len(ids) == len(set(ids)) == steps * per_step  # within the epoch: no sample twice
    pa, pb = final_params(straight, steps), final_params(resumed, steps)
    assert pa.keys() == pb.keys() and len(pa) > 10
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-5, atol=1e-6, msg=name)
