"""A checkpoint's keys spread over prefixes (#20 item 4): each rank's files under `<hash>-rank<R>/`,
and DeepSpeed loads every rank's files through one linked view; the flat layout still loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from jobs import checkpoint as ckpt


class _Engine:
    """What `stage` calls: DeepSpeed's save writes this rank's files under <dir>/<tag>/."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def save_checkpoint(self, path: str, tag: str) -> None:
        os.makedirs(os.path.join(path, tag))
        name = "mp_rank_00_model_states.pt" if self.rank == 0 else f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"
        torch.save({"rank": self.rank}, os.path.join(path, tag, name))


def _merged(tmp_path: Path, world: int) -> Path:
    """Every rank's staged folder merged into one, as Ray Train does on the run's storage."""
    out = tmp_path / "checkpoint_0000004"
    for rank in range(world):
        staged = ckpt.stage(_Engine(rank), ckpt.TrainerState(step=4), rank, {"epoch": 0, "unit": rank, "offset": 1,
                                                                               "steps": 4})
        shutil.copytree(staged, out, dirs_exist_ok=True)
        shutil.rmtree(staged)
    return out


def test_each_rank_writes_under_its_own_hashed_prefix_and_deepspeed_sees_one_folder(tmp_path: Path) -> None:
    folder = _merged(tmp_path, 3)
    tops = sorted(p.name for p in folder.iterdir())
    assert tops == sorted([ckpt.STATE_FILE, *(ckpt.part_dir(r) for r in range(3))])
    for rank in range(3):
        assert ckpt.rank_path(folder, rank) == folder / ckpt.part_dir(rank) / f"rank{rank}.pt"
        assert ckpt.read(str(folder), rank, 3).data_position == {"epoch": 0, "unit": rank, "offset": 1, "steps": 4}
    names = [p.name for p in ckpt.ds_files(folder)]
    assert sorted(names) == ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                             "zero_pp_rank_2_mp_rank_00_optim_states.pt"]
    with ckpt.deepspeed_view(folder) as view:
        ds = Path(view, ckpt.DS_TAG)
        assert sorted(p.name for p in ds.iterdir()) == sorted(names)
        loaded: Any = torch.load(ds / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
        assert loaded == {"rank": 2}
    assert not Path(view).exists()  # the view is temporary


def test_neighbouring_ranks_lie_apart_in_the_key_space() -> None:
    parts = [ckpt.part_dir(r) for r in range(256)]
    assert len(set(parts)) == 256 and all(p.endswith(f"-rank{r}") for r, p in enumerate(parts))
    firsts = [p[0] for p in parts]
    assert len(set(firsts)) == 16  # every leading hex digit is used: 256 ranks over 16 ranges at least
    assert sum(a == b for a, b in zip(firsts, firsts[1:], strict=False)) < 40  # neighbours rarely share one


def test_a_checkpoint_of_the_flat_layout_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    (folder / ckpt.DS_TAG).mkdir(parents=True)
    (folder / ckpt.STATE_FILE).write_text('{"step": 2, "samples_seen": 32, "extra": {"world": 1}}')
    torch.save({"rng": {}, "data_position": {"epoch": 0, "unit": 0, "offset": 5, "steps": 2}}, folder / "rank0.pt")
    torch.save({}, folder / ckpt.DS_TAG / "mp_rank_00_model_states.pt")
    assert ckpt.rank_path(folder, 0) == folder / "rank0.pt"
    assert ckpt.read(str(folder), 0, 1).data_position["offset"] == 5
    with ckpt.deepspeed_view(folder) as view:
        assert view == str(folder)
