"""Expert parallelism across 2 processes (gloo on 127.0.0.1, DeepSpeed process groups; no Ray).

- Outputs and gradients of an ep_size=2 MoEFFN equal those of the same weights at ep_size=1, for
  every gate and both dispatches, with drops, padding and uneven token counts per rank.
- One DeepSpeed (ZeRO-2) step: dense gradients are averaged over ranks, expert gradients are not
  reduced across the expert-parallel group (rank 0 and rank 1 hold different experts).
- Expert checkpoints: a different expert init per rank, `engine.save_checkpoint`, fresh processes
  with yet another init, `engine.load_checkpoint`: every expert is back, on the right rank.

Each spawn writes its measurements to JSON/.pt files; the assertions run in the pytest process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from models.moe.config import MoEConfig
from tests.services import free_port

pytestmark = pytest.mark.slow

D, E, WORLD = 8, 4, 2
L = E // WORLD  # experts per rank
STEP_SEED = 1000

# name -> MoEConfig overrides; every case is run at ep_size 1 (reference) and ep_size 2
CASES: dict[str, dict[str, Any]] = {
    "switch_drops": dict(gate="switch", capacity_factor=0.5, drop_policy="position"),
    "switch_rsample_random_drops": dict(gate="switch", capacity_factor=0.5, noisy_gate_policy="rsample"),
    "gshard_random_second": dict(gate="gshard", capacity_factor=1.25, drop_policy="position"),
    "noisy_topk_dropless": dict(gate="noisy_topk", top_k=2, dropless=True),
    "switch_deepspeed_dispatch": dict(gate="switch", capacity_factor=0.5, drop_policy="position",
                                      dispatch="deepspeed"),
    "gshard_deepspeed_dispatch_dropless": dict(gate="gshard", dropless=True, dispatch="deepspeed"),
}


def _cfg(ep_size: int, **overrides: Any) -> MoEConfig:
    return MoEConfig(num_experts=E, ep_size=ep_size, min_capacity=0, z_loss_weight=0.01, **overrides)


def _inputs(rank: int) -> tuple[Tensor, Tensor]:
    """Different data and padding per rank, so ranks route different token counts."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 12, D, generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 12 - 3 * (rank + 1):] = 0
    return x, mask



def _setup(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _spawn(fn: Any, *args: Any) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), fn, *args), nprocs=WORLD, join=True)


def _worker(rank: int, port: int, fn: Any, *args: Any) -> None:
    _setup(rank, port)
    try:
        fn(rank, *args)
    finally:
        # without it gloo's threads abort the process at exit (or hang it for seconds)
        torch.distributed.destroy_process_group()


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _run(moe: nn.Module, x: Tensor, mask: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # GShard's coin, noise, random drops: same draws at ep 1 and ep 2
    y, aux, counts = moe(x, mask)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    ((y * w).sum() + aux).backward()
    return y.detach(), x.grad, counts


def _equivalence(rank: int, out: str) -> None:
    from models.moe import MoEFFN
    from models.moe.experts import split_stacked

    report: dict[str, Any] = {}
    for name, overrides in CASES.items():
        torch.manual_seed(0)
        ref = MoEFFN(D, _cfg(1, **overrides), mlp_ratio=2.0)
        with torch.no_grad():
            for p in ref.parameters():  # distinct experts (DeepSpeed deep-copies one module)
                p.normal_(0, 0.5)
        par = MoEFFN(D, _cfg(2, **overrides), mlp_ratio=2.0)
        state = {k: v for k, v in ref.state_dict().items() if ".deepspeed_experts." not in k}
        for i in range(L):  # rank r holds global experts r*L .. r*L+L-1
            prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
            for k, v in ref.state_dict().items():
                if k.startswith(f"{prefix}{rank * L + i}."):
                    state[k.replace(f"{prefix}{rank * L + i}.", f"{prefix}{i}.")] = v
        par.load_state_dict(state)
        par.moe.set_deepspeed_parallelism()  # what deepspeed.initialize does for every MoE layer

        x, mask = _inputs(rank)
        y, gx, counts = _run(par, x, mask, STEP_SEED + rank)
        par_grads = split_stacked({n: p.grad for n, p in par.named_parameters()})

        # Reference: ep_size 1 on each rank's data. An expert's gradient on its owner sums the
        # contributions of both ranks' tokens; the router's gradient comes from local tokens only.
        ref_grads: dict[str, Tensor] = {}
        for r in range(WORLD):
            ref.zero_grad(set_to_none=True)
            ry, rgx, rcounts = _run(ref, *_inputs(r), STEP_SEED + r)
            for n, g in split_stacked({n: p.grad for n, p in ref.named_parameters()}).items():
                if ".deepspeed_experts." in n:
                    ref_grads[n] = ref_grads.get(n, 0) + g
                elif r == rank:
                    ref_grads[n] = g.clone()
            if r == rank:
                ref_y, ref_gx, ref_counts = ry, rgx, rcounts
        local_ref_grads = {}
        for n, g in ref_grads.items():
            if ".deepspeed_experts." in n:
                idx = int(n.split(".deepspeed_experts.")[1].split(".")[0])
                if idx // L != rank:
                    continue
                n = n.replace(f".deepspeed_experts.{idx}.", f".deepspeed_experts.{idx % L}.")
            local_ref_grads[n] = g
        report[name] = {
            "y": float((y - ref_y).abs().max()),
            "x_grad": float((gx - ref_gx).abs().max()),
            "param_grads": _max_diff(par_grads, local_ref_grads),
            "counts_equal": bool(torch.equal(counts, ref_counts)),
            "routed": int(counts.sum()),
            "real_tokens": int(mask.sum()),
            "dropped": float(par.last_stats.dropped),
        }
    Path(out, f"equivalence_{rank}.json").write_text(json.dumps(report))


class _TwoMoELayers(nn.Module):
    """Two MoE layers between dense ones: DeepSpeed numbers MoE layers in module order."""

    def __init__(self, moe: MoEConfig) -> None:
        super().__init__()
        from models.moe import MoEFFN

        self.inp = nn.Linear(D, D)
        self.moe1 = MoEFFN(D, moe, mlp_ratio=2.0)
        self.moe2 = MoEFFN(D, moe, mlp_ratio=2.0)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.inp(x)
        y1, aux1, _ = self.moe1(h, mask)
        y2, aux2, _ = self.moe2(h + y1, mask)
        return (h + y1 + y2).square().mean() + aux1 + aux2


def _engine(seed: int, rank: int, lr: float) -> Any:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(seed)  # dense weights: identical on every rank
    model = _TwoMoELayers(_cfg(2, gate="switch", dropless=True))
    gen = torch.Generator().manual_seed(seed * 31 + rank)  # experts: different per rank
    with torch.no_grad():
        for p in model.parameters():
            if getattr(p, "allreduce", True) is False:
                p.normal_(0, 0.5, generator=gen)
    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"params": list(model.parameters()), "name": "all"}])
    optimizer = torch.optim.SGD(groups, lr=lr)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def _experts(engine: Any) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in engine.module.state_dict().items() if ".deepspeed_experts." in k}


