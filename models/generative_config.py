"""Typed configuration of the two DALL-E stages: `model.dvae` and `model.dalle` (Ramesh et al. 2021).

Shapes: none (configuration only, no torch).

`model.dvae` sizes the discrete VAE: for preset `dvae` it is the network being trained; for preset
`dalle` it describes the frozen image tokenizer, and the driver replaces it with the one the dVAE
run was trained with (orchestrator/run/dalle_dvae.py), so the two can never disagree.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from models.schema import Strict


class DVAEConfig(Strict):
    """The discrete VAE (DALL-E §2.1): image -> grid of codebook tokens -> image."""

    codebook_size: int = Field(512, ge=2, description="K codebook entries (DALL-E: 8192)")
    downsample: int = Field(8, ge=2, description="image side / token-grid side, a power of 2 (DALL-E: 8, "
                            "256px -> 32x32 tokens)")
    channels: int = Field(64, ge=4, description="width of the conv encoder and decoder")
    codebook_dim: int = Field(64, ge=2, description="size of each codebook vector the decoder reads")
    kl_weight: float = Field(0.02, ge=0, description="beta of reconstruction + beta * KL(q || uniform)")
    kl_warmup_steps: int = Field(0, ge=0, description="beta rises linearly from 0 over this many training "
                                 "forwards (DALL-E ramps it over 5000 updates); 0 = constant")
    temperature_start: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at step 0 (DALL-E: 1)")
    temperature_end: float = Field(1 / 16, gt=0, description="temperature after annealing (DALL-E: 1/16)")
    straight_through: bool = Field(False, description="decode the one-hot argmax of the Gumbel sample, with the "
                                   "relaxed sample's gradient (Jang et al. 2017); DALL-E trains relaxed (false)")
    anneal_steps: int = Field(1000, ge=1, description="training forwards (optimizer steps x grad_accum) over "
                              "which the temperature follows a cosine from start to end")

    @model_validator(mode="after")
    def _power_of_two(self) -> DVAEConfig:
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample={self.downsample}: the dVAE halves the image with stride-2 convolutions, "
                             "so it must be a power of 2 (2, 4, 8, ...)")
        if self.temperature_end > self.temperature_start:
            raise ValueError(f"temperature_end={self.temperature_end} > temperature_start={self.temperature_start}: "
                             "the temperature is annealed downwards")
        return self

    @property
    def halvings(self) -> int:
        return int(math.log2(self.downsample))

    def grid(self, image_size: int) -> int:
        """Side of the token grid for `image_size` pixels."""
        return image_size // self.downsample


class DalleConfig(Strict):
    """The transformer stage (DALL-E §2.2): text tokens then image tokens, one causal decoder."""

    dvae: str | None = Field(None, description="the dVAE run directory (runs/<name>, local) whose latest "
                             "checkpoint is the frozen image tokenizer; required to train preset dalle")
    dvae_weights: str | None = Field(None, description="safetensors file of the frozen dVAE; the driver writes "
                                     "it from `dvae` into the run directory (set it to skip that)")
    text_loss_weight: float = Field(1 / 8, ge=0, description="weight of the text cross-entropy (DALL-E: 1/8)")
    image_loss_weight: float = Field(7 / 8, gt=0, description="weight of the image cross-entropy (DALL-E: 7/8)")


def image_problems(dvae: DVAEConfig, image_size: int) -> list[str]:
    """What does not fit between the dVAE and the data's image size, one sentence each."""
    if image_size % dvae.downsample:
        return [f"model.dvae.downsample={dvae.downsample} must divide data.image_size={image_size}"]
    return []


__all__ = ["DVAEConfig", "DalleConfig", "image_problems"]
