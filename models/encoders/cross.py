"""LXMERT's cross-modality encoder (Tan & Bansal 2019, §2.2).

Shapes: B batch, T text tokens, P visual tokens, D model dim.

    text  ── language encoder (text_layers) ──────────┬─ cross layer x cross_layers ── LN ── text_hidden
    image ── object-relationship encoder (visual_layers) ┴─                          ── LN ── image_hidden

A cross-modality layer: cross-attention of each stream over the other (one set of weights for
both directions, as LXMERT's `visual_attention`, computed from the layer's inputs at once), then
self-attention and an FFN per stream. FFN depths (MoE placement): the language and object
encoders both count from 0; cross layer k is at max(text_layers, visual_layers) + k.
Pooled = tanh(W h_[CLS]) of the text stream (LXMERT's pooler feeds the matching classifier).
"""

from __future__ import annotations

from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.base import EncoderOutputs
from models.encoders.layers import Allow, CrossSublayer, MoETally, Pooler, TransformerLayer, stack
from models.encoders.two_stream import TwoStreamEncoder
from models.moe.stats import IMAGE, TEXT


class CrossModalityLayer(nn.Module):
    """Shared cross-attention, then a self-attention + FFN layer per stream. With
    `image_side=False` (last layer, no objective reads image states) the image side is not built."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int, image_side: bool) -> None:
        super().__init__()
        self.cross = CrossSublayer(cfg)
        self.text_layer = TransformerLayer(cfg, moe, index)
        self.image_side = image_side
        if image_side:
            self.image_layer = TransformerLayer(cfg, moe, index)

    def forward(self, t_BTD: Tensor, v_BPD: Tensor, text_allow: Allow, keep_BT: Tensor, keep_BP: Tensor,
                causal_text: bool, tally: MoETally, text_keys: Allow, image_keys: Allow) -> tuple[Tensor, Tensor]:
        """`text_keys` / `image_keys`: attention over all real text / visual tokens as keys."""
        t_new = self.cross(t_BTD, v_BPD, image_keys)
        if self.image_side:
            # Causal text: the image must not see the caption (no leak from later words).
            v_BPD = v_BPD if causal_text else self.cross(v_BPD, t_BTD, text_keys)
        with tally.within(TEXT):
            t_BTD = self.text_layer(t_new, text_allow, keep_BT, tally)
        if self.image_side:
            with tally.within(IMAGE):
                v_BPD = self.image_layer(v_BPD, image_keys, keep_BP, tally)
        return t_BTD, v_BPD


class CrossModalityEncoder(TwoStreamEncoder):
    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, text, image)
        self.image_out = "image_hidden" in needs
        self.text_layers = stack(cfg, moe, blocks.text)
        self.image_layers = stack(cfg, moe, blocks.visual_layers)
        base = max(blocks.text, blocks.visual_layers)
        self.cross_layers = nn.ModuleList(
            CrossModalityLayer(cfg, moe, base + k, image_side=self.image_out or k < blocks.cross - 1)
            for k in range(blocks.cross))
        self._outputs_from(cfg.hidden_size, Pooler(cfg.hidden_size) if "pooled" in needs else None)

    @property
    def joint(self) -> nn.ModuleList:
        return self.cross_layers

    def pool(self, out: EncoderOutputs) -> Tensor:
        return self.pooler(out["text_hidden"])
