"""The stacked experts' FFN where the expert counts are host ints for free (CPU): one autograd
function, forward and backward written out.

Shapes: T computed rows (sorted by expert), D model dim, F expert hidden dim, L local experts.

Why not autograd over `F.grouped_mm` as on GPU (models/moe/experts.py): there, the rows past the
last offset must stay on the device (no host sync), so every projection is masked before and
after (six `torch.where` over [M, F] and [M, D], forward and backward), and the biases go through
an index_select whose backward is an index_add. On the host the counts cost nothing to read, so:

- only the T kept rows are computed, no mask anywhere (nothing unwritten exists);
- with few experts (L <= LOOP_MAX), or sizes grouped_mm refuses, blocks of at most CHUNK rows of one
  expert go through Linear -> GELU -> Linear (and back) one after the other while they are in
  cache, the bias fused into the GEMM as nn.Linear's; with many experts, one `grouped_mm` per
  projection (PyTorch's C++ loop of GEMMs: one Python call instead of L) and the biases added in place;
- the backward runs the same GEMMs by hand: weight gradients as one grouped GEMM over the row
  ranges (2-D x 2-D with offsets -> [L, ...]), bias gradients as per-expert sums (few experts) or
  one index_add (many), GELU's backward on the saved pre-activation; no autograd graph of ~20 nodes.

Costs at the quickstart's shapes (D 128, F 256, 2048 tokens, one thread), in benchmarks/moe.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Up to this many local experts, a Python loop of addmm (bias fused) beats grouped_mm + a bias pass.
LOOP_MAX = 16
# Rows per block of that loop: a block's x, h, GELU(h) and its expert's weights (D 128, F 256: ~0.8 MB)
# stay in a core's L2 from the first projection to the second, and again in the backward.
CHUNK = 256


def _looped(w_LNK: Tensor) -> bool:
    """Loop over the experts: few of them, or sizes grouped_mm refuses (strides of 16-byte multiples)."""
    L, N, K = w_LNK.shape
    per_16_bytes = 16 // w_LNK.element_size()
    return L <= LOOP_MAX or N % per_16_bytes != 0 or K % per_16_bytes != 0


def _project(x_TK: Tensor, w_LNK: Tensor, b_LN: Tensor, offs: Tensor, row_expert_T: Tensor) -> Tensor:
    """y[rows of l] = x[rows of l] @ w[l]^T + b[l] (nn.Linear per expert) -> [T, N], one grouped GEMM."""
    return F.grouped_mm(x_TK, w_LNK.transpose(-2, -1), offs=offs).add_(b_LN.index_select(0, row_expert_T))


def _param_grads(g_TN: Tensor, x_TK: Tensor, ends: list[int], offs: Tensor, row_expert_T: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(d w [L, N, K] = per expert g^T x over its rows, d b [L, N] = per expert sum of g); experts
    without rows get 0 (grouped_mm may leave their groups unwritten)."""
    gw = F.grouped_mm(g_TN.t(), x_TK, offs=offs)
    for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if end == start:
            gw[e].zero_()
    return gw, g_TN.new_zeros((len(ends), g_TN.shape[1])).index_add_(0, row_expert_T, g_TN)


