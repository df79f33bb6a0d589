"""Every collective the train loop, the data streams and the evaluation use, on the engine's device.

Legend: N rows of this rank, N_all rows of all ranks, K values in a reduction.

Why one module: Ray Train picks NCCL when its workers have GPUs, and NCCL only takes CUDA tensors
(gloo takes CPU tensors, and CUDA ones too). A collective built with `torch.tensor([...])` lands on
the CPU and is fine under gloo, then crashes the first multi-GPU run. Here every tensor handed to
`torch.distributed` is made on `device` (the engine's: `engine.device`), whatever the backend, and
each helper reads its result back to the host once: a reduction of K values is one collective and
one device-to-host copy, not K.

With one rank, or no process group (unit tests, a single-GPU check), every helper is the identity
and touches neither torch.distributed nor the device.

Under tensor parallelism the ranks of one tp group hold the same samples and the same figures, so
every helper reduces over the data-parallel group that `use_group` sets (jobs/tensor_parallel.py);
without one, over all ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

Scalar = float | int | Tensor
_GROUP: dist.ProcessGroup | None = None  # the data-parallel group; None = the default group


def use_group(group: dist.ProcessGroup | None) -> None:
    """Reduce over `group` from now on (the data-parallel group of a tensor-parallel run), or all ranks."""
    global _GROUP
    _GROUP = group


def world_size() -> int:
    """Ranks in the data-parallel group (`use_group`; default: all ranks); 1 without a process group."""
    return dist.get_world_size(_GROUP) if dist.is_available() and dist.is_initialized() else 1


def _stack(values: Mapping[str, Scalar], keys: list[str], device: torch.device | str) -> Tensor:
    """[K] float64 on `device`, in `keys` order: the host numbers in one copy, the tensors stacked
    (on the device already: no copy, no sync)."""
    out = torch.tensor([0.0 if isinstance(values[k], Tensor) else float(values[k]) for k in keys],
                       dtype=torch.float64, device=device)
    at = [i for i, k in enumerate(keys) if isinstance(values[k], Tensor)]
    if at:
        stacked = torch.stack([values[keys[i]].detach().reshape(()).to(device, torch.float64) for i in at])
        out = out.index_put((torch.tensor(at, device=device),), stacked)
    return out


def all_reduce_dict(values: Mapping[str, Scalar], device: torch.device | str,
                    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> dict[str, float]:
    """{key: reduced value} over ranks, in one collective. Values may be host numbers or 0-d tensors
    (device tensors are not read before the reduction: one device-to-host copy for all of them)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = _stack(values, keys, device)
    if world_size() > 1:
        dist.all_reduce(t, op=op, group=_GROUP)
    return dict(zip(keys, t.tolist(), strict=True))


def all_mean(values: Mapping[str, Scalar], device: torch.device | str) -> dict[str, float]:
    """Mean over ranks of each value."""
    world = world_size()
    return {k: v / world for k, v in all_reduce_dict(values, device).items()}


def all_max(value: Scalar, device: torch.device | str) -> float:
    """Max over ranks (the straggler's figure, e.g. the data-wait share of a synchronous step)."""
    return all_reduce_dict({"v": value}, device, op=dist.ReduceOp.MAX)["v"]


def all_have(flag: bool, device: torch.device | str) -> bool:
    """True when every rank has `flag` (MIN all-reduce)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_dict({"flag": 1 if flag else 0}, device, op=dist.ReduceOp.MIN)["flag"])


def all_gather_rows(rows_NX: Tensor, device: torch.device | str) -> Tensor:
    """[N_all, ...] every rank's rows, concatenated in rank order, on `device`.

    Ranks may hold different N (and, for 2-d integer rows such as token ids, different widths: the
    narrower ones are right-padded with zeros to the widest). Two collectives: the shapes, then
    the rows padded to the largest, as `all_gather_into_tensor` needs equal shapes.
    """
    rows_NX = rows_NX.to(device)
    world = world_size()
    if world == 1:
        return rows_NX
    shape = torch.tensor(rows_NX.shape, dtype=torch.int64, device=device)
    shapes = torch.empty(world * rows_NX.ndim, dtype=torch.int64, device=device)
    _gather_single(shapes, shape)
    sizes = shapes.view(world, rows_NX.ndim).tolist()
    widest = [max(s[d] for s in sizes) for d in range(rows_NX.ndim)]
    padded = rows_NX.new_zeros(widest)
    padded[tuple(slice(0, n) for n in rows_NX.shape)] = rows_NX
    out = rows_NX.new_empty((world * widest[0], *widest[1:]))
    _gather_single(out, padded)
    out = out.view(world, *widest)
    return torch.cat([out[r][: sizes[r][0]] for r in range(world)])


def _gather_single(out: Tensor, local: Tensor) -> None:
    """Every rank's `local` concatenated along dim 0 into `out` (torch 2.13 renamed the collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=_GROUP)
