"""Downstream figures in every run's evaluation: zero-shot classification and a linear probe.

Legend: N labelled samples of all ranks, n this rank's, C classes, K prompts per class, E embedding
dim, F feature size, T tokens.

Metrics (the train loop prefixes `eval/`; summary.json's `eval` holds them):
- `zs_<task>_top1_acc`, `zs_<task>_top5_acc` (top-5 only for tasks of more than 5 classes, where it
  is not trivially 1): CLIP zero-shot classification (models/zero_shot.py), for encoders with an ITC
  head; `zs_<task>_chance` = 1 / C.
- `probe_<task>_acc`: a ridge-regression linear probe on frozen image features (one-hot targets,
  closed form: no optimiser, no hyper-parameter search), fitted on the first half of the labelled
  samples and scored on the second half; every encoder has one, so every row of an ablation table does.

Tasks: the shapes world's (shape, color, count) when the held-out samples carry a scene, and the
user tasks of `eval.zero_shot.user` (jobs/transfer/tasks.py). Every rank classifies an equal share of
the samples (the same number of forwards, which MoE's all-to-all needs); counts are summed over
ranks, probe features gathered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jobs import collectives
from jobs.data.batch import to_model_batch
from jobs.transfer.config import ZeroShotConfig
from jobs.transfer.labelled import (
    Arrays,
    Sample,
    batches,
    classification_arrays,
    rank_share,
    read_source,
    size,
)
from jobs.transfer.tasks import SHAPES_TASKS, ClassTask, user_task
from models.heads.features import has_image_features, image_features, image_want
from models.zero_shot import blank_visual, class_embeddings, has_contrastive, topk_correct, zero_shot_logits

PROBE_RIDGE = 1e-2  # ridge strength, relative to the mean squared feature norm (scale-free)


def plan_tasks(zs: ZeroShotConfig, eval_samples: list[Sample]) -> list[tuple[ClassTask, str | None]]:
    """(task, its own source or None = the held-out samples)."""
    has_scene = any((s["meta"].get("scene") or {}).get("objects") for s in eval_samples)
    names = list(SHAPES_TASKS) if zs.tasks == "auto" and has_scene else [] if zs.tasks == "auto" else zs.tasks
    out: list[tuple[ClassTask, str | None]] = [(SHAPES_TASKS[n], None) for n in names]
    out += [(user_task(u.name, u.label_field, u.classes, u.templates), u.source) for u in zs.user]
    return out


def prompt_tokens(task: ClassTask, spec: Any) -> tuple[Tensor, Tensor]:
    """[C, K, T] ids and mask of the task's prompts, tokenized as captions are."""
    from jobs.transfer.labelled import _tokens

    flat = [p for prompts in task.prompts for p in prompts]
    ids, mask = _tokens(flat, spec)
    C, K = len(task.prompts), len(task.prompts[0])
    return torch.from_numpy(ids).view(C, K, -1), torch.from_numpy(mask).view(C, K, -1)


@torch.no_grad()
def _features(encoder: Any, arrays: Arrays, batch_size: int, device: Any, dtype: torch.dtype) -> Tensor:
    want = image_want(encoder)
    feats = [image_features(encoder(to_model_batch(b, device, dtype), want=want)).float()
             for b in batches(arrays, batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, 1, device=device)


def ridge_probe(train_NF: Tensor, train_y: Tensor, test_NF: Tensor, test_y: Tensor, classes: int) -> float:
    """Accuracy of a closed-form ridge regression onto one-hot labels (features standardised on train)."""
    mu, sd = train_NF.mean(0), train_NF.std(0).clamp(min=1e-6)
    x, z = (train_NF - mu) / sd, (test_NF - mu) / sd
    x = torch.cat([x, torch.ones(len(x), 1, device=x.device)], 1).double()
    z = torch.cat([z, torch.ones(len(z), 1, device=z.device)], 1).double()
    y = torch.nn.functional.one_hot(train_y, classes).double()
    lam = PROBE_RIDGE * float((x * x).sum(1).mean())
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype, device=x.device), x.T @ y)
    return float(((z @ w).argmax(1) == test_y).double().mean())


@torch.no_grad()
def transfer_eval(model: Any, zs: ZeroShotConfig, spec: Any, eval_shards: list[str], *, rank: int, world: int,
                  batch_size: int, device: Any, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Zero-shot and probe metrics of `model.encoder` on every planned task (collective: all ranks call it)."""
    encoder = model.encoder
    contrastive = has_contrastive(encoder)
    if zs.max_samples == 0 or not eval_shards or not (contrastive or zs.probe) or not has_image_features(encoder):
        return {}
    was_training = model.training
    model.eval()
    held_out = read_source(eval_shards, spec, zs.max_samples)
    out: dict[str, float] = {}
    counts: dict[str, float | Tensor] = {}
    for task, source in plan_tasks(zs, held_out):
        samples = held_out if source is None else read_source(source, spec, zs.max_samples)
        arrays = classification_arrays(samples, task, spec)
        if size(arrays) < 2 * world:
            continue
        mine = rank_share(arrays, rank, world)
        feats_nF = _features(encoder, mine, batch_size, device, dtype)
        labels_n = torch.from_numpy(mine["label"]).to(device)
        C = len(task.classes)
        if contrastive:
            ids, mask = prompt_tokens(task, spec)
            visual = blank_visual(to_model_batch({k: torch.from_numpy(v[:1]) for k, v in mine.items()}, device, dtype),
                                  ids.shape[0] * ids.shape[1])
            classes_CE = class_embeddings(encoder, ids.to(device), mask.to(device), visual)
            logits_nC = zero_shot_logits(feats_nF, classes_CE)
            counts[f"zs_{task.name}_top1"] = topk_correct(logits_nC, labels_n, 1)
            if C > 5:
                counts[f"zs_{task.name}_top5"] = topk_correct(logits_nC, labels_n, 5)
            counts[f"zs_{task.name}_n"] = float(len(labels_n))
            out[f"zs_{task.name}_chance"] = 1.0 / C
        if zs.probe:
            all_F = collectives.all_gather_rows(feats_nF, device)
            all_y = collectives.all_gather_rows(labels_n, device)
            half = len(all_y) // 2
            out[f"probe_{task.name}_acc"] = ridge_probe(all_F[:half], all_y[:half], all_F[half:], all_y[half:], C)
    sums = collectives.all_reduce_dict(counts, device) if counts else {}
    for key in [k for k in sums if k.endswith("_n")]:
        name = key[:-2]
        for k in ("top1", "top5"):
            if f"{name}_{k}" in sums:
                out[f"{name}_{k}_acc"] = sums[f"{name}_{k}"] / max(sums[key], 1.0)
    if was_training:
        model.train()
    return out


__all__ = ["plan_tasks", "prompt_tokens", "ridge_probe", "transfer_eval"]
