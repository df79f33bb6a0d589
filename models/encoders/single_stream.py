"""Single-stream encoders: text tokens, [object tags,] visual tokens concatenated into one sequence.

Shapes: B batch, T text tokens, R tag tokens, P visual tokens, S = T + R + P, D model dim.

`SingleStreamEncoder` is VisualBERT / Unicoder-VL / VL-BERT / UNITER / ImageBERT / Pixel-BERT /
Oscar / ViLT / UNIMO: only the visual input and the tags differ between them.
`InteractionEncoder` is InterBERT: the same single-stream layers, then one stream per modality.

Contrastive outputs (`text_embed`, `image_embed`, `logit_scale`; the `itc` objective), built only
when an objective reads them. Unimodal passes through the shared transformer, as ALBEF (Li et al.
2021) and VLMo (Bao et al. 2022) encode each modality alone for their contrastive loss: the text
tokens alone and the visual tokens alone ([tags;] visual: Oscar's tags are the image's detected
classes, so they go with the image, never with the text) each run through the same layers, every
token attending only to its own modality (the stack runs on that modality's subsequence with its
own key mask; bidirectional whatever `causal_text`). After the final norm:

    text   [CLS] state
    image  region input: the whole-image token (ViLBERT's [IMG], first and always real);
           patch and pixel inputs have no class token: the mean over the real visual tokens

each is projected by text_proj / image_proj, Linear(D, E) without bias (E = model.embed_dim or
hidden_size, as CLIP's) and L2-normalised; `logit_scale` is CLIP's (clip.py: exp of a learnable
log-temperature initialised to log(1/0.07), clipped at 100). The token embeddings are computed once
per forward and shared by all passes (one dropout / pixel-sampling draw, one call of each
embedding module, which the adversarial training's embedding hooks count on).

The passes cost compute, so `want` (base.py) picks them per call: the unimodal passes run only when
`text_embed` / `image_embed` is wanted (each on its own), and the joint pass is skipped when
nothing else but contrastive outputs (and the always-present visual-input and MoE keys) is wanted,
e.g. for the view of `itc` alone. MoE: the unimodal passes route their tokens through the same MoE
FFNs; each call's weighted aux loss adds to `moe_aux`, and its expert counts add to that layer's
row of `moe_counts` (still [L_moe, E]; models/encoders/layers.py MoETally).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.embeddings import TagEmbeddings
from models.encoders.base import (
    CONTRASTIVE,
    FUSED,
    IMAGE_INPUT_OUTPUTS,
    MOE_OUTPUTS,
    Encoder,
    EncoderOutputs,
    text_keep,
)
from models.encoders.clip import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
from models.encoders.layers import Allow, MoETally, Pooler, causal_mask, key_mask, run_stack, stack, text_mask
from models.moe.stats import IMAGE, TEXT


def seq2seq_mask(keep_BS: Tensor, T: int) -> Allow:
    """[B, 1, S, S] UniLM seq2seq mask (Dong et al. 2019, Fig. 1): the first T tokens (the text,
    the target) attend causally to themselves and fully to the rest (the image, the source); the
    source attends only to itself."""
    S = keep_BS.shape[1]
    allow_SS = torch.ones(S, S, dtype=torch.bool, device=keep_BS.device)
    allow_SS[:T, :T] = causal_mask(T, keep_BS.device)
    allow_SS[T:, :T] = False
    return Allow((allow_SS & keep_BS[:, None, :])[:, None])


class _Sequence(NamedTuple):
    """The joint input sequence [text; tags; visual] and what is known of its padding on the host."""

    x_BSD: Tensor
    keep_BS: Tensor
    T: int
    R: int
    text_full: bool  # no text token is padding
    image_full: bool  # no tag or visual token is padding
    outputs: EncoderOutputs  # the visual input's outputs

    @property
    def modality_S(self) -> Tensor:
        """long [S]: TEXT for the text tokens, IMAGE for the tags and the visual tokens."""
        S = self.keep_BS.shape[1]
        return (torch.arange(S, device=self.keep_BS.device) >= self.T).long() * IMAGE + TEXT

    def allow(self, causal_text: bool) -> Allow:
        if causal_text:
            return seq2seq_mask(self.keep_BS, self.T)
        return key_mask(self.keep_BS, self.text_full and self.image_full)


# What the encoder returns without its joint pass: contrastive outputs, the visual input's keys, MoE's.
_WITHOUT_JOINT = CONTRASTIVE | IMAGE_INPUT_OUTPUTS | MOE_OUTPUTS


class SingleStreamEncoder(Encoder):
    """One transformer over [text; tags; visual], a final LayerNorm, the [CLS] pooler; when an
    objective reads them, the contrastive embeddings from unimodal passes (module docstring)."""

    CAN_PROVIDE = FUSED | CONTRASTIVE

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, text, image)
        D = cfg.hidden_size
        self.tags = TagEmbeddings(cfg.object_classes, D, cfg.dropout) if blocks.object_tags else None
        self.layers = stack(cfg, moe, blocks.joint)
        # Pre-LN stacks need a final norm: the residual stream itself is never normalised.
        self.norm = nn.LayerNorm(D)
        self.pooler = Pooler(D) if "pooled" in needs else None
        self.contrastive = bool(needs & CONTRASTIVE)
        if self.contrastive:
            self.text_proj = nn.Linear(D, blocks.embed_dim, bias=False)
            self.image_proj = nn.Linear(D, blocks.embed_dim, bias=False)
            # Shape [1], as CLIP's: DeepSpeed's CPU broadcast of the initial weights cannot view a 0-d tensor.
            self.logit_scale_log = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        # The image summary: the whole-image region token where there is one, else the mean.
        self.image_summary_first = blocks.visual == "region"
        provides = self.CAN_PROVIDE
        if self.pooler is None:
            provides = provides - {"pooled"}
        if not self.contrastive:
            provides = provides - CONTRASTIVE
        self.provides = provides

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """Called by models.weights.init_weights after the generic init: CLIP's temperature."""
        if self.contrastive:
            self.logit_scale_log.fill_(LOGIT_SCALE_INIT)

    def passes(self, want: frozenset[str] | None) -> tuple[bool, bool, bool]:
        """(joint, text alone, image alone): the passes a forward that will read `want` runs."""
        want = self.provides if want is None else want
        if not self.contrastive:
            return True, False, False
        joint = not (want & CONTRASTIVE) or bool(want - _WITHOUT_JOINT)
        return joint, "text_embed" in want, "image_embed" in want

    def _sequence(self, inputs: Mapping[str, Tensor], visual_mask_BP: Tensor | None,
                  generator: torch.Generator | None) -> _Sequence:
        text_BTD = self.text_embeddings(inputs["input_ids"])
        vis = self.embed_visual(inputs, visual_mask_BP, generator)
        keep_BT, text_full = text_keep(inputs)
        parts, keeps = [text_BTD], [keep_BT]
        R = 0
        if self.tags is not None:
            tags_BRD, keep_BR = self.tags(inputs["obj_labels"])
            parts.append(tags_BRD)
            keeps.append(keep_BR)
            R = keep_BR.shape[1]
        parts.append(vis.x_BPD)
        keeps.append(vis.mask_BP)
        # Tags are padded (images differ in their number of objects): only patch-like inputs are full.
        image_full = self.tags is None and self.visual_embeddings.dense
        return _Sequence(torch.cat(parts, dim=1), torch.cat(keeps, dim=1), text_BTD.shape[1], R, text_full,
                         image_full, vis.outputs())

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        seq = self._sequence(inputs, visual_mask_BP, generator)
        out = dict(seq.outputs)
        joint, text_alone, image_alone = self.passes(want)
        tally = MoETally(seq.x_BSD, self.moe_layers)
        if joint:
            out |= self._joint(seq, causal_text, tally)
        if self.contrastive:
            out |= self._contrastive(seq, text_alone, image_alone, tally)
        return out | tally.outputs()

    def _joint(self, seq: _Sequence, causal_text: bool, tally: MoETally) -> EncoderOutputs:
        """The single-stream pass over [text; tags; visual]: text_hidden, image_hidden, pooled."""
        T, R = seq.T, seq.R
        with tally.within(seq.modality_S):
            x_BSD = self.norm(run_stack(self.layers, seq.x_BSD, seq.allow(causal_text), seq.keep_BS, tally))
        out: EncoderOutputs = {"text_hidden": x_BSD[:, :T], "image_hidden": x_BSD[:, T + R:]}
        if self.pooler is not None:
            out["pooled"] = self.pooler(x_BSD)
        return out

    def _text_alone(self, t_BTD: Tensor, keep_BT: Tensor, allow: Allow, tally: MoETally) -> Tensor:
        """[B,T,D] final states of the text tokens attending only to the text."""
        return self.norm(run_stack(self.layers, t_BTD, allow, keep_BT, tally))

    def _image_alone(self, v_BQD: Tensor, keep_BQ: Tensor, allow: Allow, tally: MoETally) -> Tensor:
        """[B,Q,D] final states of the [tags;] visual tokens (Q = R + P) attending only to themselves."""
        return self.norm(run_stack(self.layers, v_BQD, allow, keep_BQ, tally))

    def _contrastive(self, seq: _Sequence, text_alone: bool, image_alone: bool, tally: MoETally) -> EncoderOutputs:
        """text_embed / image_embed [B,E] from the unimodal passes asked for, and logit_scale []."""
        x_BSD, keep_BS, T, R = seq.x_BSD, seq.keep_BS, seq.T, seq.R
        out: EncoderOutputs = {"logit_scale": self.logit_scale_log.clamp(max=LOGIT_SCALE_MAX).exp()[0]}
        if text_alone:
            keep_BT = keep_BS[:, :T]
            with tally.within(TEXT):
                t_BTD = self._text_alone(x_BSD[:, :T], keep_BT, key_mask(keep_BT, seq.text_full), tally)
            out["text_embed"] = F.normalize(self.text_proj(t_BTD[:, 0]), dim=-1)  # [CLS]
        if image_alone:
            keep_BQ = keep_BS[:, T:]
            image_keys = key_mask(keep_BQ, seq.image_full)
            with tally.within(IMAGE):
                v_BPD = self._image_alone(x_BSD[:, T:], keep_BQ, image_keys, tally)[:, R:]  # tags' states unread
            if self.image_summary_first:
                image_BD = v_BPD[:, 0]  # the whole-image region, always real
            else:
                real_BP1 = keep_BQ[:, R:, None].to(v_BPD.dtype)
                image_BD = (v_BPD * real_BP1).sum(1) / real_BP1.sum(1).clamp(min=1)
            out["image_embed"] = F.normalize(self.image_proj(image_BD), dim=-1)
        return out


