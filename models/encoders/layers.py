"""Transformer sublayers shared by every encoder family: attention, FFN (dense or MoE), poolers.

Shapes: B batch, Q query tokens, K key tokens, S tokens of a stream, D model dim, H heads,
d head dim (D / H), E experts, L_moe MoE layers.

All blocks are pre-LN (Xiong et al. 2020; as in ViT/ViLT/CLIP): x + f(LN(x)). The BERT-era papers
(VisualBERT ... UNITER, LXMERT, ViLBERT) are post-LN; pre-LN trains stably without their warm-up
tuning, at any depth, and every family here uses the same blocks so comparisons between presets
measure the architecture, not the normalisation.

Attention masks are `Allow` values: a boolean mask (True = may attend, [B, 1, Q or 1, K], broadcast
over heads) or none at all, plus SDPA's `is_causal`. The form decides which fused kernel PyTorch's
scaled_dot_product_attention may pick on a GPU: FlashAttention-2 takes no mask, so a sequence with
no padding (known on the host: `key_mask(..., full=True)`) gets no mask; a padded one keeps its
boolean mask, which the memory-efficient kernel takes. Causal text self-attention is `is_causal`
with no mask even when padded: text is right-padded (jobs/data/batch.py), so a real query at i only
ever sees keys 0..i, all real; padded positions' outputs are never read (their labels are ignored,
MoE does not route them, pooling reads [CLS] or the last real token) -- open_clip's text tower
relies on the same.
Every query row must keep at least one key (an all-False row makes SDPA return NaN): the encoders
guarantee it (text [CLS] is always real; region inputs always have the whole-image token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig, MoEConfig
from models.ffn import FeedForward, ffn_size
from models.moe.layer import MoEFFN
from models.recompute import Recomputable


class MoETally:
    """Collects each MoE FFN's weighted aux loss and expert counts during one encoder forward.

    Without `layers`, one `moe_counts` row per MoE call, in execution order (each layer runs once
    per forward). An encoder that runs some layers more than once per forward, or not at all (the
    single-stream encoders' unimodal passes, models/encoders/single_stream.py), passes its MoE FFNs
    as `layers`: then every call's aux is added to `moe_aux`, the counts of calls of the same layer
    are summed into that layer's row, and rows follow `layers` (a layer that did not run has a row of
    zeros), so `moe_counts` is always [L_moe, E] whatever ran.
    """

    def __init__(self, like: Tensor, layers: Sequence[nn.Module] | None = None) -> None:
        self.aux = like.new_zeros((), dtype=torch.float32)
        self.counts: list[Tensor] = []
        self._layers = None if layers is None else tuple(layers)
        self._by_layer: dict[int, Tensor] = {}
        # The modality of the tokens the running stack sees (models.moe.stats.TEXT / IMAGE, or a long
        # [S] code per position for a joint sequence), for the MoE layers' per-modality stats.
        self.modality: int | Tensor | None = None

    @contextlib.contextmanager
    def within(self, modality: int | Tensor) -> Iterator[MoETally]:
        """Run the enclosed stack(s) on tokens of `modality` (restored afterwards)."""
        previous, self.modality = self.modality, modality
        try:
            yield self
        finally:
            self.modality = previous

    def add(self, aux: Tensor, counts_E: Tensor, layer: nn.Module | None = None) -> None:
        self.aux = self.aux + aux
        if self._layers is None or layer is None:
            self.counts.append(counts_E)
            return
        key = id(layer)
        self._by_layer[key] = counts_E if key not in self._by_layer else self._by_layer[key] + counts_E

    def outputs(self) -> dict[str, Tensor | None]:
        """`moe_aux` scalar (0 when dense), `moe_counts` long [L_moe, E] (see the class), or None."""
        if self._by_layer:
            layers = self._layers or ()
            if set(self._by_layer) - {id(m) for m in layers}:
                raise RuntimeError("an MoE layer ran that is not among the tally's layers")
            ran = next(iter(self._by_layer.values()))
            rows = [self._by_layer.get(id(m), torch.zeros_like(ran)) for m in layers]
            return {"moe_aux": self.aux, "moe_counts": torch.stack(rows)}
        return {"moe_aux": self.aux, "moe_counts": torch.stack(self.counts) if self.counts else None}


class Allow(NamedTuple):
    """Which keys each query may attend to, in the form SDPA's fastest kernels accept (module docstring)."""

    mask: Tensor | None  # bool [B, 1, Q or 1, K], True = may attend; None = every key (but see causal)
    causal: bool = False  # square self-attention where query i sees keys 0..i (SDPA's is_causal)


def key_mask(keep_BK: Tensor, full: bool = False) -> Allow:
    """Every query may attend to the real keys; `full` (known on the host: no key is padding) drops
    the mask, which makes the attention eligible for FlashAttention."""
    return Allow(None if full else keep_BK[:, None, None, :])


def _sdpa(q_BHQd: Tensor, k_BHKd: Tensor, v_BHKd: Tensor, allow: Allow, dropout: float) -> Tensor:
    return F.scaled_dot_product_attention(q_BHQd, k_BHKd, v_BHKd, attn_mask=allow.mask, dropout_p=dropout,
                                          is_causal=allow.causal)


