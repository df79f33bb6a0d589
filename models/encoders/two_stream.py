"""What ViLBERT's co-attention encoder and LXMERT's cross-modality encoder share: a text stream and
an image stream, each with its own layers, then layers that attend across the two.

Shapes: B batch, T text tokens, P visual tokens, D model dim.

    text  ── text_layers ──┬─ joint layer ─┬─ ... ── LN ── text_hidden
    image ── image_layers ─┴─ joint layer ─┴─ ... ── LN ── image_hidden     pooled = the subclass's

A joint layer (`JointLayer`): cross-attention of each stream over the other, both computed from the
layer's inputs, then per stream an optional FFN (ViLBERT's Co-TRM has one; LXMERT's layer does not)
and a transformer layer (self-attention + FFN). The subclasses name their sublayers as their
checkpoints do and hand them over as `JointParts`. With `image_side=False` (the last layer when no
objective reads image states) only the text side is built: the image side would reach no loss.

`TwoStreamEncoder` builds `text_layers`, `image_layers` (none for ViLBERT, whose regions enter the
first co-attention block as embedded), the subclass's joint layers and pooler, and the final norms.
The image side's output parts are built only when an objective reads them (`image_out`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple

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


class JointParts(NamedTuple):
    """A joint layer's sublayers; the image ones are None when the layer has no image side."""

    text_cross: CrossSublayer
    text_ffn: FFNSublayer | None
    text_layer: TransformerLayer
    image_cross: CrossSublayer | None
    image_ffn: FFNSublayer | None
    image_layer: TransformerLayer | None


class JointLayer(nn.Module):
    image_side: bool

    def parts(self) -> JointParts:
        raise NotImplementedError

    def forward(self, t_BTD: Tensor, v_BPD: Tensor, text_allow: Allow, keep_BT: Tensor, keep_BP: Tensor,
                causal_text: bool, tally: MoETally, text_keys: Allow, image_keys: Allow) -> tuple[Tensor, Tensor]:
        """`text_keys` / `image_keys`: attention over all real text / visual tokens as keys."""
        p = self.parts()
        t_new = p.text_cross(t_BTD, v_BPD, image_keys)
        if self.image_side:
            # Causal text: the image must not see the caption, or later words leak to earlier ones
            # through the image stream at the next layer.
            v_BPD = v_BPD if causal_text else p.image_cross(v_BPD, t_BTD, text_keys)
            if p.image_ffn is not None:
                with tally.within(IMAGE):
                    v_BPD = p.image_ffn(v_BPD, keep_BP, tally)
        with tally.within(TEXT):
            t_BTD = t_new if p.text_ffn is None else p.text_ffn(t_new, keep_BT, tally)
            t_BTD = p.text_layer(t_BTD, text_allow, keep_BT, tally)
        if self.image_side:
            with tally.within(IMAGE):
                v_BPD = p.image_layer(v_BPD, image_keys, keep_BP, tally)
        return t_BTD, v_BPD


class TwoStreamEncoder(Encoder):
    """Built in module order (which fixes the init draws): text embeddings, visual input, `text_layers`,
    `image_layers`, the subclass's joint layers (`build_joint`), the final norms, the pooler."""

    CAN_PROVIDE = FUSED
    IMAGE_READERS: ClassVar[frozenset[str]]  # wanted outputs that need the image stream's final states
    JOINT: ClassVar[str]  # the attribute holding the joint layers (as checkpoints name it)
    POOL_READS: ClassVar[tuple[str, ...]]  # the outputs the pooler reads, in its argument order

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, text, image)
        self.image_out = bool(needs & self.IMAGE_READERS)
        self.text_layers = stack(cfg, moe, blocks.text)
        self.image_layers = stack(cfg, moe, blocks.visual_layers)
        self.build_joint(cfg, moe, blocks)
        D = cfg.hidden_size
        self.text_norm = nn.LayerNorm(D)
        self.image_norm = nn.LayerNorm(D) if self.image_out else None
        self.pooler = self.make_pooler(D) if "pooled" in needs else None
        provides = self.CAN_PROVIDE
        if self.pooler is None:
            provides = provides - {"pooled"}
        if not self.image_out:
            provides = provides - {"image_hidden"}
        self.provides = provides

    def image_side(self, k: int, count: int) -> bool:
        """Whether joint layer k of `count` builds its image side: the last one only when read."""
        return self.image_out or k < count - 1

    def build_joint(self, cfg: ModelConfig, moe: MoEConfig, blocks: Blocks) -> None:
        raise NotImplementedError

    def make_pooler(self, hidden_size: int) -> nn.Module:
        raise NotImplementedError

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
        for layer in getattr(self, self.JOINT):
            t_BTD, v_BPD = layer(t_BTD, v_BPD, text_allow, keep_BT, keep_BP, causal_text, tally, text_keys, image_keys)
        out: EncoderOutputs = vis.outputs() | {"text_hidden": self.text_norm(t_BTD)} | tally.outputs()
        if self.image_norm is not None:
            out["image_hidden"] = self.image_norm(v_BPD)
        if self.pooler is not None:
            out["pooled"] = self.pooler(*(out[k] for k in self.POOL_READS))
        return out
