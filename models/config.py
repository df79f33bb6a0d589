"""Typed configuration of a model: the `model` and `moe` sections of a run config.

These are plain pydantic models (no torch, no Ray) so the run config in `jobs/` composes them and
the model factories in `models/` read them: one schema serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator

from models._schema import _Strict
from models.moe.config import MoEConfig

__all__ = ["ImageSpec", "ModelConfig", "MoEConfig", "TextSpec"]


class ModelConfig(_Strict):
    """The encoder: which preset and its size."""

    preset: str = Field("vilt", description="architecture preset name (see `mmpt models list`)")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    patch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        return self


@dataclass(frozen=True)
class TextSpec:
    """What the model needs to know about the tokenizer."""

    vocab_size: int
    max_len: int
    pad_id: int = 0
    unk_id: int = 1
    cls_id: int = 2
    sep_id: int = 3
    mask_id: int = 4


@dataclass(frozen=True)
class ImageSpec:
    """What the model needs to know about the images the pipeline delivers."""

    size: int
    channels: int = 3