class InteractionEncoder(SingleStreamEncoder):
    """InterBERT (Lin et al. 2020): `joint` single-stream layers (the interaction module), then a
    text stream of `text` layers and an image stream of `visual_layers` layers (the extraction
    module), each with its own final norm. The image stream is built only when an objective reads
    image states or the contrastive embeddings; pooled = the text stream's [CLS].

    The unimodal passes (contrastive outputs) run each modality alone through the interaction
    layers and then its own stream: text -> text stream, image -> image stream (whose final norm
    the image summary is taken after)."""

    CAN_PROVIDE = FUSED | CONTRASTIVE

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, moe, text, image, needs)
        self.image_out = bool(needs & {"image_hidden"})  # the joint pass runs the image stream
        self.image_stream = self.image_out or self.contrastive
        self.text_layers = stack(cfg, moe, blocks.text, first_index=blocks.joint)
        self.image_layers = stack(cfg, moe, blocks.visual_layers if self.image_stream else 0, blocks.joint)
        self.image_norm = nn.LayerNorm(cfg.hidden_size) if self.image_stream else None
        if not self.image_out:
            self.provides = self.provides - {"image_hidden"}

    def _joint(self, seq: _Sequence, causal_text: bool, tally: MoETally) -> EncoderOutputs:
        T, R, keep_BS = seq.T, seq.R, seq.keep_BS
        with tally.within(seq.modality_S):
            x_BSD = run_stack(self.layers, seq.x_BSD, seq.allow(causal_text), keep_BS, tally)
        keep_BT = keep_BS[:, :T]
        text_allow = text_mask(keep_BT, causal_text, seq.text_full)
        with tally.within(TEXT):
            text_BTD = self.norm(run_stack(self.text_layers, x_BSD[:, :T], text_allow, keep_BT, tally))
        out: EncoderOutputs = {"text_hidden": text_BTD}
        if self.image_out and self.image_norm is not None:
            keep_BP = keep_BS[:, T + R:]
            image_keys = key_mask(keep_BP, self.visual_embeddings.dense)
            with tally.within(IMAGE):
                image_BPD = run_stack(self.image_layers, x_BSD[:, T + R:], image_keys, keep_BP, tally)
            out["image_hidden"] = self.image_norm(image_BPD)
        if self.pooler is not None:
            out["pooled"] = self.pooler(text_BTD)
        return out

    def _text_alone(self, t_BTD: Tensor, keep_BT: Tensor, allow: Allow, tally: MoETally) -> Tensor:
        t_BTD = run_stack(self.layers, t_BTD, allow, keep_BT, tally)
        return self.norm(run_stack(self.text_layers, t_BTD, allow, keep_BT, tally))

    def _image_alone(self, v_BQD: Tensor, keep_BQ: Tensor, allow: Allow, tally: MoETally) -> Tensor:
        if self.image_norm is None:
            raise RuntimeError("the image stream was not built: no objective reads image states or embeddings")
        v_BQD = run_stack(self.layers, v_BQD, allow, keep_BQ, tally)
        return self.image_norm(run_stack(self.image_layers, v_BQD, allow, keep_BQ, tally))
