"""Weight initialisation and parameter counting.

Shapes: none.
"""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02  # BERT's initializer_range, also ViT/ViLT's trunc_normal std


@torch.no_grad()
def init_weights(root: nn.Module, std: float = INIT_STD) -> None:
    """BERT/ViLT init: weights ~ truncated normal(0, std) cut at 2 std, biases 0, LayerNorm (1, 0).

    Every parameter is drawn, including the copies DeepSpeed makes of the expert module (which
    otherwise start identical) and bare parameters such as position embeddings. A parameter shared
    by two modules (tied MLM decoder) is initialised once, by the first module that owns it, so the
    word embedding keeps its zero [PAD] row.
    """
    seen: set[int] = set()
    for module in root.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.LayerNorm):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias" or name.endswith("_bias"):  # also stacked experts' fc1_bias ...
                param.zero_()
            else:
                nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    # Parameters with a paper-specific init (CLIP's temperature) are set by their module afterwards.
    for module in root.modules():
        reset = getattr(module, "reset_special_parameters", None)
        if callable(reset):
            reset()


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (a tied weight counts once), trainable or not."""
    return sum(p.numel() for p in module.parameters())
