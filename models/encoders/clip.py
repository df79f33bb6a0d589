"""CLIP's dual encoder (Radford et al. 2021, §2.4-2.5): two towers meeting only in the loss.

Shapes: B batch, T text tokens, P visual tokens, D model dim, E joint embedding dim.

    text  ── embeddings ── causal transformer (text_layers) ── LN ── h[EOT] ── W_t ── L2 norm ── text_embed
    image ── patches + [CLS] ── LN ── transformer (visual_layers) ── LN ── h[CLS] ── W_i ── L2 norm ── image_embed

The text tower is causal ("masked self-attention ... to preserve the ability to add language
modelling"), its summary the end-of-text token: our [SEP], the last real token. Projections have no
bias. `logit_scale` = exp(t), t learnable, initialised to log(1/0.07) and clipped so the scale never
exceeds 100 (CLIP §2.5). Without an objective that reads the embeddings the projections are not
built; without one that reads the image, neither is the image tower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.base import (
    CONTRASTIVE,
    IMAGE_OUTPUTS,
    MOE_OUTPUTS,
    TEXT_OUTPUTS,
    Encoder,
    EncoderOutputs,
    text_keep,
)
from models.encoders.layers import MoETally, key_mask, run_stack, stack, text_mask
from models.moe.stats import IMAGE, TEXT

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class DualEncoder(Encoder):
    CAN_PROVIDE = TEXT_OUTPUTS | IMAGE_OUTPUTS | MOE_OUTPUTS | CONTRASTIVE | {"causal_text"}

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        contrastive = bool(needs & CONTRASTIVE)
        with_image = contrastive or bool(needs & IMAGE_OUTPUTS)
        super().__init__(cfg, blocks, text, image, with_visual=with_image)
        D = cfg.hidden_size
        self.text_layers = stack(cfg, moe, blocks.text)
        self.text_norm = nn.LayerNorm(D)  # CLIP's ln_final
        if with_image:
            self.class_D = nn.Parameter(torch.zeros(D))
            self.class_position_D = nn.Parameter(torch.zeros(D))
            self.image_pre_norm = nn.LayerNorm(D)  # CLIP's ln_pre
            self.image_layers = stack(cfg, moe, blocks.visual_layers)
            self.image_norm = nn.LayerNorm(D)  # ln_post
        if contrastive:
            self.text_proj = nn.Linear(D, blocks.embed_dim, bias=False)
            self.image_proj = nn.Linear(D, blocks.embed_dim, bias=False)
            # Shape [1], not []: DeepSpeed's CPU broadcast of the initial weights cannot view a 0-d tensor.
            self.logit_scale_log = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.with_image, self.contrastive = with_image, contrastive
        provides = self.CAN_PROVIDE
        if not contrastive:
            provides = provides - CONTRASTIVE
        if not with_image:
            provides = provides - IMAGE_OUTPUTS
        self.provides = provides

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """Called by models.weights.init_weights after the generic init."""
        if self.contrastive:
            self.logit_scale_log.fill_(LOGIT_SCALE_INIT)

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        # `want` is accepted for the common signature (base.py); this family always runs in full.
        ids_BT, (keep_BT, _) = inputs["input_ids"], text_keep(inputs)
        t_BTD = self.text_embeddings(ids_BT)
        tally = MoETally(t_BTD)
        # Always causal: CLIP's text tower is a decoder-style transformer (causal_text is a no-op).
        text_allow = text_mask(keep_BT, causal=True)
        with tally.within(TEXT):
            t_BTD = self.text_norm(run_stack(self.text_layers, t_BTD, text_allow, keep_BT, tally))
        out: EncoderOutputs = {"text_hidden": t_BTD}
        if self.with_image:
            vis = self.embed_visual(inputs, visual_mask_BP, generator)
            B = vis.x_BPD.shape[0]
            cls_B1D = (self.class_D + self.class_position_D).expand(B, 1, -1)
            v_BSD = self.image_pre_norm(torch.cat([cls_B1D, vis.x_BPD], dim=1))
            keep_BS = torch.cat([torch.ones_like(vis.mask_BP[:, :1]), vis.mask_BP], dim=1)
            image_keys = key_mask(keep_BS, self.visual_embeddings.dense)
            with tally.within(IMAGE):
                v_BSD = self.image_norm(run_stack(self.image_layers, v_BSD, image_keys, keep_BS, tally))
            out |= vis.outputs() | {"image_hidden": v_BSD[:, 1:]}
        if self.contrastive:
            eot_B = keep_BT.long().sum(dim=1) - 1  # [SEP], the last real token
            text_BD = t_BTD[torch.arange(t_BTD.shape[0], device=t_BTD.device), eot_B]
            out["text_embed"] = F.normalize(self.text_proj(text_BD), dim=-1)
            out["image_embed"] = F.normalize(self.image_proj(v_BSD[:, 0]), dim=-1)
            out["logit_scale"] = self.logit_scale_log.clamp(max=LOGIT_SCALE_MAX).exp()[0]
        return out | tally.outputs()
