"""ViLBERT's two-stream encoder with co-attentional transformer blocks (Lu et al. 2019, §3.1).

Shapes: B batch, T text tokens, P visual tokens, D model dim.

    text  ── TRM x text_layers ──┬─ Co-TRM ─ TRM ─┬─ ... (cross_layers blocks) ── LN ── text_hidden
    image ───────────────────────┴─ Co-TRM ─ TRM ─┴─ ...                        ── LN ── image_hidden

A Co-TRM block computes both streams' attention from the block's inputs at once: text queries
over image keys/values and image queries over text keys/values (ViLBERT Fig. 2b), each followed by
its own FFN; then each stream runs an ordinary TRM layer. FFN depth indices (MoE placement) are
text_layers + 2k for block k's Co-TRM FFNs and + 1 for its TRM FFNs, the same in both streams.

Pooled = relu(W_t h_[CLS]) * relu(W_v h_[IMG]) (ViLBERT §3.2: the element-wise product of the two
streams' summaries); h_[IMG] is the whole-image region token, which the region input puts first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.base import FUSED, Encoder, EncoderOutputs, text_keep
from models.encoders.layers import (
    Allow,
    CrossSublayer,
    FFNSublayer,
    MoETally,
    TransformerLayer,
    key_mask,
    run_stack,
    stack,
    text_mask,
)
from models.moe.stats import IMAGE, TEXT


class CoAttentionBlock(nn.Module):
    """Co-TRM (co-attention + FFN per stream) then TRM (self-attention + FFN) per stream.

    With `image_side=False` (the last block when no objective reads image states) only the text
    side is built: the image side's outputs would reach no loss.
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int, image_side: bool) -> None:
        super().__init__()
        self.text_co = CrossSublayer(cfg)
        self.text_co_ffn = FFNSublayer(cfg, moe, index)
        self.text_trm = TransformerLayer(cfg, moe, index + 1)
        self.image_side = image_side
        if image_side:
            self.image_co = CrossSublayer(cfg)
            self.image_co_ffn = FFNSublayer(cfg, moe, index)
            self.image_trm = TransformerLayer(cfg, moe, index + 1)

    def forward(self, t_BTD: Tensor, v_BPD: Tensor, text_allow: Allow, keep_BT: Tensor, keep_BP: Tensor,
                causal_text: bool, tally: MoETally, text_keys: Allow, image_keys: Allow) -> tuple[Tensor, Tensor]:
        """`text_keys` / `image_keys`: attention over all real text / visual tokens as keys."""
        t_new = self.text_co(t_BTD, v_BPD, image_keys)
        if self.image_side:
            # Causal text: the image must not see the caption, or later words leak to earlier ones
            # through the image stream at the next block.
            v_BPD = v_BPD if causal_text else self.image_co(v_BPD, t_BTD, text_keys)
            with tally.within(IMAGE):
                v_BPD = self.image_co_ffn(v_BPD, keep_BP, tally)
        with tally.within(TEXT):
            t_BTD = self.text_co_ffn(t_new, keep_BT, tally)
            t_BTD = self.text_trm(t_BTD, text_allow, keep_BT, tally)
        if self.image_side:
            with tally.within(IMAGE):
                v_BPD = self.image_trm(v_BPD, image_keys, keep_BP, tally)
        return t_BTD, v_BPD


class CoAttentionEncoder(Encoder):
    CAN_PROVIDE = FUSED

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, text, image)
        D = cfg.hidden_size
        self.image_out = bool(needs & {"image_hidden", "pooled"})  # pooled reads the image stream
        self.text_layers = stack(cfg, moe, blocks.text)
        self.blocks = nn.ModuleList(
            CoAttentionBlock(cfg, moe, blocks.text + 2 * k, image_side=self.image_out or k < blocks.cross - 1)
            for k in range(blocks.cross))
        self.text_norm = nn.LayerNorm(D)
        self.image_norm = nn.LayerNorm(D) if self.image_out else None
        self.pooler = _ProductPooler(D) if "pooled" in needs else None
        provides = self.CAN_PROVIDE
        if self.pooler is None:
            provides = provides - {"pooled"}
        if not self.image_out:
            provides = provides - {"image_hidden"}
        self.provides = provides

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        # `want` is accepted for the common signature (base.py); this family always runs in full.
        t_BTD = self.text_embeddings(inputs["input_ids"])
        vis = self.embed_visual(inputs, visual_mask_BP, generator)
        (keep_BT, text_full), keep_BP = text_keep(inputs), vis.mask_BP
        text_allow = text_mask(keep_BT, causal_text, text_full)
        text_keys, image_keys = key_mask(keep_BT, text_full), key_mask(keep_BP, self.visual_embeddings.dense)
        tally = MoETally(t_BTD)
        with tally.within(TEXT):
            t_BTD = run_stack(self.text_layers, t_BTD, text_allow, keep_BT, tally)
        v_BPD = vis.x_BPD
        for block in self.blocks:
            t_BTD, v_BPD = block(t_BTD, v_BPD, text_allow, keep_BT, keep_BP, causal_text, tally, text_keys, image_keys)
        out: EncoderOutputs = vis.outputs() | {"text_hidden": self.text_norm(t_BTD)} | tally.outputs()
        if self.image_norm is not None:
            out["image_hidden"] = self.image_norm(v_BPD)
        if self.pooler is not None:
            out["pooled"] = self.pooler(out["text_hidden"], out["image_hidden"])
        return out


class _ProductPooler(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.text = nn.Linear(hidden_size, hidden_size)
        self.image = nn.Linear(hidden_size, hidden_size)

    def forward(self, text_BTD: Tensor, image_BPD: Tensor) -> Tensor:
        return torch.relu(self.text(text_BTD[:, 0])) * torch.relu(self.image(image_BPD[:, 0]))
