"""Zero-shot classification with a contrastive (ITC) encoder: CLIP, Radford et al. 2021, §3.1.

Legend: C classes, K prompts per class, N images, E joint embedding dim, T text tokens.

A class is the embedding of its prompts ("a photo of a {}" filled with the class name, or any
list of texts that describe the class); with several prompts per class the class embedding is the
mean of the L2-normalised prompt embeddings, normalised again (CLIP's prompt ensembling, §3.1.4:
averaging in embedding space, so the classifier costs one matrix product whatever K is). An image
is classified by cosine similarity to every class embedding; the logit scale does not change the
ranking and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from models.encoders.base import CONTRASTIVE

TEXT_EMBED = frozenset({"text_embed"})
IMAGE_EMBED = frozenset({"image_embed"})


def has_contrastive(encoder: torch.nn.Module) -> bool:
    """The encoder gives L2-normalised text and image embeddings (an ITC head)."""
    return CONTRASTIVE <= getattr(encoder, "provides", frozenset())


def ensemble(prompt_embed_CKE: Tensor) -> Tensor:
    """[C, K, E] prompt embeddings -> [C, E] class embeddings: mean of the normalised prompts, renormalised."""
    return F.normalize(F.normalize(prompt_embed_CKE, dim=-1).mean(dim=1), dim=-1)


def zero_shot_logits(image_embed_NE: Tensor, class_embed_CE: Tensor) -> Tensor:
    """[N, C] cosine similarity of every image to every class."""
    return F.normalize(image_embed_NE, dim=-1) @ class_embed_CE.T


def topk_correct(logits_NC: Tensor, labels_N: Tensor, k: int) -> Tensor:
    """[] long: how many rows have their label among their k highest logits (k capped at C)."""
    top_Nk = logits_NC.topk(min(k, logits_NC.shape[1]), dim=1).indices
    return (top_Nk == labels_N[:, None]).any(dim=1).sum()


def blank_visual(batch: Mapping[str, Tensor], rows: int) -> dict[str, Tensor]:
    """Visual columns for `rows` text-only inputs: the batch's first image and scene columns, zeroed
    (boxes) or -1 (labels), repeated. Single-stream encoders embed text beside some image."""
    from models.objectives.base import IMAGE_COLUMNS

    out: dict[str, Tensor] = {}
    for key in IMAGE_COLUMNS:
        if key in batch:
            first = batch[key][:1]
            blank = torch.full_like(first, -1) if key.endswith("labels") else torch.zeros_like(first)
            out[key] = blank.expand(rows, *first.shape[1:]).contiguous()
    return out


@torch.no_grad()
def embed_texts(encoder: torch.nn.Module, input_ids_MT: Tensor, attention_mask_MT: Tensor,
                visual: Mapping[str, Tensor]) -> Tensor:
    """[M, E] text embeddings of M token sequences.

    Only `text_embed` is asked for: a single-stream encoder then runs its unimodal text pass alone
    (its inputs still carry an image, `visual` from `blank_visual`, which that pass never reads);
    CLIP's towers are separate, so the image never reaches the text embedding.
    """
    inputs = {**visual, "input_ids": input_ids_MT, "attention_mask": attention_mask_MT}
    return encoder(inputs, want=TEXT_EMBED)["text_embed"].float()


def class_embeddings(encoder: torch.nn.Module, prompt_ids_CKT: Tensor, prompt_mask_CKT: Tensor,
                     visual: Mapping[str, Tensor]) -> Tensor:
    """[C, E] ensembled class embeddings from C x K tokenized prompts (`visual`: C*K blank rows)."""
    C, K, T = prompt_ids_CKT.shape
    flat_ME = embed_texts(encoder, prompt_ids_CKT.reshape(C * K, T), prompt_mask_CKT.reshape(C * K, T), visual)
    return ensemble(flat_ME.view(C, K, -1))
