"""Random draws for views: torch's global RNG by default, or a given generator.

Shapes: none (helpers take explicit sizes).

The train loop seeds one generator per rank and checkpoints its state, so a resumed run draws the
same masks. A generator lives on one device; draws are made there and moved to the data's device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _where(device: torch.device, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else device


def uniform(size: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) of the given size, on `device`."""
    return torch.rand(size, generator=generator, device=_where(device, generator)).to(device)


def randint(
    low: int, high: int, size: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Integers uniform in [low, high), on `device`."""
    return torch.randint(low, high, size, generator=generator, device=_where(device, generator)).to(device)


def randperm(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A random permutation of 0..n-1, on `device`."""
    return torch.randperm(n, generator=generator, device=_where(device, generator)).to(device)


def multinomial(probs_NK: Tensor, generator: torch.Generator | None) -> Tensor:
    """long [N, 1]: one index per row drawn with probability `probs_NK` (torch.multinomial), on the
    probabilities' device."""
    where = _where(probs_NK.device, generator)
    return torch.multinomial(probs_NK.to(where), 1, generator=generator).to(probs_NK.device)


def categorical(logits_NK: Tensor, generator: torch.Generator | None) -> Tensor:
    """long [N]: one index per row drawn with probability softmax(logits) (Gumbel-max: argmax of
    logits + Gumbel noise, Gumbel 1954 / Maddison et al. 2014). -inf logits are never drawn."""
    u_NK = uniform(tuple(logits_NK.shape), logits_NK.device, generator).clamp(min=1e-20)
    return (logits_NK.float() - torch.log(-torch.log(u_NK))).argmax(dim=-1)
