"""A checkpoint read on another number of ranks: no rank takes an old rank's data part or RNG; every
old rank's data position comes back, for the stream to deal their epoch's rest (test_regroup); at
the same world size a missing part is a torn checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs import checkpoint as ckpt


def _checkpoint(folder: Path, world: int, position: dict | list[dict]) -> Path:
    folder.mkdir()
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": 8, "samples_seen": 128, "extra": {"world": world}}))
    for rank in range(world):
        part = position[rank] if isinstance(position, list) else position
        (folder / ckpt.part_dir(rank)).mkdir()
        torch.save({"rng": {}, "data_position": part}, ckpt.rank_path(folder, rank))
    return folder


def test_another_world_size_gets_every_old_ranks_position_in_rank_order(tmp_path: Path) -> None:
    positions = [{"epoch": 3, "unit": 1, "offset": 17, "steps": 5}, {"epoch": 3, "unit": 4, "offset": 2, "steps": 5}]
    folder = _checkpoint(tmp_path / "c", 2, positions)
    for rank, world in ((0, 1), (0, 4), (3, 4)):
        saved = ckpt.read(str(folder), rank, world)
        assert saved.part is None and saved.data_position is None and saved.state.step == 8
        assert saved.world_positions == positions
    ckpt.rank_path(folder, 1).unlink()
    with pytest.raises(RuntimeError, match="of 2 ranks lacks rank1.pt: incomplete"):
        ckpt.read(str(folder), 0, 1)


def test_same_world_size_reads_the_ranks_own_part_and_refuses_a_torn_one(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "s", 2, {"epoch": 0, "unit": 1, "offset": 3, "steps": 2})
    assert ckpt.read(str(folder), 1, 2).data_position == {"epoch": 0, "unit": 1, "offset": 3, "steps": 2}
    ckpt.rank_path(folder, 1).unlink()
    with pytest.raises(RuntimeError, match="lacks rank1.pt: incomplete"):
        ckpt.read(str(folder), 1, 2)


def _resume_problems(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    """What the driver's resume check says of the config (one line per problem; [] = resumes)."""
    from orchestrator.config import ConfigError, load_config
    from orchestrator.run import preflight
    from orchestrator.run.files import RunFiles

    cfg = load_config(None, [f"storage.path={tmp_path}", f"name={name}", *overrides])
    try:
        preflight.check_resume(cfg, RunFiles(cfg))
    except ConfigError as exc:
        return exc.problems
    return []


def test_resuming_zero_state_on_another_worker_count_is_refused_in_one_line(tmp_path: Path) -> None:
    one = ("scaling.num_workers=1", "moe.ep_size=1")
    (tmp_path / "runs" / "ws").mkdir(parents=True)
    assert _resume_problems(tmp_path, "ws", *one) == []  # no checkpoint: nothing to check
    _checkpoint(tmp_path / "runs" / "ws" / "checkpoint_0000004", 2, {"epoch": 0, "unit": 0, "offset": 8, "steps": 1})
    assert _resume_problems(tmp_path, "ws", *one) == [
        "scaling.num_workers = 1: checkpoint_0000004 of runs/ws was written by 2 workers, and DeepSpeed cannot "
        "re-partition ZeRO-2 optimizer state over another number; resume with scaling.num_workers=2, or start "
        "anew with --fresh"]
    assert _resume_problems(tmp_path, "ws", "scaling.num_workers=2") == []
    # no partitioned optimizer state: resumes, the data regrouped
    assert _resume_problems(tmp_path, "ws", *one, "deepspeed.zero_stage=0") == []


def test_resuming_experts_on_another_ep_size_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "runs" / "ep").mkdir(parents=True)
    ckpt_dir = _checkpoint(tmp_path / "runs" / "ep" / "checkpoint_0000006", 2,
                           {"epoch": 0, "unit": 0, "offset": 8, "steps": 1})
    for r in range(2):  # DeepSpeed's experts' optimizer state, one file per expert-parallel rank, in its rank's part
        (ckpt_dir / ckpt.part_dir(r) / ckpt.DS_TAG).mkdir()
        (ckpt_dir / ckpt.part_dir(r) / ckpt.DS_TAG / f"expp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    base = ("deepspeed.zero_stage=0", "moe.num_experts=4")
    assert _resume_problems(tmp_path, "ep", *base, "scaling.num_workers=1", "moe.ep_size=1") == [
        "moe.ep_size = 1: checkpoint_0000006 of runs/ep holds the experts' optimizer state of moe.ep_size = 2 "
        "(DeepSpeed saves it per expert-parallel rank and loads it only into as many); resume with moe.ep_size=2, "
        "or start anew with --fresh"]
    # 2 -> 4 workers, experts split as before: resumes; no experts in the config: nothing to check
    assert _resume_problems(tmp_path, "ep", *base, "scaling.num_workers=4", "moe.ep_size=2") == []
    assert _resume_problems(tmp_path, "ep", *base, "scaling.num_workers=1", "moe.num_experts=0") == []
