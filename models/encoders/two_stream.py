"""What ViLBERT's co-attention encoder and LXMERT's cross-modality encoder share: a text stream and
an image stream, each with its own layers, then layers that attend across the two.

Shapes: B batch, T text tokens, P visual tokens, D model dim.

    text  ── text_layers ──┬─ joint layer ─┬─ ... ── LN ── text_hidden
    image ── image_layers ─┴─ joint layer ─┴─ ... ── LN ── image_hidden     pooled = the subclass's

A subclass builds `text_layers`, `image_layers` (empty for ViLBERT, whose regions enter the first
co-attention block as embedded) and its joint layers, then calls `_outputs_from` to add the norms
and the pooler; a joint layer is called as
`layer(t_BTD, v_BPD, text_allow, keep_BT, keep_BP, causal_text, tally, text_keys, image_keys)`.
The image side's output parts are built only when an objective reads them (`image_out`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.encoders.base import FUSED, Encoder, EncoderOutputs, text_keep
from models.encoders.layers import MoETally, key_mask, run_stack, text_mask
from models.moe.stats import IMAGE, TEXT


class TwoStreamEncoder(Encoder):
    CAN_PROVIDE = FUSED
    text_layers: nn.ModuleList
    image_layers: nn.ModuleList
    image_out: bool  # image_hidden is built (an objective reads it, or the pooler does)

    @property
    def joint(self) -> nn.ModuleList:
        """The layers that attend across the streams."""
        raise NotImplementedError

    def pool(self, out: EncoderOutputs) -> Tensor:
        raise NotImplementedError

    def _outputs_from(self, hidden_size: int, pooler: nn.Module | None) -> None:
        """The final norms and the pooler (after the layers: module order fixes the init draws), and `provides`."""
        self.text_norm = nn.LayerNorm(hidden_size)
        self.image_norm = nn.LayerNorm(hidden_size) if self.image_out else None
        self.pooler = pooler
        provides = self.CAN_PROVIDE
        if self.pooler is None:
            provides = provides - {"pooled"}
        if not self.image_out:
            provides = provides - {"image_hidden"}
        self.provides = provides

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        # `want` is accepted for the common signature (base.py); these families always run in full.
        t_BTD = self.text_embeddings(inputs["input_ids"])
        vis = self.embed_visual(inputs, visual_mask_BP, generator)
        (keep_BT, text_full), keep_BP = text_keep(inputs), vis.mask_BP
        text_allow = text_mask(keep_BT, causal_text, text_full)
        text_keys, image_keys = key_mask(keep_BT, text_full), key_mask(keep_BP, self.visual_embeddings.dense)
        tally = MoETally(t_BTD)
        with tally.within(TEXT):
            t_BTD = run_stack(self.text_layers, t_BTD, text_allow, keep_BT, tally)
        with tally.within(IMAGE):
            v_BPD = run_stack(self.image_layers, vis.x_BPD, image_keys, keep_BP, tally)
        for layer in self.joint:
            t_BTD, v_BPD = layer(t_BTD, v_BPD, text_allow, keep_BT, keep_BP, causal_text, tally, text_keys, image_keys)
        out: EncoderOutputs = vis.outputs() | {"text_hidden": self.text_norm(t_BTD)} | tally.outputs()
        if self.image_norm is not None:
            out["image_hidden"] = self.image_norm(v_BPD)
        if self.pooler is not None:
            out["pooled"] = self.pool(out)
        return out
