"""MoEFFN on one CPU: routing counts, padding, drops carried by the residual, dispatch equivalence,
bf16, parameter flags, stats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from models.config import MoEConfig
from models.moe import DISPATCHES, MOE_GATES, MoEFFN, collect_stats
from models.moe.routing import NO_EXPERT

D, E = 16, 4
Bsz, S = 4, 16


def make_moe(**overrides: object) -> MoEFFN:
    cfg = dict(num_experts=E, capacity_factor=float(E), eval_capacity_factor=float(E), min_capacity=0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MoEFFN(D, MoEConfig(**cfg), mlp_ratio=2.0)


def inputs(pad_from: int | None = None) -> tuple[Tensor, Tensor]:
    x = torch.randn(Bsz, S, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(Bsz, S, dtype=torch.long)
    if pad_from is not None:
        mask[:, pad_from:] = 0
    return x, mask


def test_output_shape_and_count_shape() -> None:
    y, aux, counts = make_moe()(*inputs())
    assert y.shape == (Bsz, S, D)
    assert aux.shape == ()
    assert counts.shape == (E,) and counts.dtype == torch.long


@pytest.mark.parametrize("gate, k", [("switch", 1), ("gshard", 2), ("noisy_topk", 3)])
def test_counts_cover_every_route_when_dropless(gate: str, k: int) -> None:
    extra = {"top_k": k} if gate == "noisy_topk" else {"second_expert_policy": "all"} if gate == "gshard" else {}
    _, _, counts = make_moe(gate=gate, dropless=True, **extra)(*inputs())
    assert int(counts.sum()) == k * Bsz * S


def test_padding_tokens_are_not_routed() -> None:
    x, mask = inputs(pad_from=10)
    y, _, counts = make_moe()(x, mask)
    assert int(counts.sum()) == int(mask.sum()) == Bsz * 10
    # an unrouted token gets no expert output; the residual connection carries it
    assert y[:, 10:].abs().sum() == 0
    assert (y[:, :10].abs().sum(-1) > 0).all()


def test_dropped_tokens_pass_through_on_the_residual_only() -> None:
    moe = make_moe(capacity_factor=0.5, drop_policy="position")
    x, mask = inputs()
    y, _, counts = moe(x, mask)
    capacity = (Bsz * S // E) // 2
    assert int(counts.max()) <= capacity and int(counts.sum()) < Bsz * S
    # recompute the routing the layer used; dropped rows get exactly nothing, kept rows gate * expert(x)
    r = moe.gate.route(x.reshape(-1, D))
    expert_N, gate_N = r.expert_KN[0], r.gate_KN[0]
    y_ND, x_ND = y.reshape(-1, D), x.reshape(-1, D)
    dropped = expert_N == NO_EXPERT
    assert int(dropped.sum()) == Bsz * S - int(counts.sum())
    assert (y_ND[dropped] == 0).all()
    experts = moe.moe.deepspeed_moe.experts
    for n in torch.nonzero(~dropped).flatten()[:8].tolist():
        expected = gate_N[n] * experts.expert(int(expert_N[n]))(x_ND[n])
        assert torch.allclose(y_ND[n], expected, atol=1e-6)
    # and the block's output x + y is x for them: the gradient reaches dropped tokens only via the residual
    (x + y).sum().backward()
    assert torch.equal(x.grad.reshape(-1, D)[dropped], torch.ones(int(dropped.sum()), D))


def test_eval_uses_the_eval_capacity_factor() -> None:
    moe = make_moe(capacity_factor=0.25, eval_capacity_factor=float(E))
    x, mask = inputs()
    _, _, train_counts = moe.train()(x, mask)
    _, _, eval_counts = moe.eval()(x, mask)
    assert int(train_counts.sum()) <= Bsz * S // 4
    assert int(eval_counts.sum()) == Bsz * S


def test_aux_is_weighted_and_trains_the_router() -> None:
    moe = make_moe(aux_loss_weight=0.3, z_loss_weight=0.02)
    _, aux, _ = moe(*inputs())
    stats = moe.last_stats
    assert aux.item() == pytest.approx(0.3 * stats.aux.item() + 0.02 * stats.z_loss.item(), rel=1e-5)
    aux.backward()
    assert moe.gate.wg.weight.grad is not None and moe.gate.wg.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gate", sorted(set(MOE_GATES) - {"expert_choice"}))  # EC: indexed dispatch only
def test_indexed_dispatch_equals_deepspeed_dispatch(gate: str) -> None:
    """Same gate, same weights: our sort-based dispatch and DeepSpeed's capacity buffers agree,
    drops included, in outputs and in every gradient."""
    cfg = dict(gate=gate, capacity_factor=0.75, drop_policy="position", second_expert_policy="all")
    ours, theirs = make_moe(**cfg), make_moe(dispatch="deepspeed", **cfg)
    theirs.load_state_dict(ours.state_dict())
    assert type(theirs.moe.deepspeed_moe).__name__ == "MOELayer"
    results = []
    for moe in (ours, theirs):
        x, mask = inputs(pad_from=12)
        torch.manual_seed(3)  # noisy_topk draws noise
        y, aux, counts = moe(x, mask)
        (y.square().sum() + aux).backward()
        results.append((y, counts, x.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y1, c1, gx1, g1), (y2, c2, gx2, g2) = results
    assert int(c1.sum()) < 2 * Bsz * 12  # some routes dropped
    assert torch.equal(c1, c2)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(gx1, gx2, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5), name


def test_bf16_layer_routes_in_fp32_and_returns_bf16() -> None:
    moe = make_moe().bfloat16()
    x, mask = inputs()
    y, aux, _ = moe(x.detach().bfloat16().requires_grad_(), mask)
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32
    routed = moe.gate.route(x.detach().bfloat16().reshape(-1, D))
    assert routed.gate_KN.dtype == torch.float32
    y.float().sum().backward()
    assert moe.gate.wg.weight.grad.dtype == torch.bfloat16


def test_expert_params_are_flagged_for_expert_parallel_reduction() -> None:
    moe = make_moe()
    params = dict(moe.named_parameters())
    experts = {n: p for n, p in params.items() if ".experts." in n}
    assert sorted(experts) == [f"moe.deepspeed_moe.experts.{n}" for n in ("fc1_bias", "fc1_weight", "fc2_bias",
                                                                           "fc2_weight")]
    assert all(p.shape[0] == E for p in experts.values())  # stacked: dim 0 enumerates the experts
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts.values())
    # DeepSpeed's checkpoint code still sees one entry per expert (it saves one file per expert)
    per_expert = [k for k in moe.state_dict() if ".deepspeed_experts." in k]
    assert len(per_expert) == E * 4
    assert "moe.deepspeed_moe.experts.deepspeed_experts.3.fc2.bias" in per_expert
    # the router is an ordinary data-parallel parameter, registered once
    assert getattr(params["moe.deepspeed_moe.gate.wg.weight"], "allreduce", True) is True
    assert [k for k in moe.state_dict() if "gate" in k] == ["moe.deepspeed_moe.gate.wg.weight"]


def test_noisy_topk_noise_weight_is_not_an_expert_param() -> None:
    keys = [k for k in make_moe(gate="noisy_topk").state_dict() if "gate" in k]
    # DeepSpeed's checkpoint treats every key containing "expert" as a per-rank expert weight
    assert keys == ["moe.deepspeed_moe.gate.wg.weight", "moe.deepspeed_moe.gate.w_noise.weight"]
    assert not any("expert" in k for k in keys)


def test_expert_width_defaults_to_dense_ffn_and_follows_config() -> None:
    assert make_moe().moe.deepspeed_moe.experts.fc1_weight.shape == (E, 2 * D, D)
    assert make_moe(expert_hidden_size=24).moe.deepspeed_moe.experts.fc1_weight.shape == (E, 24, D)
    assert MoEFFN(D, MoEConfig(num_experts=E), expert_hidden_size=8).moe.deepspeed_moe.experts.fc2_weight.shape == (
        E, D, 8)


def test_registries() -> None:
    assert sorted(MOE_GATES) == ["aux_free", "expert_choice", "gshard", "noisy_topk", "switch"]
    assert sorted(DISPATCHES) == ["deepspeed", "indexed"]


def test_dense_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_experts > 0"):
        MoEFFN(D, MoEConfig())


# -- stats --------------------------------------------------------------------------------------


def test_last_stats_describe_the_last_forward() -> None:
    moe = make_moe(capacity_factor=0.5, drop_policy="position")
    x, mask = inputs(pad_from=12)
    _, _, counts = moe(x, mask)
    s = moe.last_stats
    assert s.load_E.shape == (E,) and s.load_E.sum().item() == pytest.approx(1.0)
    assert s.dropped.item() == pytest.approx(1 - int(counts.sum()) / (Bsz * 12))
    assert s.tokens.item() == Bsz * 12
    assert 0 < s.entropy.item() <= torch.log(torch.tensor(float(E))).item() + 1e-6
    assert not s.aux.requires_grad


def test_collect_stats_names_shapes_and_window() -> None:
    model = torch.nn.ModuleList([make_moe(), torch.nn.Linear(2, 2), make_moe(capacity_factor=0.5)])
    x, mask = inputs()
    for m in (model[0], model[2]):
        m(x, mask)
        m(x[:2], mask[:2])  # second forward of the same step (another view)
    first_loads = [model[0].last_stats.load_E]
    out = collect_stats(model)
    assert sorted(out) == sorted(
        [f"moe/layer{i}/{n}" for i in (0, 1) for n in ("load", "dropped", "aux", "z_loss", "entropy")]
        + ["moe/dropped"]
    )
    assert isinstance(out["moe/layer0/load"], list) and len(out["moe/layer0/load"]) == E
    assert sum(out["moe/layer1/load"]) == pytest.approx(1.0)
    assert out["moe/layer0/dropped"] == 0.0 and out["moe/layer1/dropped"] > 0
    assert out["moe/dropped"] == pytest.approx((out["moe/layer0/dropped"] + out["moe/layer1/dropped"]) / 2)
    # the window averaged both forwards, so it differs from the last forward alone
    assert out["moe/layer0/load"] != pytest.approx(first_loads[0].tolist())
    # eval forwards do not enter the window; with no training forward, last_stats is reported
    model.eval()
    model[0](x, mask)
    again = collect_stats(model)
    assert again["moe/layer0/load"] == pytest.approx(model[0].last_stats.load_E.tolist())
    assert collect_stats(torch.nn.Linear(2, 2)) == {}


def test_importing_models_does_not_import_deepspeed() -> None:
    code = "import sys, models, models.moe, models.objectives; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_data_preprocessing_does_not_import_torch() -> None:
    # Ray Data's preprocessing tasks import the pipeline in fresh worker processes: torch there
    # costs ~2 s per worker at start-up for nothing (models/__init__.py imports lazily).
    code = ("import sys, jobs.data.pipeline, jobs.config, models.config; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("loop_max", [16, 0])  # per-expert addmm loop, or grouped_mm + bias pass
def test_stacked_experts_grouped_matmul_equals_each_expert_alone(monkeypatch: pytest.MonkeyPatch, loop_max: int
                                                                ) -> None:
    """Rows sorted by expert (one expert gets none), a tail of dropped rows: each row gets its expert's
    FFN, the tail gets 0 and no gradient, and the outputs and every gradient are the same with the
    host path (hand-written backward), the masked grouped GEMM (GPU path) and the loop fallback."""
    from models.moe import experts as stacked
    from models.moe import host_experts

    monkeypatch.setattr(host_experts, "LOOP_MAX", loop_max)
    torch.manual_seed(0)
    ex = stacked.StackedExperts(4, D, 24)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)
    counts = torch.tensor([3, 0, 5, 2])
    rows, tail = int(counts.sum()), 4
    row_expert = torch.cat([torch.full((int(c),), e) for e, c in enumerate(counts.tolist())] + [torch.zeros(tail, dtype=torch.long)])
    x = torch.randn(rows + tail, D)
    expected = torch.cat([torch.stack([ex.expert(int(e))(x[i]) for i, e in enumerate(row_expert[:rows].tolist())]),
                          torch.zeros(tail, D)])
    offsets = torch.cumsum(counts, 0)
    paths = {"host": lambda xi: ex.grouped(xi, offsets, row_expert),  # CPU: the host path
             "masked": lambda xi: ex._masked(xi, offsets, row_expert), "loop": lambda xi: ex._loop(xi, offsets)}
    results = {}
    for name, run in paths.items():
        xi = x.clone().requires_grad_(True)
        y = run(xi)
        torch.testing.assert_close(y, expected)
        y.square().sum().backward()
        assert torch.equal(xi.grad[rows:], torch.zeros(tail, D))
        results[name] = (xi.grad.clone(), {n: p.grad.clone() for n, p in ex.named_parameters()})
        ex.zero_grad(set_to_none=True)
    for name in ("masked", "loop"):
        torch.testing.assert_close(results["host"][0], results[name][0])
        for param, g in results["host"][1].items():
            torch.testing.assert_close(g, results[name][1][param], msg=f"{param} ({name})")
    assert torch.equal(results["host"][1]["fc1_weight"][1], torch.zeros(24, D))  # expert 1 had no rows
    assert torch.equal(results["host"][1]["fc2_bias"][1], torch.zeros(D))


@pytest.mark.parametrize("width", [24, 10])  # 10: strides grouped_mm refuses -> the loop
def test_host_path_with_many_experts_equals_each_expert_alone(width: int) -> None:
    """20 local experts (> LOOP_MAX: grouped_mm, bias by index_add), some without rows: outputs and
    gradients equal to running each expert alone."""
    from models.moe.experts import StackedExperts

    torch.manual_seed(0)
    ex = StackedExperts(20, D, width)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)
    counts = torch.tensor([2, 0, 3, 1, 0] * 4)
    row_expert = torch.repeat_interleave(torch.arange(20), counts)
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    y = ex.grouped(x, torch.cumsum(counts, 0), row_expert)
    y.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    ex.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.stack([ex.expert(int(e))(x2[i]) for i, e in enumerate(row_expert.tolist())])
    torch.testing.assert_close(y, ref)
    ref.square().sum().backward()
    for got, want in zip(grads, [x2.grad] + [p.grad for p in ex.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32, another summation order
    assert torch.equal(grads[1][1], torch.zeros(width, D))  # expert 1: no rows, zero gradient


def test_host_path_reuses_its_weight_gradient_buffer_only_once_nothing_holds_it(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    """GradBuffers (every size, here): after the gradients are set to None the next backward writes the
    same memory, with the right values; while .grad still holds it (gradient accumulation) a fresh
    buffer is used and the gradients add up; a deep copy of the experts shares no buffer."""
    import copy

    from models.moe.experts import StackedExperts
    from models.moe.host_experts import GradBuffers

    monkeypatch.setattr(GradBuffers, "MIN_BYTES", 0)
    torch.manual_seed(0)
    ex = StackedExperts(4, D, 24)
    counts = torch.tensor([3, 0, 5, 2])
    offsets, row_expert = torch.cumsum(counts, 0), torch.repeat_interleave(torch.arange(4), counts)

    def backward(x: torch.Tensor) -> None:
        ex.grouped(x, offsets, row_expert).square().sum().backward()

    x1, x2 = torch.randn(10, D), torch.randn(10, D)
    backward(x1)
    first = {n: (p.grad.data_ptr(), p.grad.clone()) for n, p in ex.named_parameters()}
    ex.zero_grad(set_to_none=True)
    backward(x2)
    assert ex.fc1_weight.grad.data_ptr() == first["fc1_weight"][0]  # the released buffer, written again
    assert ex.fc2_weight.grad.data_ptr() == first["fc2_weight"][0]
    alone = copy.deepcopy(ex)
    assert alone._grad_buffers._held == {}
    alone.zero_grad(set_to_none=True)
    x2_ref = x2.clone()
    torch.stack([alone.expert(int(e))(x2_ref[i]) for i, e in enumerate(row_expert.tolist())]).square().sum().backward()
    for n, p in ex.named_parameters():
        torch.testing.assert_close(p.grad, dict(alone.named_parameters())[n].grad, rtol=1e-4, atol=1e-5)
    second = {n: p.grad.clone() for n, p in ex.named_parameters()}
    held = ex.fc1_weight.grad.data_ptr()
    backward(x1)  # accumulate: .grad still holds the buffer, so this backward must not write into it
    assert ex.fc1_weight.grad.data_ptr() == held  # accumulated in place into the held .grad
    for n, p in ex.named_parameters():
        torch.testing.assert_close(p.grad, first[n][1] + second[n], rtol=1e-5, atol=1e-6)


def test_host_path_loops_over_experts_when_they_are_few_or_their_rows_many() -> None:
    from models.moe.host_experts import LOOP_MAX, LOOP_ROWS, _looped

    w = torch.empty(20, 24, D)  # 20 experts > LOOP_MAX
    assert LOOP_MAX < 20 and not _looped(w, rows=20 * LOOP_ROWS - 1) and _looped(w, rows=20 * LOOP_ROWS)
    assert _looped(torch.empty(LOOP_MAX, 24, D), rows=1)
    assert _looped(torch.empty(20, 10, D), rows=1)  # 10 fp32 = 40 bytes: strides grouped_mm refuses


def test_stats_module_does_not_import_the_layer() -> None:
    """layer -> stats, one way (issue 18): collect_stats finds the layers by the ReportsMoEStats mixin."""
    import ast

    from models.moe import layer, stats

    tree = ast.parse(Path(stats.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "models.moe.layer" not in imported and "models.moe.stats" in {
        n.module for n in ast.walk(ast.parse(Path(layer.__file__).read_text())) if isinstance(n, ast.ImportFrom)}


def test_stacked_experts_keep_deepspeeds_per_expert_checkpoint_names() -> None:
    from models.moe.experts import StackedExperts, split_stacked

    ex = StackedExperts(3, D, 8)
    state = ex.state_dict()
    assert sorted(state) == sorted(f"deepspeed_experts.{i}.{n}" for i in range(3)
                                   for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    assert state["deepspeed_experts.2.fc1.weight"].shape == (8, D)  # nn.Linear's layout per expert
    assert torch.equal(state["deepspeed_experts.1.fc2.weight"], ex.fc2_weight[1])
    other = StackedExperts(3, D, 8)
    other.load_state_dict(state)  # per-expert entries (what DeepSpeed loads back) are stacked again
    assert all(torch.equal(a, b) for a, b in zip(ex.parameters(), other.parameters(), strict=True))
    assert sorted(split_stacked({"a.fc2_bias": ex.fc2_bias, "a.gate": ex.fc2_bias})) == [
        "a.deepspeed_experts.0.fc2.bias", "a.deepspeed_experts.1.fc2.bias", "a.deepspeed_experts.2.fc2.bias", "a.gate"]


def test_rows_the_grouped_gemm_leaves_unwritten_never_reach_outputs_or_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may leave rows past the last offset as garbage (NaN): they must give 0 and no NaN
    anywhere in the gradients (GELU's backward would otherwise compute NaN * 0)."""
    import torch.nn.functional as F

    from models.moe import experts as stacked

    real = F.grouped_mm

    def poisoned(a: torch.Tensor, b: torch.Tensor, *, offs: torch.Tensor, **kw: object) -> torch.Tensor:
        out = real(a, b, offs=offs, **kw)
        return torch.cat([out[: int(offs[-1])], torch.full_like(out[int(offs[-1]):], float("nan"))])

    monkeypatch.setattr(stacked.F, "grouped_mm", poisoned)
    torch.manual_seed(0)
    ex = stacked.StackedExperts(3, D, 12)
    x = torch.randn(10, D, requires_grad=True)
    counts = torch.tensor([2, 3, 1])  # 6 rows computed, 4 past the end
    row_expert = torch.tensor([0, 0, 1, 1, 1, 2, 0, 0, 0, 0])
    y = ex._masked(x, torch.cumsum(counts, 0), row_expert)  # the GPU path
    assert torch.equal(y[6:], torch.zeros(4, D)) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in ex.parameters())
