"""Megatron-LM tensor parallelism (Shoeybi et al. 2019, §3) on DeepSpeed's AutoTP, over a 2-D mesh.

Shapes: D model dim, F FFN width, H heads, d head dim, tp tensor-parallel size, dp data-parallel size.

Every transformer layer of every encoder family (models/encoders/layers.py: self-attention, the
co-attention / cross-attention sublayers, the dense FFN) is split the way Megatron splits a layer:

    attention  qkv  [3D, D]  column-parallel, viewed as [3, D] so each rank keeps the same H/tp heads
                                              of Q, K and V (a plain row split would give rank 0 all of Q)
               q    [D, D]   column   kv [2D, D]  column, viewed as [2, D] (K and V of the same heads)
               out  [D, D]   row-parallel: its partial sums are all-reduced over the tp group
    FFN        fc1  [F, D]   column (GeLU is elementwise: it runs on the shard)
               fc2  [D, F]   row-parallel

so a layer costs one all-reduce in forward (after `out`, after `fc2`) and one in backward (at the
inputs of `qkv`/`q`/`kv` and `fc1`), and each rank computes H/tp heads. Biases of column layers are
split with their rows; those of row layers are added once, after the all-reduce. Everything else
(embeddings, norms, poolers, objective heads, MoE gates and experts) is replicated over the tp group.

Why DeepSpeed's AutoTP and not `torch.distributed.tensor.parallel`: the engine is DeepSpeed's, and
ZeRO 1/2 flatten each rank's parameters into one contiguous buffer and reduce gradients over the
data-parallel group. ColwiseParallel/RowwiseParallel turn parameters into DTensors, which ZeRO's
flattening and its reduce buckets do not take; AutoTP replaces each split `nn.Linear` with a layer
holding a plain local shard, marks it as model-parallel (ZeRO's gradient norm sums the shards over
the tp group and the replicated parameters once), and gives the engine the (dp, tp) DeviceMesh
(`deepspeed.utils.groups._init_tp_mesh_device`): rank = dp_rank * tp + tp_rank, so a tp group is tp
consecutive ranks (one node's GPUs on a real cluster, where the per-layer all-reduces belong).
The layers are matched by name with AutoTP's `partition_config` (our own specs, none of its
HF-model defaults), built here once for the engine and for the planner.

The ranks of one tp group compute the same samples: the data streams, the evaluation and the
metric reductions use the data-parallel rank and group (`Mesh`, jobs/collectives.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

Split = Literal["column", "row"]

# (parameter-name regex of the weight, split, fused sub-matrices along the output dim)
_SPECS: tuple[tuple[str, Split, int], ...] = (
    (r".*\.attn\.qkv\.weight$", "column", 3),
    (r".*\.attn\.q\.weight$", "column", 1),
    (r".*\.attn\.kv\.weight$", "column", 2),
    (r".*\.attn\.out\.weight$", "row", 1),
    (r".*\.ffn\.fc1\.weight$", "column", 1),
    (r".*\.ffn\.fc2\.weight$", "row", 1),
)


def partition_config() -> dict[str, Any]:
    """AutoTP's `tensor_parallel.partition_config`: only our layers, by name (module docstring)."""
    specs = []
    for pattern, split, fused in _SPECS:
        spec: dict[str, Any] = {"patterns": [pattern], "partition_type": split}
        if fused > 1:
            spec |= {"shape": [fused, -1], "partition_dim": 0}
        specs.append(spec)
    return {"use_default_specs": False, "layer_specs": specs}


def deepspeed_section(tp: int) -> dict[str, Any]:
    """The DeepSpeed config's `tensor_parallel` section for `tp` ranks per group."""
    return {"autotp_size": tp, "partition_config": partition_config()}


def split_of(param_name: str) -> Split | None:
    """How the weight or bias `param_name` of a built model is split (None: replicated)."""
    if param_name.endswith(".bias"):
        weight = param_name[: -len(".bias")] + ".weight"
        split = split_of(weight)
        return "column" if split == "column" else None  # a row layer's bias is added after the all-reduce
    for pattern, split, _ in _SPECS:
        if re.match(pattern, param_name):
            return split
    return None


def _fused(param_name: str) -> int:
    weight = param_name[: -len(".bias")] + ".weight" if param_name.endswith(".bias") else param_name
    return next((fused for pattern, _, fused in _SPECS if re.match(pattern, weight)), 1)


