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

from torch import nn

from models.blocks import Blocks
from models.config import ModelConfig, MoEConfig
from models.encoders.layers import CrossSublayer, Pooler, TransformerLayer
from models.encoders.two_stream import JointLayer, JointParts, TwoStreamEncoder


class CrossModalityLayer(JointLayer):
    """Shared cross-attention (one set of weights for both directions), then a self-attention + FFN
    layer per stream."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, index: int, image_side: bool) -> None:
        super().__init__()
        self.cross = CrossSublayer(cfg)
        self.text_layer = TransformerLayer(cfg, moe, index)
        self.image_side = image_side
        if image_side:
            self.image_layer = TransformerLayer(cfg, moe, index)

    def parts(self) -> JointParts:
        image = (self.cross, None, self.image_layer) if self.image_side else (None, None, None)
        return JointParts(self.cross, None, self.text_layer, *image)


class CrossModalityEncoder(TwoStreamEncoder):
    JOINT, POOL_READS = "cross_layers", ("text_hidden",)
    IMAGE_READERS = frozenset({"image_hidden"})

    def build_joint(self, cfg: ModelConfig, moe: MoEConfig, blocks: Blocks) -> None:
        base = max(blocks.text, blocks.visual_layers)
        self.cross_layers = nn.ModuleList(CrossModalityLayer(cfg, moe, base + k, self.image_side(k, blocks.cross))
                                          for k in range(blocks.cross))

    def make_pooler(self, hidden_size: int) -> nn.Module:
        return Pooler(hidden_size)
