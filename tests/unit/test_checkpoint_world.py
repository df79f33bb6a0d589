"""A checkpoint read on another number of ranks: no rank takes an old rank's data part or RNG, every
rank starts the epoch after the saved one (nothing of the interrupted epoch seen twice); at the same
world size a missing part is a torn checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs import checkpoint as ckpt


def _checkpoint(folder: Path, world: int, position: dict) -> Path:
    folder.mkdir()
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": 8, "samples_seen": 128, "extra": {"world": world}}))
    for rank in range(world):
        torch.save({"rng": {}, "data_position": position}, folder / ckpt.rank_file(rank))
    return folder


def test_another_world_size_starts_the_next_epoch_on_every_rank(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "c", 2, {"epoch": 3, "unit": 1, "offset": 17, "steps": 5})
    for rank, world in ((0, 1), (0, 4), (3, 4)):
        saved = ckpt.read(str(folder), rank, world)
        assert saved.part is None and saved.state.step == 8
        assert saved.data_position == {"epoch": 4, "unit": 0, "offset": 0, "steps": 0}
    # a checkpoint from before units (shard positions) moves on to its next epoch the same way
    old = _checkpoint(tmp_path / "o", 2, {"epoch": 3, "shard_pos": 1, "offset": 17})
    assert ckpt.read(str(old), 0, 4).data_position == {"epoch": 4, "unit": 0, "offset": 0, "steps": 0}


def test_a_mixture_moves_every_source_to_its_next_epoch(tmp_path: Path) -> None:
    pos = {"drawn": 11, "sources": [{"epoch": 0, "unit": 2, "offset": 5, "steps": 0},
                                     {"epoch": 2, "unit": 0, "offset": 9, "steps": 0}]}
    saved = ckpt.read(str(_checkpoint(tmp_path / "m", 2, pos)), 1, 3)
    assert saved.data_position == {"drawn": 11, "sources": [{"epoch": 1, "unit": 0, "offset": 0, "steps": 0},
                                                            {"epoch": 3, "unit": 0, "offset": 0, "steps": 0}]}


def test_same_world_size_reads_the_ranks_own_part_and_refuses_a_torn_one(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "s", 2, {"epoch": 0, "unit": 1, "offset": 3, "steps": 2})
    assert ckpt.read(str(folder), 1, 2).data_position == {"epoch": 0, "unit": 1, "offset": 3, "steps": 2}
    (folder / ckpt.rank_file(1)).unlink()
    with pytest.raises(RuntimeError, match="lacks rank1.pt: incomplete"):
        ckpt.read(str(folder), 1, 2)


def test_resuming_zero_state_on_another_worker_count_is_refused_in_one_line(tmp_path: Path) -> None:
    from orchestrator.config import ConfigError, load_config
    from orchestrator.run import preflight
    from orchestrator.run.files import RunFiles

    cfg = load_config(None, [f"storage.path={tmp_path}", "name=ws", "scaling.num_workers=1", "moe.ep_size=1"])
    (tmp_path / "runs" / "ws").mkdir(parents=True)
    preflight.check_resume(cfg, RunFiles(cfg))  # no checkpoint: nothing to check
    _checkpoint(tmp_path / "runs" / "ws" / "checkpoint_0000004", 2, {"epoch": 0, "unit": 0, "offset": 8, "steps": 1})
    with pytest.raises(ConfigError) as info:
        preflight.check_resume(cfg, RunFiles(cfg))
    assert info.value.problems == [
        "scaling.num_workers = 1: checkpoint_0000004 of runs/ws was written by 2 workers, and DeepSpeed cannot "
        "re-partition ZeRO-2 optimizer state over another number; resume with scaling.num_workers=2, or start "
        "anew with --fresh"]
    preflight.check_resume(load_config(None, [f"storage.path={tmp_path}", "name=ws", "scaling.num_workers=2"]),
                           RunFiles(cfg))
    dense = load_config(None, [f"storage.path={tmp_path}", "name=ws", "scaling.num_workers=1", "moe.ep_size=1",
                               "deepspeed.zero_stage=0"])
    preflight.check_resume(dense, RunFiles(dense))  # no partitioned optimizer state: resumes (next epoch)
