"""Collectives on the engine's device: what the loop, the streams and the evaluation hand to
torch.distributed lives on the device they are given (NCCL takes CUDA tensors only), and the
reductions give the right values over two real gloo ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from jobs import collectives
from jobs.config import RunConfig
from jobs.data import steps as steps_module
from jobs.evaluate import _itc_retrieval, _reduce
from jobs.trainer import Trainer
from tests.unit import ranks

META = torch.device("meta")  # not the CPU, and holds no data: a CPU tensor handed over shows at once


class _Handed(Exception):
    """Raised by the fake collectives once they have recorded what they were given."""


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device]]:
    """Two ranks as far as the helpers can tell; each collective records (op, device of every tensor)."""
    calls: list[tuple[str, torch.device]] = []

    def record(name: str):  # noqa: ANN202
        def fake(*args: Any, **kwargs: Any) -> None:
            for a in [*args, *kwargs.values()]:
                for t in a if isinstance(a, list) else [a]:
                    if isinstance(t, torch.Tensor):
                        calls.append((name, t.device))
            raise _Handed

        return fake

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
                 "broadcast"):
        monkeypatch.setattr(dist, name, record(name), raising=False)
    return calls


def _assert_on_meta(calls: list[tuple[str, torch.device]]) -> None:
    assert calls, "no collective was called"
    assert all(device == META for _, device in calls), calls


@pytest.mark.parametrize("call", [
    lambda: collectives.all_mean({"loss": 1.0, "acc": torch.zeros((), device=META)}, META),
    lambda: collectives.all_max(0.25, META),
    lambda: collectives.all_have(True, META),
    lambda: collectives.all_reduce_dict({"n": 3}, META),
    lambda: collectives.all_gather_rows(torch.zeros(4, 8, device=META), META),
], ids=["all_mean", "all_max", "all_have", "all_reduce_dict", "all_gather_rows"])
def test_helpers_hand_tensors_on_the_given_device(handed, call) -> None:  # noqa: ANN001
    with pytest.raises(_Handed):
        call()
    _assert_on_meta(handed)


class _Stream:
    steps_done = 0

    def planned_batches(self) -> int:
        return 1

    def epoch(self, ahead_after: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        yield {"input_ids": torch.zeros(2, 3)}

    def next_epoch(self) -> None:
        pass

    def describe(self) -> str:
        return "a fake stream"


def test_data_stream_agreement_uses_the_device(handed) -> None:  # noqa: ANN001
    with pytest.raises(_Handed):
        next(steps_module.synchronized_steps(_Stream(), 1, META))
    _assert_on_meta(handed)
    handed.clear()
    with pytest.raises(_Handed):
        next(steps_module.synchronized_batches(_Stream(), META))
    _assert_on_meta(handed)


def test_evaluation_reduction_and_gather_use_the_device(handed) -> None:  # noqa: ANN001
    with pytest.raises(_Handed):
        _reduce({"batches": 1.0, "loss": torch.ones((), device=META)}, META)
    _assert_on_meta(handed)
    handed.clear()
    e = torch.zeros(3, 4, device=META)
    with pytest.raises(_Handed):
        _itc_retrieval([(e, e, torch.zeros(3, dtype=torch.long, device=META))], lambda *a: None, META)
    _assert_on_meta(handed)


class _MetaEngine:
    """An engine whose device is `meta`: its outputs can be summed but never read on the host."""

    device = META
    module = torch.nn.Module()

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss = torch.zeros((), device=META)
        return {"loss": loss, "losses": {"mlm": loss}, "metrics": {"mlm_acc": loss}}

    def backward(self, loss: torch.Tensor) -> None:
        pass

    def step(self) -> None:
        pass

    def get_lr(self) -> list[float]:
        return [1e-4]


def _raw(n: int = 4, T: int = 6) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, T, dtype=torch.long)
    mask[:, 4:] = 0
    return {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": mask,
            "image": torch.zeros(n, 3, 8, 8, dtype=torch.uint8)}


def test_train_steps_never_read_the_device_and_the_report_reduces_on_it(handed) -> None:  # noqa: ANN001
    cfg = RunConfig.model_validate({"train": {"grad_accum": 2}})
    trainer = Trainer(cfg, _MetaEngine(), visual_tokens=16)
    trainer.memory = {}  # skip the model-state measurement (it needs a real DeepSpeed engine)
    for _ in range(3):  # a host read of a meta tensor would raise here
        trainer.train_step([_raw(), _raw()])
    assert trainer.state.step == 3 and trainer.window.samples == 24
    assert trainer.window.tokens == 6 * (4 * 4 + 4 * 16)  # host-counted: 4 real text + 16 visual per sample
    assert all(v.device == META for v in trainer.window.sums.values())
    with pytest.raises(_Handed):
        trainer.report()
    _assert_on_meta(handed)


def _two_ranks(rank: int, port: int, out: str) -> None:
    ranks.join(rank, port)
    cpu = torch.device("cpu")
    got = {
        "mean": collectives.all_mean({"a": float(rank), "b": torch.tensor(10.0 * (rank + 1))}, cpu),
        "max": collectives.all_max(0.1 + rank, cpu),
        "have_all": collectives.all_have(True, cpu),
        "have_one": collectives.all_have(rank == 0, cpu),
        # rank 0: 2 rows of width 3, rank 1: 3 rows of width 2 (padded to 3 with zeros)
        "rows": collectives.all_gather_rows(torch.full((2 + rank, 3 - rank), rank + 1), cpu),
    }
    torch.save(got, f"{out}/rank{rank}.pt")
    ranks.leave()


@pytest.mark.slow  # two spawned processes import torch (~10 s)
def test_reductions_over_two_gloo_ranks(tmp_path) -> None:  # noqa: ANN001
    ranks.spawn_two(_two_ranks, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["mean"] == {"a": 0.5, "b": 15.0}
        assert got["max"] == pytest.approx(1.1)
        assert got["have_all"] is True and got["have_one"] is False
        assert got["rows"].tolist() == [[1, 1, 1], [1, 1, 1], [2, 2, 0], [2, 2, 0], [2, 2, 0]]