def _save(rank: int, out: str) -> None:
    from models.moe.experts import split_stacked

    engine = _engine(seed=1, rank=rank, lr=1.0)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    x, mask = _inputs(rank)
    # this rank's own autograd gradients (ZeRO-2 moves .grad into its buffers, so take them apart)
    names, params = zip(*engine.module.named_parameters(), strict=True)
    local_grads = split_stacked(dict(zip(names, torch.autograd.grad(engine.module(x, mask), params), strict=True)))
    engine.backward(engine(x, mask))
    engine.step()
    # SGD with lr 1: the update is minus the gradient DeepSpeed reduced
    update = split_stacked({n: before[n] - p.detach() for n, p in engine.module.named_parameters()})
    torch.save({"local_grads": local_grads, "update": update}, Path(out, f"step_{rank}.pt"))
    engine.save_checkpoint(str(Path(out, "ckpt")), tag="t")
    torch.save(_experts(engine), Path(out, f"experts_{rank}.pt"))


def _first(rank: int, out: str) -> None:
    """One spawn for both: starting 2 processes that import DeepSpeed costs most of the time."""
    _equivalence(rank, out)
    _save(rank, out)


def _load(rank: int, out: str) -> None:
    engine = _engine(seed=2, rank=rank, lr=1.0)  # another init: nothing matches the checkpoint yet
    fresh = _experts(engine)
    path, _ = engine.load_checkpoint(str(Path(out, "ckpt")), tag="t")
    assert path is not None
    torch.save({"fresh": fresh, "loaded": _experts(engine)}, Path(out, f"loaded_{rank}.pt"))


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe_parallel")
    _spawn(_first, str(out))
    _spawn(_load, str(out))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_ep2_matches_ep1_outputs_and_gradients(ran: Path, case: str) -> None:
    for rank in range(WORLD):
        r = json.loads(Path(ran, f"equivalence_{rank}.json").read_text())[case]
        assert r["counts_equal"]
        assert (r["dropped"] > 0) == ("drops" in case or "dispatch" in case and "dropless" not in case), r
        assert r["y"] < 1e-5 and r["x_grad"] < 1e-5 and r["param_grads"] < 1e-5, r
    real = [json.loads(Path(ran, f"equivalence_{k}.json").read_text())[case]["real_tokens"] for k in range(WORLD)]
    assert real[0] != real[1]  # uneven token counts across ranks: the all-to-all splits differ


def test_deepspeed_step_reduces_dense_grads_but_not_experts_across_ranks(ran: Path) -> None:
    steps = [torch.load(Path(ran, f"step_{r}.pt")) for r in range(WORLD)]
    dense = "inp.weight"
    mean = (steps[0]["local_grads"][dense] + steps[1]["local_grads"][dense]) / 2
    for s in steps:
        assert torch.allclose(s["update"][dense], mean, atol=1e-6)
    expert = "moe1.moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"
    for s in steps:
        # the owner's gradient already holds both ranks' tokens (all-to-all); DeepSpeed divides it by
        # the data-parallel size like the dense ones, and does not mix in the other rank's expert 0
        assert torch.allclose(s["update"][expert], s["local_grads"][expert] / WORLD, atol=1e-6)
    assert not torch.allclose(steps[0]["update"][expert], steps[1]["update"][expert])


def test_expert_checkpoint_round_trip_puts_every_expert_on_its_rank(ran: Path) -> None:
    files = sorted(p.name for p in Path(ran, "ckpt", "t").glob("layer_*_expert_*"))
    assert files == [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(E)]
    saved = [torch.load(Path(ran, f"experts_{r}.pt")) for r in range(WORLD)]
    # rank 0 and rank 1 hold different experts under the same local names: a swap would show
    assert saved[0].keys() == saved[1].keys() and len(saved[0]) == 2 * L * 4
    assert all(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    for r in range(WORLD):
        got = torch.load(Path(ran, f"loaded_{r}.pt"))
        assert all(not torch.equal(got["fresh"][k], saved[r][k]) for k in saved[r])
        for k in saved[r]:
            assert torch.equal(got["loaded"][k], saved[r][k]), (r, k)