def _blocks(ends: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each block of at most CHUNK rows of one expert."""
    out, start = [], 0
    for e, end in enumerate(ends):
        out.extend((e, a, min(a + CHUNK, end)) for a in range(start, end, CHUNK))
        start = end
    return out


def _forward_blocks(x_TD: Tensor, w1_LFD: Tensor, b1_LF: Tensor, w2_LDF: Tensor, b2_LD: Tensor,
                    blocks: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(h = pre-activation, a = GELU(h), y) block by block: Linear, GELU, Linear of one block while it
    is in cache, instead of each step over all T rows."""
    T, Fh, D = x_TD.shape[0], w1_LFD.shape[1], w2_LDF.shape[1]
    h_TF, a_TF, y_TD = x_TD.new_empty((T, Fh)), x_TD.new_empty((T, Fh)), x_TD.new_empty((T, D))
    for e, a, b in blocks:
        torch.addmm(b1_LF[e], x_TD[a:b], w1_LFD[e].t(), out=h_TF[a:b])
        torch._C._nn.gelu(h_TF[a:b], out=a_TF[a:b])
        torch.addmm(b2_LD[e], a_TF[a:b], w2_LDF[e].t(), out=y_TD[a:b])
    return h_TF, a_TF, y_TD


def _backward_blocks(g_TD: Tensor, x_TD: Tensor, w1_LFD: Tensor, w2_LDF: Tensor, h_TF: Tensor, a_TF: Tensor,
                     blocks: list[tuple[int, int, int]], input_grad: bool) -> tuple[Tensor | None, ...]:
    """(dx or None, dw1, db1, dw2, db2), block by block; weight and bias gradients accumulate over an
    expert's blocks (experts without rows get 0)."""
    gw1, gb1 = torch.zeros_like(w1_LFD), w1_LFD.new_zeros(w1_LFD.shape[:2])
    gw2, gb2 = torch.zeros_like(w2_LDF), w2_LDF.new_zeros(w2_LDF.shape[:2])
    gx = torch.empty_like(x_TD) if input_grad else None
    for e, a, b in blocks:
        g_BD = g_TD[a:b]
        gw2[e].addmm_(g_BD.t(), a_TF[a:b])
        gb2[e].add_(g_BD.sum(0))
        g_BF = torch.ops.aten.gelu_backward(g_BD @ w2_LDF[e], h_TF[a:b])
        gw1[e].addmm_(g_BF.t(), x_TD[a:b])
        gb1[e].add_(g_BF.sum(0))
        if gx is not None:
            torch.mm(g_BF, w1_LFD[e], out=gx[a:b])
    return gx, gw1, gb1, gw2, gb2


class HostExpertsFFN(torch.autograd.Function):
    """apply(x_TD, ends, row_expert_T, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> [T, D]: each
    row through its expert's Linear -> GELU -> Linear (`ends`: host ints, end row of each expert)."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, ends: list[int], row_expert_T: Tensor, w1_LFD: Tensor, b1_LF: Tensor,
                w2_LDF: Tensor, b2_LD: Tensor) -> Tensor:
        offs = torch.tensor(ends, dtype=torch.int32)
        if _looped(w1_LFD) or _looped(w2_LDF):
            ctx.blocks = _blocks(ends)
            h_TF, a_TF, y_TD = _forward_blocks(x_TD, w1_LFD, b1_LF, w2_LDF, b2_LD, ctx.blocks)
        else:
            ctx.blocks = None
            h_TF = _project(x_TD, w1_LFD, b1_LF, offs, row_expert_T)
            a_TF = F.gelu(h_TF)
            y_TD = _project(a_TF, w2_LDF, b2_LD, offs, row_expert_T)
        ctx.save_for_backward(x_TD, row_expert_T, w1_LFD, w2_LDF, h_TF, a_TF)
        ctx.ends, ctx.offs = ends, offs
        return y_TD

    @staticmethod
    def backward(ctx: Any, g_TD: Tensor) -> tuple[Tensor | None, ...]:
        x_TD, row_expert_T, w1_LFD, w2_LDF, h_TF, a_TF = ctx.saved_tensors
        ends, offs = ctx.ends, ctx.offs
        g_TD = g_TD.contiguous()
        if ctx.blocks is not None:
            gx, gw1, gb1, gw2, gb2 = _backward_blocks(g_TD, x_TD, w1_LFD, w2_LDF, h_TF, a_TF, ctx.blocks,
                                                      ctx.needs_input_grad[0])
            return gx, None, None, gw1, gb1, gw2, gb2
        gw2, gb2 = _param_grads(g_TD, a_TF, ends, offs, row_expert_T)
        g_TF = torch.ops.aten.gelu_backward(F.grouped_mm(g_TD, w2_LDF, offs=offs), h_TF)
        gw1, gb1 = _param_grads(g_TF, x_TD, ends, offs, row_expert_T)
        gx = F.grouped_mm(g_TF, w1_LFD, offs=offs) if ctx.needs_input_grad[0] else None
        return gx, None, None, gw1, gb1, gw2, gb2
