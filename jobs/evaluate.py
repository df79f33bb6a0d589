"""Held-out evaluation inside the Ray Train workers: ITM accuracy, retrieval, MLM accuracy.

Legend: K candidate-set size (= eval batch size), T tokens.

Retrieval ranks, for each image of an eval batch, the K captions of that batch by ITM score
(image-to-text), and for each caption the K images (text-to-image): R@1 over candidate sets of K,
the protocol ViLT and UNITER use when full-set ITM scoring is too expensive (K^2 forwards).
A caption counts as correct when its tokens equal the true caption's: the shapes world repeats
captions, and an identical caption is as right as the original.

Every rank evaluates its equal share of the split and the counts are summed across ranks, so the
figures cover the whole held-out subset. All ranks run the same number of forwards, which MoE's
all-to-all requires.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from jobs.data.batch import to_model_batch
from models.objectives.base import IMAGE_COLUMNS


def _same_text(ids_KT: torch.Tensor) -> torch.Tensor:
    """[K, K] bool: caption i and caption j are token-identical."""
    return (ids_KT[:, None, :] == ids_KT[None, :, :]).all(-1)


@torch.no_grad()
def evaluate(model: Any, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, max_batches: int | None = None) -> dict[str, float]:
    """Metrics over `batches` (each of K samples), summed over ranks when distributed."""
    was_training = model.training
    model.eval()
    has_itm = "itm" in getattr(model, "objectives", {})
    sums: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)

    for i, raw in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_model_batch(raw, device, dtype)
        out = model(batch)
        add("batches", 1)
        add("samples", batch["input_ids"].shape[0])
        add("loss", out["loss"].float().item())
        for name, value in out["metrics"].items():
            add(name, value.float().item())
        if has_itm:
            _retrieval(model, batch, add)
    if was_training:
        model.train()
    return _reduce(sums)


def _retrieval(model: Any, batch: dict[str, torch.Tensor], add: Any) -> None:
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    k = ids.shape[0]
    # row i = image i against every caption j; the image's boxes/region features travel with it
    visual = {c: batch[c].repeat_interleave(k, 0) for c in IMAGE_COLUMNS if c in batch and c != "image"}
    scores_KK = model.itm_logits(image.repeat_interleave(k, 0), ids.repeat(k, 1), mask.repeat(k, 1), visual)
    scores_KK = scores_KK.float().view(k, k)
    same_KK = _same_text(ids)
    ranked_i2t = scores_KK.argsort(dim=1, descending=True)
    ranked_t2i = scores_KK.argsort(dim=0, descending=True).T  # row j = images ranked for caption j
    rows = torch.arange(k)
    for r in (1, 5):
        hit_i2t = same_KK[rows[:, None], ranked_i2t[:, :r]].any(1)
        hit_t2i = same_KK[ranked_t2i[:, :r], rows[:, None]].any(1)
        add(f"i2t_r{r}", hit_i2t.sum().item())
        add(f"t2i_r{r}", hit_t2i.sum().item())
    # ITM accuracy on a balanced set: every true pair, and one shifted (mostly mismatched) pair each
    shifted = (rows + 1) % k
    pos_ok = scores_KK[rows, rows] > 0
    neg_label = same_KK[rows, shifted]
    neg_ok = (scores_KK[rows, shifted] > 0) == neg_label
    add("itm_correct", (pos_ok.sum() + neg_ok.sum()).item())
    add("itm_pairs", 2 * k)
    add("retrieval_queries", k)
    add("chance_r1", (same_KK.sum(1).float() / k).sum().item())


def _reduce(sums: dict[str, float]) -> dict[str, float]:
    keys = sorted(sums)
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        sums = dict(zip(keys, t.tolist(), strict=True))
    n = max(sums.get("batches", 0.0), 1.0)
    out: dict[str, float] = {}
    for k in keys:
        if k in ("batches", "samples", "itm_correct", "itm_pairs", "retrieval_queries") or k.startswith(("i2t", "t2i", "chance")):
            continue
        out[k] = sums[k] / n  # per-batch means: loss and the objectives' metrics
    q = sums.get("retrieval_queries", 0.0)
    if q:
        for k in keys:
            if k.startswith(("i2t", "t2i")):
                out[k] = sums[k] / q
        out["chance_r1"] = sums["chance_r1"] / q
        out["itm_acc"] = sums["itm_correct"] / sums["itm_pairs"]
        out["candidates"] = float(round(q / n))
    out["samples"] = sums.get("samples", 0.0)
    return out
