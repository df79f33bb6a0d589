"""The stacked experts' FFN where the expert counts are host ints for free (CPU): one autograd
function, forward and backward written out.

Shapes: T computed rows (sorted by expert), D model dim, F expert hidden dim, L local experts.

Why not autograd over `F.grouped_mm` as on GPU (models/moe/experts.py): there, the rows past the
last offset must stay on the device (no host sync), so every projection is masked before and
after (six `torch.where` over [M, F] and [M, D], forward and backward), and the biases go through
an index_select whose backward is an index_add. On the host the counts cost nothing to read, so:

- only the T kept rows are computed, no mask anywhere (nothing unwritten exists);
- with few experts (L <= LOOP_MAX), many rows per expert (>= LOOP_ROWS), or sizes grouped_mm
  refuses, each projection is one `addmm` per expert into its slice of one output (the bias fused
  into the GEMM, as nn.Linear's); with many experts of few rows each, one `grouped_mm` (PyTorch's
  C++ loop of GEMMs: one Python call instead of L) and the biases added in place;
- the backward runs the same GEMMs by hand: weight gradients as one GEMM per expert into a buffer
  reused across steps (`GradBuffers`), bias gradients as per-expert sums (few experts) or one
  index_add (many), GELU's backward on the saved pre-activation; no autograd graph of ~20 nodes.

Costs at the quickstart's shapes (D 128, F 256, 2048 tokens, one thread), in benchmarks/moe.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Up to this many local experts, a Python loop of addmm (bias fused) beats grouped_mm + a bias pass;
# so it does from this many rows per expert on, whatever the count (grouped_mm's CPU GEMMs: at 128
# rows per expert, E=256, D=128, F=256, the forward takes 42 ms against the loop's 29; at 8 rows the
# loop's Python calls cost as much as the GEMMs).
LOOP_MAX = 16
LOOP_ROWS = 64


def _looped(w_LNK: Tensor, rows: int) -> bool:
    """Loop over the experts: few of them, many rows each (`rows` in all), or sizes grouped_mm
    refuses (strides of 16-byte multiples)."""
    L, N, K = w_LNK.shape
    per_16_bytes = 16 // w_LNK.element_size()
    return L <= LOOP_MAX or rows >= LOOP_ROWS * L or N % per_16_bytes != 0 or K % per_16_bytes != 0


def _project(x_TK: Tensor, w_LNK: Tensor, b_LN: Tensor, ends: list[int], offs: Tensor,
             row_expert_T: Tensor) -> Tensor:
    """y[rows of l] = x[rows of l] @ w[l]^T + b[l] (nn.Linear per expert) -> [T, N]."""
    N = w_LNK.shape[1]
    if not _looped(w_LNK, x_TK.shape[0]):
        return F.grouped_mm(x_TK, w_LNK.transpose(-2, -1), offs=offs).add_(b_LN.index_select(0, row_expert_T))
    out = x_TK.new_empty((x_TK.shape[0], N))
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            torch.addmm(b_LN[e], x_TK[start:end], w_LNK[e].t(), out=out[start:end])
        start = end
    return out


def _input_grad(g_TN: Tensor, w_LNK: Tensor, ends: list[int], offs: Tensor) -> Tensor:
    """d x[rows of l] = g[rows of l] @ w[l] -> [T, K]."""
    K = w_LNK.shape[2]
    if not _looped(w_LNK, g_TN.shape[0]):
        return F.grouped_mm(g_TN, w_LNK, offs=offs)
    out = g_TN.new_empty((g_TN.shape[0], K))
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            torch.mm(g_TN[start:end], w_LNK[e], out=out[start:end])
        start = end
    return out


def _param_grads(g_TN: Tensor, x_TK: Tensor, w_LNK: Tensor, ends: list[int], row_expert_T: Tensor,
                 buffers: GradBuffers, name: str) -> tuple[Tensor, Tensor]:
    """(d w [L, N, K] = per expert g^T x over its rows, d b [L, N] = per expert sum of g); experts
    without rows get 0. The weight gradient is one GEMM per expert into a buffer reused across steps
    (`GradBuffers`): at E = 256 it is 32 MiB, and fresh memory of that size costs more than its GEMMs
    (grouped_mm allocates its output: 18 ms against 8.7 for the loop into reused memory, here)."""
    L, N = len(ends), g_TN.shape[1]
    gw = buffers.empty(name, (L, N, x_TK.shape[1]), g_TN)
    g_NT = g_TN.t()
    looped = _looped(w_LNK, g_TN.shape[0])
    gb = g_TN.new_empty((L, N)) if looped else g_TN.new_zeros((L, N)).index_add_(0, row_expert_T, g_TN)
    # Every expert's slice is written (its GEMM, or zeros without rows): no memset of the whole
    # gradient first (at E=256 it is as large as the experts' weights).
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            torch.mm(g_NT[:, start:end], x_TK[start:end], out=gw[e])
            if looped:
                torch.sum(g_TN[start:end], 0, out=gb[e])
        else:
            gw[e].zero_()
            if looped:
                gb[e].zero_()
        start = end
    return gw, gb


class GradBuffers:
    """Large gradient buffers of one expert module, written again by a later backward once nothing
    else holds them -- the rule of PyTorch's CUDA caching allocator, for host memory: a buffer is
    reused only when its storage has no other user (the gradient it became was set to None, or
    DeepSpeed copied it into its own buffer and dropped it); while a `.grad` still holds it (gradient
    accumulation keeps p.grad) a fresh one is allocated. Why: glibc unmaps freed blocks from 32 MiB
    up, so a fresh 32 MiB gradient page-faults on every 4 KiB page when written (~14-19 ms here, as
    long as the GEMMs writing it); smaller blocks are reused by malloc itself and pass through."""

    MIN_BYTES = 16 * 2**20

    def __init__(self) -> None:
        self._held: dict[str, tuple[Tensor, int]] = {}

    def empty(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if math.prod(shape) * like.element_size() < self.MIN_BYTES:
            return like.new_empty(shape)
        held = self._held.get(name)
        if held is not None and held[0].shape == shape and held[0].dtype == like.dtype and _users(held[0]) == held[1]:
            return held[0].view(shape)  # a new tensor on the same storage: autograd takes it as .grad
        buf = like.new_empty(shape)
        self._held[name] = (buf, _users(buf))
        return buf.view(shape)

    def __deepcopy__(self, memo: dict[int, Any]) -> GradBuffers:
        return GradBuffers()  # a copied module gets its own buffers (none yet)

    def __getstate__(self) -> dict[str, Any]:
        return {"_held": {}}


def _users(t: Tensor) -> int:
    """References to t's storage (PyTorch's own check before reusing a buffer, as cudagraph_trees)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class HostExpertsFFN(torch.autograd.Function):
    """apply(x_TD, ends, row_expert_T, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> [T, D]: each
    row through its expert's Linear -> GELU -> Linear (`ends`: host ints, end row of each expert)."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, ends: list[int], row_expert_T: Tensor, buffers: GradBuffers, w1_LFD: Tensor,
                b1_LF: Tensor, w2_LDF: Tensor, b2_LD: Tensor) -> Tensor:
        offs = torch.tensor(ends, dtype=torch.int32)
        h_TF = _project(x_TD, w1_LFD, b1_LF, ends, offs, row_expert_T)
        a_TF = F.gelu(h_TF)
        y_TD = _project(a_TF, w2_LDF, b2_LD, ends, offs, row_expert_T)
        ctx.save_for_backward(x_TD, row_expert_T, w1_LFD, w2_LDF, h_TF, a_TF)
        ctx.ends, ctx.offs, ctx.buffers = ends, offs, buffers
        return y_TD

    @staticmethod
    def backward(ctx: Any, g_TD: Tensor) -> tuple[Tensor | None, ...]:
        x_TD, row_expert_T, w1_LFD, w2_LDF, h_TF, a_TF = ctx.saved_tensors
        ends, offs, buffers = ctx.ends, ctx.offs, ctx.buffers
        g_TD = g_TD.contiguous()
        weights = any(ctx.needs_input_grad[4:])
        gw2, gb2 = _param_grads(g_TD, a_TF, w2_LDF, ends, row_expert_T, buffers, "fc2") if weights else (None, None)
        g_TF = torch.ops.aten.gelu_backward(_input_grad(g_TD, w2_LDF, ends, offs), h_TF)
        gw1, gb1 = _param_grads(g_TF, x_TD, w1_LFD, ends, row_expert_T, buffers, "fc1") if weights else (None, None)
        gx = _input_grad(g_TF, w1_LFD, ends, offs) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, gw1, gb1, gw2, gb2