def shard_of(param_name: str, full: Tensor, tp_rank: int, tp: int) -> Tensor:
    """Rank `tp_rank`'s part of the whole-model tensor `full` (a weight, bias or their gradient),
    as AutoTP splits it: column = a slice of the output rows (of each fused sub-matrix), row = a
    slice of the input columns; a replicated tensor is returned whole."""
    split = split_of(param_name)
    if split is None or tp == 1:
        return full
    if split == "row":
        return full.chunk(tp, dim=1)[tp_rank]
    fused = _fused(param_name)
    parts = full.reshape(fused, -1, *full.shape[1:]).chunk(tp, dim=1)[tp_rank]
    return parts.reshape(-1, *full.shape[1:])


def per_rank_numel(named: Iterable[tuple[str, nn.Parameter]], tp: int) -> tuple[int, int]:
    """(replicated numel, split numel of the whole model) over non-expert parameters of an unsplit
    model; a tp rank holds replicated + split / tp. Expert parameters (DeepSpeed's `allreduce=False`)
    are left out: they are never split by tp."""
    replicated = split = 0
    for name, p in named:
        if getattr(p, "allreduce", True) is False:
            continue
        n = int(getattr(p, "ds_numel", p.numel()))
        if split_of(name) is None:
            replicated += n
        else:
            if tp > 1 and n % tp:
                raise ValueError(f"{name} has {n} elements, not divisible by tp={tp}")
            split += n
    return replicated, split


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the (dp, tp) mesh, laid out as DeepSpeed's AutoTP lays it out."""

    rank: int
    world: int
    tp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"tp_size={self.tp} must divide the {self.world} workers")

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


def data_parallel_group(mesh: Mesh) -> Any:
    """The process group of this rank's data-parallel peers (None = the default group when tp is 1).

    After `deepspeed.initialize` with AutoTP, DeepSpeed's own (dp, tp) mesh groups."""
    if mesh.tp == 1:
        return None
    from deepspeed.utils import groups

    return groups.get_data_parallel_group()


def problems(world: int, tp: int, num_heads: int, hidden_size: int, ffn_size: int, zero_stage: int,
             num_experts: int, ep_size: int) -> list[tuple[str, Any, str]]:
    """Why a `parallel.tp_size` cannot run, as (field, value, what is allowed); [] when it can."""
    if tp == 1:
        return []
    out: list[tuple[str, Any, str]] = []
    if world % tp:
        out.append(("parallel.tp_size", tp, f"must divide scaling.num_workers={world} "
                    "(workers form a data-parallel x tensor-parallel mesh)"))
    if num_heads % tp:
        out.append(("parallel.tp_size", tp, f"must divide model.num_heads={num_heads} (each rank computes "
                    "num_heads / tp_size attention heads)"))
    if ffn_size % tp:
        out.append(("parallel.tp_size", tp, f"must divide the FFN width {ffn_size} (hidden_size x mlp_ratio; "
                    "fc1 is split by columns)"))
    if hidden_size % tp:
        out.append(("parallel.tp_size", tp, f"must divide model.hidden_size={hidden_size}"))
    if zero_stage == 3:
        out.append(("deepspeed.zero_stage", 3, "ZeRO-3 with parallel.tp_size > 1 is not supported here: "
                    "use zero_stage 0-2 (ZeRO shards over the data-parallel ranks of each tp group)"))
    if num_experts and ep_size > 1:
        out.append(("moe.ep_size", ep_size, "with parallel.tp_size > 1 the experts are replicated over "
                    "the tp group (ep_size 1): DeepSpeed's expert-parallel groups span consecutive ranks, "
                    "which are one tp group here, so each expert would see every token twice"))
    return out


def install_batch_check(engine: Any) -> None:
    """Check, at the first forward, that the ranks of each tp group were given the same batch.

    DeepSpeed's own first-forward check (`engine.first_dataloader_check`) compares only flat lists
    or dicts of tensors and fails on our batch, a dict passed as one argument; this one replaces it:
    a per-key checksum of the batch, reduced MIN and MAX over the tp group, must agree.
    """
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    old = getattr(engine, "first_dataloader_check", None)
    if old is not None:
        old.remove()
        engine.first_dataloader_check = None
    group = groups.get_tensor_model_parallel_group()

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        batch = args[0] if args else kwargs["batch"]
        keys = sorted(k for k, v in batch.items() if isinstance(v, Tensor))
        digest_K = torch.stack([batch[k].detach().double().sum() for k in keys])
        low, high = digest_K.clone(), digest_K.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        handle.remove()
        differ = [k for k, lo, hi in zip(keys, low.tolist(), high.tolist(), strict=True) if lo != hi]
        if differ:
            raise RuntimeError(f"the ranks of a tensor-parallel group were given different batches ({', '.join(differ)}): "
                               "their data streams must follow the data-parallel rank")

    handle = engine.module.register_forward_pre_hook(check, with_kwargs=True)