class SelfAttention(nn.Module):
    """Multi-head self-attention, fused QKV projection, on PyTorch's SDPA kernel.

    The heads a forward runs are read from the projection's output width, not from the config:
    under Megatron tensor parallelism (jobs/tensor_parallel.py) `qkv` is column-split into this
    rank's H/tp heads of Q, K and V and `out` row-split, so the same code runs whole or sharded.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads  # of the whole layer; a tensor-parallel rank runs num_heads / tp
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x_BSD: Tensor, allow: Allow) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        y_BHSd = _sdpa(q, k, v, allow, self.dropout if self.training else 0.0)
        return self.out(y_BHSd.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Multi-head attention of one stream's queries over another stream's keys/values (ViLBERT's
    co-attention, LXMERT's cross-attention)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads  # of the whole layer; heads per forward from the shapes (SelfAttention)
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x_BQD: Tensor, ctx_BKD: Tensor, allow: Allow) -> Tensor:
        B, Q, _ = x_BQD.shape
        K, d = ctx_BKD.shape[1], self.head_dim
        q_BHQd = self.q(x_BQD).view(B, Q, -1, d).transpose(1, 2)
        k_BHKd, v_BHKd = self.kv(ctx_BKD).view(B, K, 2, -1, d).permute(2, 0, 3, 1, 4)
        y_BHQd = _sdpa(q_BHQd, k_BHKd, v_BHKd, allow, self.dropout if self.training else 0.0)
        return self.out(y_BHQd.transpose(1, 2).flatten(2))


class _Layer(Recomputable):
    """A unit of activation checkpointing (models/recompute.py); its second forward tallies nothing."""

    def recompute_args(self, args: tuple) -> tuple:
        return tuple(MoETally(args[0]) if isinstance(a, MoETally) else a for a in args)


class CrossSublayer(_Layer):
    """x + Dropout(CrossAttn(LN(x), LN(ctx))): the context is another stream's residual stream, so
    it is normalised too."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.norm = nn.LayerNorm(D)
        self.ctx_norm = nn.LayerNorm(D)
        self.attn = CrossAttention(D, cfg.num_heads, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def _forward(self, x_BQD: Tensor, ctx_BKD: Tensor, allow: Allow) -> Tensor:
        return x_BQD + self.dropout(self.attn(self.norm(x_BQD), self.ctx_norm(ctx_BKD), allow))


def _add_ffn(module: nn.Module, cfg: ModelConfig, moe: MoEConfig, index: int) -> None:
    D = cfg.hidden_size
    module.ffn_norm = nn.LayerNorm(D)
    module.is_moe = moe.is_moe_layer(index)
    module.ffn = MoEFFN(D, moe, mlp_ratio=cfg.mlp_ratio) if module.is_moe else FeedForward(D, ffn_size(D, cfg.mlp_ratio))
    module.dropout = nn.Dropout(cfg.dropout)


def _apply_ffn(module: nn.Module, x_BSD: Tensor, keep_BS: Tensor, tally: MoETally) -> Tensor:
    h_BSD = module.ffn_norm(x_BSD)
    if module.is_moe:
        # Padding tokens are not routed: they would take expert capacity from real tokens.
        y_BSD, aux, counts_E = module.ffn(h_BSD, keep_BS, tally.modality)
        tally.add(aux, counts_E, module.ffn)
    else:
        y_BSD = module.ffn(h_BSD)
    return x_BSD + module.dropout(y_BSD)


class FFNSublayer(_Layer):
    """x + Dropout(FFN(LN(x))); the FFN is MoE where `moe.is_moe_layer(index)` (GShard/Switch
    replace the dense FFN of selected layers). `index` is the FFN's depth (see Blocks.depth)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int) -> None:
        super().__init__()
        _add_ffn(self, cfg, moe, index)

    def _forward(self, x_BSD: Tensor, keep_BS: Tensor, tally: MoETally) -> Tensor:
        return _apply_ffn(self, x_BSD, keep_BS, tally)


class TransformerLayer(_Layer):
    """Pre-LN transformer layer: x + Dropout(SelfAttn(LN(x))), then the FFN sublayer (same
    parameter names and order as the foundation's ViLT layer, so its init draws are unchanged)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout)
        _add_ffn(self, cfg, moe, index)

    def _forward(self, x_BSD: Tensor, allow: Allow, keep_BS: Tensor, tally: MoETally) -> Tensor:
        x_BSD = x_BSD + self.dropout(self.attn(self.attn_norm(x_BSD), allow))
        return _apply_ffn(self, x_BSD, keep_BS, tally)


def stack(cfg: ModelConfig, moe: MoEConfig, count: int, first_index: int = 0) -> nn.ModuleList:
    """`count` transformer layers whose FFNs sit at depths first_index, first_index + 1, ..."""
    return nn.ModuleList(TransformerLayer(cfg, moe, first_index + i) for i in range(count))


def run_stack(layers: nn.ModuleList, x_BSD: Tensor, allow: Allow, keep_BS: Tensor, tally: MoETally) -> Tensor:
    for layer in layers:
        x_BSD = layer(x_BSD, allow, keep_BS, tally)
    return x_BSD


class Pooler(nn.Module):
    """Linear + tanh on the first token (BERT's pooler, reused by ViLT/UNITER/LXMERT on [CLS])."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return torch.tanh(self.dense(x_BSD[:, 0]))


def causal_mask(T: int, device: torch.device) -> Tensor:
    """[T, T] lower-triangular: token i sees tokens 0..i (a decoder's mask)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def text_mask(keep_BT: Tensor, causal: bool, full: bool = False) -> Allow:
    """Text self-attention: causal (no mask needed for right-padded text, module docstring), or
    every query over the real keys."""
    return Allow(None, causal=True) if causal else key_mask(keep_BT, full)
