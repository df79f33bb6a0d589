"""Activation checkpointing, one transformer layer at a time (train.activation_checkpointing).

A checkpointed layer keeps only its inputs in the forward pass and runs its forward again in
backward to rebuild the activations it needs (torch.utils.checkpoint, non-reentrant: side outputs
such as the MoE aux loss still backpropagate, and the RNG state is replayed so dropout and noisy
gates draw the same values). Memory: the layer inputs of every layer plus one layer's activations
(Korthikanti et al. 2022, "full recomputation"; the planner's `act ckpt` column).

The second forward must not count twice: `recomputing()` is true while it runs, and MoE layers skip
their routing statistics then (models/moe/layer.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_depth = 0


def recomputing() -> bool:
    """True inside a checkpointed layer's second (backward-time) forward."""
    return _depth > 0


@contextlib.contextmanager
def _recompute() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


class Recomputable(nn.Module):
    """A layer that can be checkpointed: subclasses implement `_forward`; `checkpointing` switches it on."""

    checkpointing: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self._forward(*args, **kwargs)
        first = True

        def run(*a: Any) -> Any:
            nonlocal first
            if first:
                first = False
                return self._forward(*a, **kwargs)
            with _recompute():
                return self._forward(*self.recompute_args(a), **kwargs)

        return checkpoint(run, *args, use_reentrant=False)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def recompute_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Arguments of the second forward (e.g. a throwaway MoE tally in place of the real one)."""
        return args


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch checkpointing on or off for every checkpointable layer; returns how many there are.

    The units are the encoders' sublayers (models/encoders/layers.py), none of which contains another.
    """
    layers = [m for m in model.modules() if isinstance(m, Recomputable)]
    for layer in layers:
        layer.checkpointing = enabled
    return len(layers)


__all__ = ["Recomputable", "recomputing", "set_activation_checkpointing"]
