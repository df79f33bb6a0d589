"""Single-stream encoders: text tokens, [object tags,] visual tokens concatenated into one sequence.

Shapes: B batch, T text tokens, R tag tokens, P visual tokens, S = T + R + P, D model dim.

`SingleStreamEncoder` is VisualBERT / Unicoder-VL / VL-BERT / UNITER / ImageBERT / Pixel-BERT /
Oscar / ViLT / UNIMO: only the visual input and the tags differ between them.
`InteractionEncoder` is InterBERT: the same single-stream layers, then one stream per modality.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.embeddings import TagEmbeddings
from models.encoders.base import FUSED, Encoder, EncoderOutputs
from models.encoders.layers import MoETally, Pooler, causal_mask, key_mask, run_stack, stack, text_mask
from models.presets import Blocks


def seq2seq_mask(keep_BS: Tensor, T: int) -> Tensor:
    """[B, 1, S, S] UniLM seq2seq mask (Dong et al. 2019, Fig. 1): the first T tokens (the text,
    the target) attend causally to themselves and fully to the rest (the image, the source); the
    source attends only to itself."""
    S = keep_BS.shape[1]
    allow_SS = torch.ones(S, S, dtype=torch.bool, device=keep_BS.device)
    allow_SS[:T, :T] = causal_mask(T, keep_BS.device)
    allow_SS[T:, :T] = False
    return (allow_SS & keep_BS[:, None, :])[:, None]


class SingleStreamEncoder(Encoder):
    """One transformer over [text; tags; visual], a final LayerNorm, the [CLS] pooler."""

    CAN_PROVIDE = FUSED

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, text, image)
        D = cfg.hidden_size
        self.tags = TagEmbeddings(cfg.object_classes, D, cfg.dropout) if blocks.object_tags else None
        self.layers = stack(cfg, moe, blocks.joint)
        # Pre-LN stacks need a final norm: the residual stream itself is never normalised.
        self.norm = nn.LayerNorm(D)
        self.pooler = Pooler(D) if "pooled" in needs else None
        self.provides = self.CAN_PROVIDE if self.pooler is not None else self.CAN_PROVIDE - {"pooled"}

    def _sequence(self, inputs: Mapping[str, Tensor], visual_mask_BP: Tensor | None,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor, int, int, dict[str, Tensor]]:
        """(x_BSD, keep_BS, T, R, visual outputs)."""
        text_BTD = self.text_embeddings(inputs["input_ids"])
        vis = self.embed_visual(inputs, visual_mask_BP, generator)
        parts, keeps = [text_BTD], [inputs["attention_mask"].bool()]
        R = 0
        if self.tags is not None:
            tags_BRD, keep_BR = self.tags(inputs["obj_labels"])
            parts.append(tags_BRD)
            keeps.append(keep_BR)
            R = keep_BR.shape[1]
        parts.append(vis.x_BPD)
        keeps.append(vis.mask_BP)
        return torch.cat(parts, dim=1), torch.cat(keeps, dim=1), text_BTD.shape[1], R, vis.outputs()

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None) -> EncoderOutputs:
        x_BSD, keep_BS, T, R, out = self._sequence(inputs, visual_mask_BP, generator)
        allow = seq2seq_mask(keep_BS, T) if causal_text else key_mask(keep_BS)
        tally = MoETally(x_BSD)
        x_BSD = self.norm(run_stack(self.layers, x_BSD, allow, keep_BS, tally))
        out |= {"text_hidden": x_BSD[:, :T], "image_hidden": x_BSD[:, T + R:], **tally.outputs()}
        if self.pooler is not None:
            out["pooled"] = self.pooler(x_BSD)
        return out


class InteractionEncoder(SingleStreamEncoder):
    """InterBERT (Lin et al. 2020): `joint` single-stream layers (the interaction module), then a
    text stream of `text` layers and an image stream of `visual_layers` layers (the extraction
    module), each with its own final norm. The image stream is built only when an objective reads
    image states; pooled = the text stream's [CLS]."""

    CAN_PROVIDE = FUSED

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str]) -> None:
        super().__init__(cfg, blocks, moe, text, image, needs)
        self.image_stream = bool(needs & {"image_hidden"})
        self.text_layers = stack(cfg, moe, blocks.text, first_index=blocks.joint)
        self.image_layers = stack(cfg, moe, blocks.visual_layers if self.image_stream else 0, blocks.joint)
        self.image_norm = nn.LayerNorm(cfg.hidden_size) if self.image_stream else None
        if not self.image_stream:
            self.provides = self.provides - {"image_hidden"}

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None) -> EncoderOutputs:
        x_BSD, keep_BS, T, R, out = self._sequence(inputs, visual_mask_BP, generator)
        allow = seq2seq_mask(keep_BS, T) if causal_text else key_mask(keep_BS)
        tally = MoETally(x_BSD)
        x_BSD = run_stack(self.layers, x_BSD, allow, keep_BS, tally)
        keep_BT = keep_BS[:, :T]
        text_allow = text_mask(keep_BT, causal_text)
        text_BTD = self.norm(run_stack(self.text_layers, x_BSD[:, :T], text_allow, keep_BT, tally))
        out["text_hidden"] = text_BTD
        if self.image_norm is not None:
            keep_BP = keep_BS[:, T + R:]
            image_BPD = run_stack(self.image_layers, x_BSD[:, T + R:], key_mask(keep_BP), keep_BP, tally)
            out["image_hidden"] = self.image_norm(image_BPD)
        out |= tally.outputs()
        if self.pooler is not None:
            out["pooled"] = self.pooler(text_BTD)
        return out
