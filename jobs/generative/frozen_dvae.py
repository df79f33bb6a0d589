"""The frozen dVAE of a DALL-E run: its weights out of the dVAE run's checkpoint, into the model.

The driver (orchestrator/run/dalle_dvae.py) consolidates the dVAE run's latest checkpoint once and
writes the dVAE's tensors as one safetensors file into the DALL-E run directory
(`model.dalle.dvae_weights`); every worker loads that file before DeepSpeed wraps the model. The
weights then travel inside the DALL-E run's own checkpoints, so `mmpt generate` needs nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from jobs import storage
from models.config import ModelConfig

PREFIX = "encoder.vae."  # where a Pretrainer (presets dvae and dalle alike) keeps the DiscreteVAE
WEIGHTS_FILE = "dvae_frozen.safetensors"


def dvae_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The DiscreteVAE's tensors of a consolidated model state dict, without the prefix."""
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def load_frozen_dvae(model: nn.Module, cfg: ModelConfig, opts: storage.StorageOptions | None = None) -> int:
    """Load model.dalle.dvae_weights into a DALL-E model's dVAE; returns the tensors loaded (0 for
    other presets). Raises ValueError when a DALL-E model has no weights to load."""
    vae: Any = getattr(getattr(model, "encoder", None), "vae", None)
    if cfg.preset != "dalle" or vae is None:
        return 0
    uri = cfg.dalle.dvae_weights
    if not uri:
        raise ValueError("model.dalle.dvae_weights is not set: preset dalle trains on a frozen dVAE "
                         "(set model.dalle.dvae to the dVAE run directory)")
    from safetensors.torch import load

    tensors = load(storage.read_bytes(uri, opts))
    missing, unexpected = vae.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{uri}: does not fit model.dvae (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]})")
    vae.requires_grad_(False)
    return len(tensors)


__all__ = ["PREFIX", "WEIGHTS_FILE", "dvae_tensors", "load_frozen_dvae"]
