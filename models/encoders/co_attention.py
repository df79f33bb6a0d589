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

import torch
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ModelConfig, MoEConfig
from models.encoders.layers import CrossSublayer, FFNSublayer, TransformerLayer
from models.encoders.two_stream import JointLayer, JointParts, TwoStreamEncoder


class CoAttentionBlock(JointLayer):
    """Co-TRM (co-attention + FFN per stream) then TRM (self-attention + FFN) per stream."""

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

    def parts(self) -> JointParts:
        image = (self.image_co, self.image_co_ffn, self.image_trm) if self.image_side else (None, None, None)
        return JointParts(self.text_co, self.text_co_ffn, self.text_trm, *image)


class CoAttentionEncoder(TwoStreamEncoder):
    JOINT, POOL_READS = "blocks", ("text_hidden", "image_hidden")
    IMAGE_READERS = frozenset({"image_hidden", "pooled"})  # pooled reads the image stream

    def build_joint(self, cfg: ModelConfig, moe: MoEConfig, blocks: Blocks) -> None:
        self.blocks = nn.ModuleList(CoAttentionBlock(cfg, moe, blocks.text + 2 * k, self.image_side(k, blocks.cross))
                                    for k in range(blocks.cross))

    def make_pooler(self, hidden_size: int) -> nn.Module:
        return _ProductPooler(hidden_size)


class _ProductPooler(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.text = nn.Linear(hidden_size, hidden_size)
        self.image = nn.Linear(hidden_size, hidden_size)

    def forward(self, text_BTD: Tensor, image_BPD: Tensor) -> Tensor:
        return torch.relu(self.text(text_BTD[:, 0])) * torch.relu(self.image(image_BPD[:, 0]))
