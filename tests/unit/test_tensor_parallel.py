"""Megatron tensor parallelism (jobs/tensor_parallel.py): the split, the mesh, the config's refusals,
and tp 2 against tp 1 on 2 gloo processes (DeepSpeed AutoTP): same loss, same gradients, same
losses after optimizer steps, for one preset of every encoder family."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from jobs.tensor_parallel import Mesh, install_batch_check, per_rank_numel, problems, shard_of, split_of
from tests.unit import ranks
from tests.unit.conftest import B, build, make_batch

# one preset per encoder family: single-stream, co-attention (ViLBERT), cross (LXMERT), dual (CLIP)
PRESETS = {"vilt": {"mlm": 1.0, "itm": 1.0}, "vilbert": {"mlm": 1.0, "itm": 1.0},
           "lxmert": {"mlm": 1.0, "itm": 1.0}, "clip": {"itc": 1.0}}


# dropout 0: SDPA's attention dropout draws per local head, so a split layer draws other masks
SIZE = {"num_layers": 2, "dropout": 0.0}


# -- the split, without processes -------------------------------------------------------------------

def test_split_names_cover_every_family_layer() -> None:
    for preset, objectives in PRESETS.items():
        model = build(preset, objectives, **SIZE)
        splits = {name: split_of(name) for name, _ in model.named_parameters()}
        column = [n for n, s in splits.items() if s == "column"]
        row = [n for n, s in splits.items() if s == "row"]
        # every attention's input projections and every FFN's fc1 are column-split, with their bias
        assert any(n.endswith("attn.qkv.weight") for n in column) and any(n.endswith("ffn.fc1.bias") for n in column)
        assert {n.rsplit(".", 2)[-2] for n in row} == {"out", "fc2"}, preset
        assert not any(n.endswith(".bias") for n in row), "a row layer's bias is replicated"
        if preset in ("vilbert", "lxmert"):
            assert any(n.endswith("attn.kv.weight") for n in column) and any(n.endswith("attn.q.weight") for n in column)
        rep, split = per_rank_numel(model.named_parameters(), 2)
        total = sum(p.numel() for p in model.parameters())
        assert rep + split == total and split > 0.3 * total, preset


def test_shard_of_fused_qkv_keeps_heads_of_q_k_and_v() -> None:
    D = 4
    w = torch.arange(3 * D * D, dtype=torch.float32).reshape(3 * D, D)  # rows: Q0..Q3, K0..K3, V0..V3
    s1 = shard_of("x.attn.qkv.weight", w, 1, 2)
    assert s1.shape == (3 * D // 2, D)
    assert torch.equal(s1, torch.cat([w[2:4], w[6:8], w[10:12]]))  # second half of Q, of K, of V
    assert torch.equal(shard_of("x.attn.out.weight", w[:D], 1, 2), w[:D, 2:])
    assert torch.equal(shard_of("x.attn.out.bias", w[0], 1, 2), w[0])  # replicated
    assert torch.equal(shard_of("x.norm.weight", w[0], 1, 2), w[0])


def test_mesh_is_deepspeeds_dp_by_tp_layout() -> None:
    got = [(m.dp_rank, m.tp_rank) for m in (Mesh(r, 4, 2) for r in range(4))]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)] and Mesh(3, 4, 2).dp == 2
    with pytest.raises(ValueError, match="tp_size=3 must divide the 4 workers"):
        Mesh(0, 4, 3)


def test_problems_name_the_constraint() -> None:
    ok = dict(world=4, tp=2, num_heads=4, hidden_size=32, ffn_size=64, zero_stage=2, num_experts=0, ep_size=1)
    assert problems(**ok) == []
    assert problems(**(ok | {"tp": 1, "num_heads": 3})) == []
    msgs = [m for _, _, m in problems(**(ok | {"world": 3}))]
    assert msgs == ["must divide scaling.num_workers=3 (workers form a data-parallel x tensor-parallel mesh)"]
    assert "model.num_heads=3" in problems(**(ok | {"num_heads": 3, "hidden_size": 36}))[0][2]
    assert "FFN width 65" in problems(**(ok | {"ffn_size": 65}))[0][2]
    assert problems(**(ok | {"zero_stage": 3}))[0][0] == "deepspeed.zero_stage"
    assert problems(**(ok | {"num_experts": 4, "ep_size": 2}))[0][:2] == ("moe.ep_size", 2)


# -- tp 2 vs tp 1 on 2 gloo processes ---------------------------------------------------------------

def _ds_config(stage: int, tp: int) -> dict:
    from jobs.tensor_parallel import deepspeed_section

    return {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "gradient_clipping": 0.05,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1, "tensor_parallel": deepspeed_section(tp)}


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed

    from jobs.engine import param_groups

    for preset, objectives in PRESETS.items():
        for stage in (0, 2):
            torch.manual_seed(0)
            ref = build(preset, objectives, **SIZE)
            model = copy.deepcopy(ref)
            ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=1e-2)
            opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(stage, 2),
                                              dist_init_required=False)
            install_batch_check(engine)
            split = [n for n, p in engine.module.named_parameters() if split_of(n)]
            local = dict(engine.module.named_parameters())
            assert split and all(local[n].numel() * 2 == dict(ref.named_parameters())[n].numel() for n in split)
            for step in range(3):
                torch.manual_seed(100 + step)  # masking and negatives draw from the global RNG: same on both
                want = ref(make_batch(step))
                want["loss"].backward()
                torch.manual_seed(100 + step)
                got = engine(make_batch(step))
                engine.backward(got["loss"])
                torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, p=preset, s=step: f"{p} step {s}: {m}")
                if stage == 0 and step == 0:  # gradients of every parameter, split ones against their shard
                    for name, p in ref.named_parameters():
                        if p.grad is None:
                            continue
                        torch.testing.assert_close(local[name].grad, shard_of(name, p.grad, rank, 2), rtol=1e-4,
                                                   atol=1e-6, msg=lambda m, n=name, pr=preset: f"{pr} {n}: {m}")
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
                ref_opt.step()
                ref_opt.zero_grad()
                engine.step()
            engine.destroy()
    ranks.leave()


def test_tp2_matches_tp1_loss_gradients_and_steps() -> None:
    """2 ranks, one tp group: losses of 3 steps (clipped AdamW, ZeRO 0 and 2) and the first step's
    gradients (ZeRO 0: whole on each rank) equal the unsplit model's, for every family."""
    ranks.spawn_two(_worker)
