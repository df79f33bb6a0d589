"""What a head reads of an encoder: one vector per image, or one per (image, text) pair.

Shapes: B batch, P visual tokens, D model dim, E joint embedding dim.

- image features: the ITC image embedding [B,E] when the encoder has one (CLIP's linear probe reads
  the image tower's output), else the mean of the final visual states over real tokens [B,D].
- pair features: the ITM pooler [B,D] when the encoder has one (ViLT, UNITER: their VQA heads
  read it); else the first text state [B,D] of an encoder whose text has seen the image
  (`cross_modal`); else, for two towers that never meet (CLIP), [t, i, t*i] of the two embeddings
  [B,3E] (the fusion of "How much can CLIP benefit vision-and-language tasks?", Shen et al. 2021,
  reduced to its simplest form).
"""

from __future__ import annotations

from torch import Tensor, nn

from models.encoders.base import CONTRASTIVE

IMAGE_EMBED = frozenset({"image_embed"})
IMAGE_STATES = frozenset({"image_hidden", "image_mask"})


def _provides(encoder: nn.Module) -> frozenset[str]:
    return getattr(encoder, "provides", frozenset())


def has_image_features(encoder: nn.Module) -> bool:
    """Whether `image_features` can read this encoder (not, e.g., a dVAE or a DALL-E decoder)."""
    provides = _provides(encoder)
    return CONTRASTIVE <= provides or IMAGE_STATES <= provides


def image_want(encoder: nn.Module) -> frozenset[str]:
    return IMAGE_EMBED if CONTRASTIVE <= _provides(encoder) else IMAGE_STATES


def image_features(outputs: dict[str, Tensor | None]) -> Tensor:
    if outputs.get("image_embed") is not None:
        return outputs["image_embed"]  # type: ignore[return-value]
    h_BPD, keep_BP = outputs["image_hidden"], outputs["image_mask"]
    assert h_BPD is not None and keep_BP is not None
    w_BP1 = keep_BP.to(h_BPD.dtype)[..., None]
    return (h_BPD * w_BP1).sum(1) / w_BP1.sum(1).clamp(min=1.0)


def pair_mode(encoder: nn.Module) -> str:
    provides = _provides(encoder)
    if "pooled" in provides:
        return "pooled"
    if "cross_modal" in provides:
        return "cls"
    if CONTRASTIVE <= provides:
        return "embeddings"
    raise ValueError("this encoder gives no joint image-text representation (no pooler, no cross-modal text "
                     "states, no ITC embeddings); pretrain it with itm or itc")


def pair_want(encoder: nn.Module) -> frozenset[str]:
    return {"pooled": frozenset({"pooled"}), "cls": frozenset({"text_hidden"}),
            "embeddings": CONTRASTIVE}[pair_mode(encoder)]


def pair_features_dim(encoder: nn.Module, hidden_size: int, embed_dim: int) -> int:
    return 3 * embed_dim if pair_mode(encoder) == "embeddings" else hidden_size


def pair_features(outputs: dict[str, Tensor | None], mode: str) -> Tensor:
    if mode == "pooled":
        return outputs["pooled"]  # type: ignore[return-value]
    if mode == "cls":
        return outputs["text_hidden"][:, 0]  # type: ignore[index]
    t_BE, i_BE = outputs["text_embed"], outputs["image_embed"]
    assert t_BE is not None and i_BE is not None
    return _cat(t_BE, i_BE)


def _cat(t_BE: Tensor, i_BE: Tensor) -> Tensor:
    import torch

    return torch.cat([t_BE, i_BE, t_BE * i_BE], dim=-1)
