"""The position-wise feed-forward block: the dense FFN of a layer and the body of every expert.

Shapes: B batch, S tokens, D model dim, F hidden (FFN) dim.
"""

from __future__ import annotations

from torch import Tensor, nn


class FeedForward(nn.Module):
    """Linear(D, F) -> GELU -> Linear(F, D), as in BERT/ViT.

    No dropout inside: the transformer layer applies dropout on the residual branch, which is also
    where it goes for experts (a MoE layer's output is dropped out the same way as a dense one).
    """

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_size, hidden_size)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x_BSD)))


def ffn_size(hidden_size: int, mlp_ratio: float) -> int:
    """Width of the dense FFN; `int(hidden * ratio)` like timm's ViT."""
    return int(hidden_size * mlp_ratio)
