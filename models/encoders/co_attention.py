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
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.base import EncoderOutputs
from models.encoders.layers import Allow, CrossSublayer, FFNSublayer, MoETally, TransformerLayer, stack
from models.encoders.two_stream import TwoStreamEncoder
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


class CoAttentionEncoder(TwoStreamEncoder):
    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, text, image)
        self.image_out = bool(needs & {"image_hidden", "pooled"})  # pooled reads the image stream
        self.text_layers = stack(cfg, moe, blocks.text)
        self.image_layers = stack(cfg, moe, blocks.visual_layers)  # none: regions enter the blocks as embedded
        self.blocks = nn.ModuleList(
            CoAttentionBlock(cfg, moe, blocks.text + 2 * k, image_side=self.image_out or k < blocks.cross - 1)
            for k in range(blocks.cross))
        self._outputs_from(cfg.hidden_size, _ProductPooler(cfg.hidden_size) if "pooled" in needs else None)

    @property
    def joint(self) -> nn.ModuleList:
        return self.blocks

    def pool(self, out: EncoderOutputs) -> Tensor:
        return self.pooler(out["text_hidden"], out["image_hidden"])


class _ProductPooler(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.text = nn.Linear(hidden_size, hidden_size)
        self.image = nn.Linear(hidden_size, hidden_size)

    def forward(self, text_BTD: Tensor, image_BPD: Tensor) -> Tensor:
        return torch.relu(self.text(text_BTD[:, 0])) * torch.relu(self.image(image_BPD[:, 0]))
