"""Transformer layers and the single-stream (ViLT) image-text encoder.

Shapes: B batch, T text tokens, P image patches, S = T + P tokens, D model dim, H heads,
K head dim (D / H), L_moe MoE layers, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.embeddings import PatchEmbeddings, TextEmbeddings
from models.ffn import FeedForward, ffn_size
from models.moe.layer import MoEFFN

# What an encoder returns: named tensors; `moe_counts` is None for a dense model.
EncoderOutputs = dict[str, Tensor | None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, on PyTorch's fused SDPA kernel."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x_BSD: Tensor, keep_BS: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q_BHSK, k_BHSK, v_BHSK = (
            self.qkv(x_BSD).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        # Boolean mask, True = may attend; broadcast over heads and queries so padded keys get no
        # weight. Padded queries still produce (ignored) outputs: every row has unmasked keys
        # (the image patches), so no row is all -inf.
        mask_B11S = keep_BS[:, None, None, :]
        y_BHSK = F.scaled_dot_product_attention(
            q_BHSK, k_BHSK, v_BHSK, attn_mask=mask_B11S, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y_BHSK.transpose(1, 2).reshape(B, S, D))


class TransformerLayer(nn.Module):
    """Pre-LN block (Xiong et al. 2020; as in ViT/ViLT): x + Attn(LN(x)), then x + FFN(LN(x)).

    The FFN is dense or a MoE FFN (GShard/Switch replace the dense FFN of selected layers).
    `forward` returns (x_BSD, aux loss or None, expert counts [E] or None).
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.attn_norm = nn.LayerNorm(D)
        self.attn = SelfAttention(D, cfg.num_heads, cfg.dropout)
        self.ffn_norm = nn.LayerNorm(D)
        self.is_moe = moe.is_moe_layer(index)
        self.ffn: nn.Module = (
            MoEFFN(D, moe, mlp_ratio=cfg.mlp_ratio)
            if self.is_moe
            else FeedForward(D, ffn_size(D, cfg.mlp_ratio))
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: Tensor, keep_BS: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x_BSD = x_BSD + self.dropout(self.attn(self.attn_norm(x_BSD), keep_BS))
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            # Padding tokens are not routed: they would take expert capacity from real tokens.
            y_BSD, aux, counts_E = self.ffn(h_BSD, keep_BS)
        else:
            y_BSD, aux, counts_E = self.ffn(h_BSD), None, None
        return x_BSD + self.dropout(y_BSD), aux, counts_E


class Pooler(nn.Module):
    """Linear + tanh on the first token (BERT's pooler, reused by ViLT on the text [CLS])."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return torch.tanh(self.dense(x_BSD[:, 0]))


class Encoder(nn.Module):
    """What the pretrainer needs of any encoder preset (single-stream, dual-stream, dual encoder).

    forward(image_BCHW, input_ids_BT, attention_mask_BT) -> EncoderOutputs, always with `moe_aux`
    (scalar) and `moe_counts` ([L_moe, E] or None); the other keys are those in `provides`.
    """

    provides: frozenset[str]
    num_moe_layers: int

    @property
    def word_embeddings(self) -> nn.Embedding:
        raise NotImplementedError


class SingleStreamEncoder(Encoder):
    """ViLT (Kim et al. 2021): text tokens and image patches concatenated into one sequence.

    forward(image_BCHW, input_ids_BT, attention_mask_BT) -> {
        text_hidden [B,T,D], image_hidden [B,P,D], pooled [B,D] (only with a pooler),
        moe_aux scalar (sum over MoE layers; 0 when dense), moe_counts [L_moe,E] long or None }
    """

    # Everything this architecture can provide; `provides` is what this instance does provide.
    CAN_PROVIDE = frozenset({"text_hidden", "image_hidden", "pooled", "moe_aux", "moe_counts"})

    def __init__(
        self,
        cfg: ModelConfig,
        moe: MoEConfig,
        text: TextSpec,
        image: ImageSpec,
        pooler: bool = True,
    ) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.text_embeddings = TextEmbeddings(text, D, cfg.dropout)
        self.patch_embeddings = PatchEmbeddings(image, cfg.patch_size, D, cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, moe, i) for i in range(cfg.num_layers))
        # Pre-LN stacks need a final norm: the residual stream itself is never normalised.
        self.norm = nn.LayerNorm(D)
        # Built only when an objective reads it: a parameter the loss never reaches is dead weight
        # and trips DDP/ZeRO bookkeeping of unused parameters.
        self.pooler = Pooler(D) if pooler else None
        self.provides = self.CAN_PROVIDE if pooler else self.CAN_PROVIDE - {"pooled"}
        self.num_moe_layers = sum(layer.is_moe for layer in self.layers)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.word

    def forward(self, image_BCHW: Tensor, input_ids_BT: Tensor, attention_mask_BT: Tensor) -> EncoderOutputs:
        text_BTD = self.text_embeddings(input_ids_BT)
        image_BPD = self.patch_embeddings(image_BCHW)
        B, T, _ = text_BTD.shape
        P = image_BPD.shape[1]
        x_BSD = torch.cat([text_BTD, image_BPD], dim=1)
        keep_BS = torch.cat(
            [attention_mask_BT.bool(), torch.ones(B, P, dtype=torch.bool, device=x_BSD.device)], dim=1
        )
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        counts: list[Tensor] = []
        for layer in self.layers:
            x_BSD, layer_aux, layer_counts = layer(x_BSD, keep_BS)
            if layer_aux is not None:
                aux = aux + layer_aux
            if layer_counts is not None:
                counts.append(layer_counts)
        x_BSD = self.norm(x_BSD)
        out: EncoderOutputs = {
            "text_hidden": x_BSD[:, :T],
            "image_hidden": x_BSD[:, T:],
            "moe_aux": aux,
            "moe_counts": torch.stack(counts) if counts else None,
        }
        if self.pooler is not None:
            out["pooled"] = self.pooler(x_BSD)
        return out
