"""Unit-test fixtures, and the tiny models and batches the model tests build (one definition each).

The tiny models go through the factory runs use (`build_pretrainer`), on a 50-piece vocabulary,
12-token captions and 16-pixel images (four 8-pixel patches): milliseconds on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from models import Pretrainer, build_pretrainer
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from tests.unit.streams import fresh_index_cache, no_ray, tokenizer  # noqa: F401 - the data-stream tests' fixtures

B, T, D, R, C = 4, 12, 32, 3, 3  # batch, text tokens, hidden size, scene objects, image channels
TEXT = TextSpec(vocab_size=50, max_len=T)
IMAGE = ImageSpec(size=16)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: unit tests use tiny tensors, for which extra threads only add wake-up
    latency (seconds on a busy 2-core CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(preset: str = "vilt", **overrides: object) -> ModelConfig:
    """The tiny ModelConfig of `preset`: 3 layers of width 32, 4 heads, 8-pixel patches."""
    cfg: dict[str, object] = dict(preset=preset, hidden_size=D, num_layers=3, num_heads=4, mlp_ratio=2.0,
                                  patch_size=8, dropout=0.1)
    return ModelConfig(**(cfg | overrides))


def moe_cfg(**overrides: object) -> MoEConfig:
    """4 experts on every other FFN, capacity for all routes of a tiny batch."""
    return MoEConfig(**(dict(num_experts=4, layers="every_other", capacity_factor=2.0, min_capacity=0) | overrides))


def build(preset: str = "vilt", objectives: dict[str, float] | None = None, moe: MoEConfig | None = None, *,
          text: TextSpec = TEXT, image: ImageSpec = IMAGE, **model: object) -> Pretrainer:
    """The Pretrainer of `tiny(preset, **model)` (objectives None = the preset's), weights drawn from seed 0."""
    torch.manual_seed(0)
    return build_pretrainer(tiny(preset, **model), moe or MoEConfig(), objectives, text, image)


def make_batch(seed: int = 0) -> dict[str, Tensor]:
    """B samples: captions of 12, 9, 7 and 6 tokens ([CLS] ... [SEP], padded), random 16x16 images,
    and scene objects (boxes, classes; -1 = none) for the region inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TEXT.vocab_size, (B, T), generator=g)
    ids[:, 0] = TEXT.cls_id
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([T, 9, 7, 6]):
        ids[i, n - 1], ids[i, n:], mask[i, n:] = TEXT.sep_id, TEXT.pad_id, 0
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).expand(B, R, 4)
    labels = torch.tensor([[1, 3, -1], [0, 2, -1], [2, -1, -1], [3, 1, -1]])
    boxes = boxes * (labels >= 0)[..., None]
    return {"image": torch.randn(B, C, IMAGE.size, IMAGE.size, generator=g), "input_ids": ids,
            "attention_mask": mask, "obj_boxes": boxes.clone(), "obj_labels": labels, "sample_id": torch.arange(B)}
