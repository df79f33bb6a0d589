"""The DeepSpeed engine of one Ray Train worker: config dict, optimizer groups, LR schedule.

DeepSpeed is imported inside functions: importing it at module level costs seconds in every Ray
process that merely unpickles this module, and its accelerator detection must see the
DS_ACCELERATOR the worker sets first.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from jobs.config import RunConfig


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run (https://www.deepspeed.ai/docs/config-json/)."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.deepspeed.zero_stage == 3:
        # Gather parameters as they are needed rather than prefetching large buckets: the models
        # here are small per layer, and prefetch buckets sized for GPUs only cost memory on CPU.
        zero["stage3_prefetch_bucket_size"] = 0
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # the optimizer is torch's AdamW built below: DeepSpeed's fused Adam needs a CUDA build
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.tp_size > 1:  # Megatron's split of every layer on DeepSpeed's AutoTP
        from jobs.tensor_parallel import deepspeed_section

        ds["tensor_parallel"] = deepspeed_section(cfg.parallel.tp_size)
    return _merge(ds, cfg.deepspeed.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(cfg: RunConfig):  # noqa: ANN201 - Callable[[int], float]
    """Linear warmup then cosine decay to `min_lr_ratio`, as a multiplier of the peak LR."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def diversify_experts(model: nn.Module, seed: int, ep_rank: int) -> int:
    """Re-initialise expert weights from a seed that depends on the expert-parallel rank.

    Every rank builds the model from the same seed, so without this expert i on rank 0 and expert
    i on rank 1 would start identical. Ranks that hold the same experts (same ep_rank in different
    expert-parallel groups) get the same values, which DeepSpeed then broadcasts anyway.
    Returns the number of tensors re-initialised.
    """
    gen = torch.Generator().manual_seed(seed * 7919 + 1 + ep_rank)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if getattr(p, "allreduce", True) is False:  # DeepSpeed's mark on expert parameters
                per_expert_ndim = p.ndim - 1 if getattr(p, "stacked_experts", False) else p.ndim
                if per_expert_ndim >= 2:
                    nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=gen)
                else:
                    p.zero_()
                n += 1
    return n


def build_engine(cfg: RunConfig, model: nn.Module):  # noqa: ANN201 - deepspeed.DeepSpeedEngine
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from models.deepspeed_import import import_deepspeed

    deepspeed = import_deepspeed()
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    # model.init: pretrained unimodal weights, before DeepSpeed wraps (and ZeRO-3 partitions) the model
    from jobs.generative.frozen_dvae import load_frozen_dvae
    from jobs.pretrained.load import load_pretrained
    from jobs.storage import StorageOptions

    opts = StorageOptions.of(cfg.storage)
    load_pretrained(model, cfg.model, opts)
    load_frozen_dvae(model, cfg.model, opts)  # preset dalle: the dVAE run's weights, frozen
    groups = param_groups(model, cfg.train.weight_decay)
    if cfg.moe.enabled:
        # Expert parameters must sit in their own groups so ZeRO reduces them over the
        # expert-data-parallel group only, never over the ranks that hold other experts.
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)
    schedule = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg),
        # a callable, so the schedule drives the optimizer DeepSpeed wraps (ZeRO's), not the raw one
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        dist_init_required=False,
    )
    if cfg.parallel.tp_size > 1:
        from jobs.tensor_parallel import install_batch_check

        install_batch_check(engine)
    return engine
