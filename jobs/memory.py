"""Model-state memory of one rank: measured from the tensors DeepSpeed holds, and the ZeRO paper's figure.

Model states are parameters, gradients and optimizer state (ZeRO, Rajbhandari et al. 2020, §3.1).
For mixed-precision Adam the paper counts 2Ψ (16-bit weights) + 2Ψ (16-bit gradients) + KΨ with
K = 12 (fp32 master weights, momentum, variance) and partitions them over N data-parallel ranks:

    stage 0: 16Ψ     stage 1 (P_os): 4Ψ + 12Ψ/N     stage 2 (P_os+g): 2Ψ + 14Ψ/N     stage 3 (P_os+g+p): 16Ψ/N

Tensor parallelism (jobs/tensor_parallel.py) splits the attention and FFN matrices over tp ranks
first: a rank's Ψ is the replicated parameters plus 1/tp of the split ones, and N is the
data-parallel size world / tp (ZeRO partitions each rank's shards over its data-parallel peers).

Expert parameters of a MoE layer are first divided over the expert-parallel group (each rank holds
num_experts/ep experts) and then partitioned over the expert-data-parallel group of N/ep ranks.

fp32 training (our CPU default) keeps 4-byte weights and gradients, and DeepSpeed 0.19 keeps these
fp32 copies (measured on 2 CPU ranks, tests/integration/test_memory.py):
    stage 0: torch's AdamW updates the weights in place: no master copy, K = 8   -> 16Ψ
    stage 1/2: ZeRO clones the rank's fp32 partition as the "master" even though the weights are
               already fp32, K = 12                                              -> 8Ψ + 12Ψ/N, 4Ψ + 16Ψ/N
    stage 3: also a cloned master, K = 12 -> 20Ψ/N. (stage3.py means to reuse the partition when
             dtype and device match, but compares a torch.device with a device-name string, which
             is never equal, so it always clones.)

Measuring: `watch_gradients(engine)` right after `deepspeed.initialize`, then `measure_model_states(engine)`
after the first step. Storages are counted once (dedup by `untyped_storage().data_ptr()`), so a
parameter that is a view into DeepSpeed's flat buffer counts that whole buffer, padding included,
exactly once. Gradients are freed by the step, so the watch records the peak gradient bytes held at
the two points where all of a step's gradients exist: just before their reduction (end of
backward: ZeRO-1 still holds the full gradients there) and just before the optimizer step.

Keys of `measure_model_states` (all int; bytes unless named otherwise):
    memory/params_bytes, memory/grads_bytes, memory/optim_bytes (master copy + Adam states),
    memory/master_bytes (the fp32 master copy, part of optim_bytes), memory/total_bytes
    (params + grads + optim), memory/buffers_bytes (DeepSpeed's reduce-bucket buffers; residual
    memory in the paper, not a model state), memory/host_bytes (the part of params + optim kept in
    host memory by optimizer offload; 0 when the engine itself runs on CPU),
    memory/{params,grads,optim}_{dense,expert}_bytes,
    memory/expected_{params,grads,optim}_bytes and memory/expected_bytes (the formula above for this
    run's stage, precision, data-parallel size and ep_size), memory/num_params (dense Ψ of this rank:
    with tensor parallelism the replicated parameters plus this rank's 1/tp of the split layers),
    memory/num_expert_params (all experts of all layers), memory/zero_stage, memory/dp, memory/tp, memory/ep,
    memory/grads_watched (1 when watch_gradients saw a step, else 0: grads_bytes is then what is
    held at the call, usually nothing after a step).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from jobs.config import Precision

Category = Literal["params", "master", "grads", "buffers", "optim"]
_TRANSIENT: tuple[Category, ...] = ("grads", "buffers")  # freed by the step: the watch keeps their peak
# The order storages are claimed in: a storage reached through two structures counts once, in the
# first category (a model parameter that is a view into ZeRO's flat weight buffer: parameters).
# DeepSpeed's reduce buckets come before gradients: a gradient waiting in a bucket is a view into it.
_ORDER: tuple[Category, ...] = ("params", "master", "buffers", "grads", "optim")


# -- the paper's figure -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _BytesPerParam:
    params: int
    grads: int
    master: tuple[int, int, int, int]  # by ZeRO stage 0..3
    adam: int = 8  # momentum + variance, fp32


_BYTES: dict[Precision, _BytesPerParam] = {
    # Mixed precision as in the paper: the fp32 master copy is always kept (K = 12).
    "bf16": _BytesPerParam(params=2, grads=2, master=(4, 4, 4, 4)),
    # What DeepSpeed 0.19 keeps for fp32 weights (see the module docstring).
    "fp32": _BytesPerParam(params=4, grads=4, master=(0, 4, 4, 4)),
}


def _per_rank(num: float, stage: int, n: int, b: _BytesPerParam) -> dict[str, float]:
    k = b.master[stage] + b.adam
    params = b.params * num / (n if stage >= 3 else 1)
    grads = b.grads * num / (n if stage >= 2 else 1)
    optim = k * num / (n if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optim": optim}


def expected_model_states(num_params: int, num_expert_params: int, stage: int, dp: int, ep: int = 1,
                          precision: Precision = "bf16", tp: int = 1) -> dict[str, float]:
    """Per-rank bytes of model states by the ZeRO paper's accounting.

    num_params: dense parameters (replicated over all `dp` ranks); num_expert_params: all experts of
    all MoE layers; `ep` ranks share one copy of them, and each expert is replicated over dp·tp/ep
    ranks, over which ZeRO partitions its states: under tensor parallelism the experts are
    replicated over the tp group too, and DeepSpeed's expert-data-parallel groups span it (measured:
    tests/integration/test_memory.py).
    Returns params, grads, optim, total and the same split into {key}_dense / {key}_expert.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {stage} is not one of 0, 1, 2, 3")
    if dp < 1 or ep < 1 or dp % ep:
        raise ValueError(f"ep={ep} must divide the data-parallel size dp={dp}")
    b = _BYTES[precision]
    dense = _per_rank(num_params, stage, dp, b)
    expert = _per_rank(num_expert_params / ep, stage, dp * tp // ep, b)
    out: dict[str, float] = {}
    for key in ("params", "grads", "optim"):
        out[key] = dense[key] + expert[key]
        out[f"{key}_dense"], out[f"{key}_expert"] = dense[key], expert[key]
    out["total"] = out["params"] + out["grads"] + out["optim"]
    return out


# -- measuring what a rank holds ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Where one DeepSpeed optimizer wrapper keeps its tensors (attribute names, deepspeed 0.19)."""

    groups: str  # list of per-group parameter lists, for the dense/expert flag of group i
    per_group: dict[str, Category] = field(default_factory=dict)  # list or dict indexed by group
    shared: dict[str, Category] = field(default_factory=dict)  # spans groups: counted as dense


# Keyed by class name so this module never imports deepspeed (it is read on the driver too).
_LAYOUTS: dict[str, _Layout] = {
    # deepspeed/runtime/zero/stage_1_and_2.py
    "DeepSpeedZeroOptimizer": _Layout(
        groups="bit16_groups",
        per_group={"single_partition_of_fp32_groups": "master", "averaged_gradients": "grads"},
        shared={"grads_in_partition": "grads", "ipg_buckets": "buffers"},
    ),
    # deepspeed/runtime/zero/stage3.py; weight partitions are the parameters' `ds_tensor`
    "DeepSpeedZeroOptimizer_Stage3": _Layout(
        groups="fp16_groups",
        per_group={"fp32_partitioned_groups_flat": "master", "averaged_gradients": "grads"},
        shared={"grad_partitions_flat_buffer": "grads", "ipg_buckets": "buffers"},
    ),
    # deepspeed/runtime/bf16_optimizer.py (bf16 at stage 0/1 when gradients accumulate in fp32)
    "BF16_Optimizer": _Layout(
        groups="bf16_groups",
        per_group={"fp32_groups_flat_partition": "master", "fp32_groups_gradients_flat": "grads"},
    ),
    # deepspeed/runtime/fp16/{unfused,fused}_optimizer.py: bf16 (or fp16) at stage 0, a full fp32
    # master copy per parameter (unfused) or per group (fused)
    "FP16_UnfusedOptimizer": _Layout(groups="fp16_groups", per_group={"fp32_groups": "master"}),
    "FP16_Optimizer": _Layout(groups="fp16_groups", per_group={"fp32_groups_flat": "master"}),
}


def _is_expert(p: Any) -> bool:
    return getattr(p, "allreduce", True) is False  # DeepSpeed's mark on expert parameters


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a (nested) list/tuple/dict or a DeepSpeed bucket object."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif hasattr(value, "buffer"):  # IPGBucket / IPGBucketZ3
        yield from _tensors(value.buffer)


_Entry = tuple[Category, bool, Tensor]


def _model_entries(module: nn.Module) -> Iterator[_Entry]:
    for p in module.parameters():
        e = _is_expert(p)
        yield "params", e, p.data
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition (p.data is empty unless gathered)
            yield "params", e, p.ds_tensor
        if p.grad is not None:
            yield "grads", e, p.grad


def _wrapper_entries(opt: Any) -> Iterator[_Entry]:
    layout = _LAYOUTS.get(type(opt).__name__)
    if layout is None:
        return
    flags = [any(_is_expert(p) for p in group) for group in getattr(opt, layout.groups, [])]
    for attr, cat in layout.per_group.items():
        value = getattr(opt, attr, None)
        for i, expert in enumerate(flags):
            item = value.get(i) if isinstance(value, dict) else (value[i] if value and i < len(value) else None)
            for t in _tensors(item):
                yield cat, expert, t
                if cat == "master" and t.grad is not None:  # the fp32 gradient partition, during step
                    yield "grads", expert, t.grad
    for attr, cat in layout.shared.items():
        for t in _tensors(getattr(opt, attr, None)):
            yield cat, False, t


def _state_entries(opt: Any) -> Iterator[_Entry]:
    inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        return
    expert = {id(p): bool(g.get("moe", False)) or _is_expert(p) for g in inner.param_groups for p in g["params"]}
    # Iterate the state itself: ZeRO-3 re-points its groups' params, so a state key need not be in them.
    for p, state in inner.state.items():
        for t in _tensors(state):
            yield "optim", expert.get(id(p), False), t


@dataclass
class _Storage:
    category: Category
    nbytes: int
    host: bool  # in host memory while the engine computes on an accelerator (ZeRO-Offload)
    expert_regions: set[tuple[int, int]] = field(default_factory=set)  # (byte offset, bytes) of expert views


_Key = tuple[Category | Literal["host"], bool]


def _held(engine: Any) -> dict[_Key, int]:
    """Bytes by (category, expert), each storage counted once, in `_ORDER` priority; ("host", False)
    sums the storages kept in host memory when the engine runs on an accelerator.

    A storage shared by dense and expert tensors (ZeRO-2's `grads_in_partition` spans all groups)
    is split by the bytes of the distinct expert views into it; the rest, padding included, is dense.
    """
    entries = [*_model_entries(engine.module), *_wrapper_entries(engine.optimizer), *_state_entries(engine.optimizer)]
    on_accelerator = torch.device(engine.device).type != "cpu"
    storages: dict[int, _Storage] = {}
    for cat in _ORDER:
        for c, expert, t in entries:
            if c != cat or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            held = storages.setdefault(ptr, _Storage(cat, storage.nbytes(), on_accelerator and t.device.type == "cpu"))
            if held.category == cat and expert:
                held.expert_regions.add((t.storage_offset() * t.element_size(), t.numel() * t.element_size()))
    out: dict[_Key, int] = {}
    for held in storages.values():
        expert = min(held.nbytes, sum(n for _, n in held.expert_regions))
        for flag, n in ((True, expert), (False, held.nbytes - expert)):
            if n:
                out[(held.category, flag)] = out.get((held.category, flag), 0) + n
        if held.host and held.category not in _TRANSIENT:
            out[("host", False)] = out.get(("host", False), 0) + held.nbytes
    return out


@dataclass
class _Watch:
    peak: dict[_Key, int] = field(default_factory=dict)
    calls: int = 0

    def snapshot(self, engine: Any) -> None:
        held = _held(engine)
        for cat in _TRANSIENT:
            now = {k: v for k, v in held.items() if k[0] == cat}
            if sum(now.values()) >= sum(v for k, v in self.peak.items() if k[0] == cat):
                self.peak = {k: v for k, v in self.peak.items() if k[0] != cat} | now
        self.calls += 1


_WATCHES: weakref.WeakKeyDictionary[Any, _Watch] = weakref.WeakKeyDictionary()


def _before(fn: Callable[..., Any], hook: Callable[[], None]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hook()
        return fn(*args, **kwargs)

    return wrapped


def watch_gradients(engine: Any, steps: int = 1) -> None:
    """Record the gradient bytes held at the end of backward and before the optimizer step.

    Wraps `engine.allreduce_gradients` (called at the end of every backward, before gradients are
    reduced) and `engine.optimizer.step` for the first `steps` optimizer steps, then unwraps them:
    no cost after that. Call once, right after the engine is built.
    """
    watch = _WATCHES.setdefault(engine, _Watch())
    reduce_fn, step_fn, opt = engine.allreduce_gradients, engine.optimizer.step, engine.optimizer
    done = {"steps": 0}

    def on_reduce() -> None:
        watch.snapshot(engine)

    def on_step() -> None:
        watch.snapshot(engine)
        done["steps"] += 1
        if done["steps"] >= steps:  # restore the originals (instance attributes shadowed the methods)
            del engine.allreduce_gradients
            del opt.step

    engine.allreduce_gradients = _before(reduce_fn, on_reduce)
    opt.step = _before(step_fn, on_step)


def count_params(module: nn.Module, ep: int = 1) -> tuple[int, int]:
    """(dense Ψ, all-expert Ψ) of a built model; a rank's model holds 1/ep of the experts."""
    dense = expert = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the full size in ds_numel
        if _is_expert(p):
            expert += n
        else:
            dense += n
    return dense, expert * ep


def _ep_size(module: nn.Module) -> int:
    sizes = {int(m.ep_size) for m in module.modules() if type(m).__name__ == "MoE" and hasattr(m, "ep_size")}
    if len(sizes) > 1:
        raise ValueError(f"MoE layers with different ep_size {sorted(sizes)}: one expected")
    return sizes.pop() if sizes else 1


def measure_model_states(engine: Any) -> dict[str, int]:
    """Per-rank model-state bytes this rank holds now, plus the paper's expected figure (keys: module doc)."""
    import torch.distributed as dist

    held = _held(engine)
    watch = _WATCHES.get(engine)
    if watch is not None and watch.calls:
        held = {k: v for k, v in held.items() if k[0] not in _TRANSIENT} | watch.peak

    def total(cat: Category | Literal["host"], expert: bool | None = None) -> int:
        return sum(v for (c, e), v in held.items() if c == cat and (expert is None or e == expert))

    out: dict[str, int] = {
        "memory/params_bytes": total("params"),
        "memory/grads_bytes": total("grads"),
        "memory/master_bytes": total("master"),
        "memory/optim_bytes": total("master") + total("optim"),
        "memory/buffers_bytes": total("buffers"),
        "memory/host_bytes": total("host"),
    }
    for expert, tag in ((False, "dense"), (True, "expert")):
        out[f"memory/params_{tag}_bytes"] = total("params", expert)
        out[f"memory/grads_{tag}_bytes"] = total("grads", expert)
        out[f"memory/optim_{tag}_bytes"] = total("master", expert) + total("optim", expert)
    out["memory/total_bytes"] = out["memory/params_bytes"] + out["memory/grads_bytes"] + out["memory/optim_bytes"]

    ep = _ep_size(engine.module)
    dense, experts = count_params(engine.module, ep)  # under tensor parallelism: this rank's shards
    stage = int(engine.zero_optimization_stage())
    tp = max(1, int(engine.autotp_size())) if hasattr(engine, "autotp_size") else 1
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    dp = world // tp  # ZeRO partitions each tp rank's shards over its data-parallel peers
    precision: Precision = "bf16" if engine.bfloat16_enabled() else "fp32"
    expected = expected_model_states(dense, experts, stage, dp, ep, precision, tp)
    out |= {f"memory/expected_{k}_bytes": round(expected[k]) for k in ("params", "grads", "optim")}
    out["memory/expected_bytes"] = round(expected["total"])
    out |= {"memory/num_params": dense, "memory/num_expert_params": experts, "memory/zero_stage": stage,
            "memory/dp": dp, "memory/tp": tp, "memory/ep": ep, "memory/grads_watched": int(watch is not None and watch.calls > 0)}
    return out
