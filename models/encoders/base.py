"""What the pretrainer and the objectives need of any encoder, whatever its family.

Shapes: B batch, T text tokens, P visual tokens, D model dim, F visual features, E joint
embedding dim (CLIP), L_moe MoE layers, E_x experts.

forward(inputs, *, visual_mask_BP=None, causal_text=False, generator=None, want=None) -> EncoderOutputs

`inputs` is a view of the batch (jobs/data/batch.py): `image`, `input_ids`, `attention_mask` and
whatever visual columns the visual input reads (`obj_boxes`, `obj_labels`, `region_*`). Output keys,
each present when the encoder's `provides` names it:

    text_hidden  [B,T,D]   final text states          image_hidden [B,P,D]  final visual states
    pooled       [B,D]     pair summary (ITM)         moe_aux      []       weighted aux of all MoE FFNs
    moe_counts   [L_moe,E_x] long or None (dense)
    image_feats  [B,P,F]   visual features before projection (MRFR target; masked ones zeroed)
    image_labels [B,P]     long object class of each visual token, -1 unknown
    image_mask   [B,P]     bool real visual token     image_masked [B,P] bool features were masked
    text_embed, image_embed [B,E] L2-normalised; logit_scale [] = exp(learned log-temperature) (CLIP;
                           single-stream encoders: unimodal passes, single_stream.py)

`want` (a set of output keys and capabilities, or None = everything the encoder `provides`) says
what the caller will read: the pretrainer passes, per view, the union of that view's objectives'
`requires`. Every encoder accepts it; an encoder may skip work whose outputs are not wanted (the
single-stream encoders skip their unimodal passes, or their joint pass) and may then leave those
keys out. `moe_aux`/`moe_counts` and the visual input's keys are always returned.

`provides` may also hold capabilities, which are not output keys: `cross_modal` (text states have
seen the image), `causal_text` (the encoder honours `causal_text=True`: text attends causally to
text and fully to the image; the image never attends to the text, so nothing leaks from later
words; UniLM's seq2seq mask, Dong et al. 2019, as UNIMO uses it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, TextSpec
from models.embeddings import TextEmbeddings
from models.objectives.base import TEXT_FULL
from models.visual import VisualInput, VisualTokens, build_visual

EncoderOutputs = dict[str, Tensor | None]


def text_keep(inputs: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
    """(keep_BT bool, full): the real text tokens, and whether the host knows none is padding
    (`TEXT_FULL`, a CPU flag: reading it is no device sync)."""
    full = inputs.get(TEXT_FULL)
    return inputs["attention_mask"].bool(), bool(full) if full is not None else False

MOE_OUTPUTS = frozenset({"moe_aux", "moe_counts"})
TEXT_OUTPUTS = frozenset({"text_hidden"})
IMAGE_INPUT_OUTPUTS = frozenset({"image_feats", "image_labels", "image_mask", "image_masked"})
IMAGE_OUTPUTS = IMAGE_INPUT_OUTPUTS | {"image_hidden"}
FUSED = TEXT_OUTPUTS | IMAGE_OUTPUTS | MOE_OUTPUTS | {"pooled", "cross_modal", "causal_text"}
CONTRASTIVE = frozenset({"text_embed", "image_embed", "logit_scale"})


class Encoder(nn.Module):
    """Base of every encoder: text embeddings, one visual input, MoE bookkeeping.

    Subclasses set `CAN_PROVIDE` (everything the family can give) and, per instance, `provides`
    (what this instance gives: parts no objective reads are not built, since a parameter the loss
    never reaches has no gradient and trips DDP/ZeRO's bookkeeping).
    """

    CAN_PROVIDE: frozenset[str] = FUSED
    provides: frozenset[str]

    def __init__(self, cfg: ModelConfig, blocks: Blocks, text: TextSpec, image: ImageSpec,
                 with_visual: bool = True) -> None:
        super().__init__()
        self.text_embeddings = TextEmbeddings(text, cfg.hidden_size, cfg.dropout)
        self._visual_name: str | None = None
        self._num_moe: int | None = None
        if with_visual:
            name, module = build_visual(cfg, blocks, image)
            self.add_module(name, module)
            self._visual_name = name

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.word

    @property
    def visual_embeddings(self) -> VisualInput:
        if self._visual_name is None:
            raise AttributeError("this encoder was built without a visual input (no objective reads the image)")
        return getattr(self, self._visual_name)

    @property
    def num_moe_layers(self) -> int:
        """MoE FFNs in the encoder (rows of `moe_counts`); counted once, after construction."""
        if self._num_moe is None:
            self._num_moe = len(self.moe_layers)
        return self._num_moe

    @property
    def moe_layers(self) -> tuple[nn.Module, ...]:
        """The MoE FFNs in module order (the rows of `moe_counts` for a tally given them); found once."""
        found = self.__dict__.get("_moe_layers")
        if found is None:
            from models.moe.layer import MoEFFN

            found = tuple(m for m in self.modules() if isinstance(m, MoEFFN))
            self.__dict__["_moe_layers"] = found  # a plain tuple, not registered as submodules
        return found

    def num_visual_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        """P for these inputs before any sampling: the size `visual_mask_BP` must have."""
        return self.visual_embeddings.num_tokens(inputs)

    def embed_visual(self, inputs: Mapping[str, Tensor], visual_mask_BP: Tensor | None,
                     generator: torch.Generator | None) -> VisualTokens:
        return self.visual_embeddings(inputs, visual_mask_BP, generator)

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        raise NotImplementedError
