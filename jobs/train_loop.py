"""The per-worker training function that Ray Train runs on every rank.

One step = `grad_accum` micro-batches through the DeepSpeed engine. Every rank takes the same
number of steps (the pipeline's equal split + drop_last), reports at the same steps (Ray Train's
report is a barrier) and checkpoints at the same steps (DeepSpeed's save is collective).

Reports carry every loss term, throughput (samples/s, tokens/s), the mean step time and the share
of it spent waiting for data, all averaged over ranks (wait: max over ranks, the straggler is
what stalls a synchronous step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from jobs import checkpoint as ckpt
from jobs.config import RunConfig
from jobs.data.batch import to_model_batch
from models.config import ImageSpec, TextSpec


class _Window:
    """Running sums between two reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.wait = 0.0
        self.losses: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    def add(self, out: dict[str, Any], micro_batches: int) -> None:
        for name, v in out["losses"].items():
            self.losses[name] = self.losses.get(name, 0.0) + float(v) / micro_batches
        self.losses["total"] = self.losses.get("total", 0.0) + out["loss"].item() / micro_batches
        for name, v in out["metrics"].items():
            self.metrics[name] = self.metrics.get(name, 0.0) + float(v) / micro_batches


def _quiet_third_party_logs() -> None:
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _epochs(shard: Any, cfg: RunConfig, start_epoch: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(epoch, index in epoch, batch) forever; each epoch reshuffles with its own seed."""
    epoch = start_epoch
    while True:
        seed = None if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed + epoch
        it = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=None if seed is None else 4 * cfg.train.batch_size,
            local_shuffle_seed=seed,
        )
        n = -1
        for n, batch in enumerate(it):
            yield epoch, n, batch
        if n < 0:
            raise RuntimeError("the training split delivered no full batch: fewer samples per worker than "
                               f"train.batch_size={cfg.train.batch_size}")
        epoch += 1


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist(), strict=True)}


def _all_max(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def train_func(config: dict[str, Any]) -> None:
    import ray.train

    _quiet_third_party_logs()
    cfg = RunConfig.model_validate(config["run"])
    text = TextSpec(**config["text"])
    image = ImageSpec(size=cfg.data.image_size)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    from jobs.engine import build_engine, diversify_experts
    from jobs.evaluate import evaluate
    from models import build_pretrainer

    # Same seed on every rank: identical dense init (DeepSpeed broadcasts rank 0's anyway).
    torch.manual_seed(cfg.train.seed)
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, text, image)
    if cfg.moe.enabled:
        diversify_experts(model, cfg.train.seed, ep_rank=rank % cfg.moe.ep_size)
    engine = build_engine(cfg, model)
    device = engine.device
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    # Masking and negative sampling draw from the global RNG: a different stream per rank.
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)

    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            state = ckpt.restore(engine, folder, rank)

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if config.get("has_eval") else None
    batches = _epochs(train_shard, cfg, state.epoch)
    gas = cfg.train.grad_accum
    window = _Window()
    last_ckpt_step = state.step if resumed is not None else -1

    def run_eval() -> dict[str, float]:
        if eval_shard is None:
            return {}
        it = eval_shard.iter_torch_batches(batch_size=cfg.eval.batch_size, drop_last=True)
        return {f"eval/{k}": v for k, v in evaluate(engine.module, it, device=device, dtype=dtype).items()}

    while state.step < cfg.train.steps:
        step_samples = 0
        for _ in range(gas):
            t_wait = time.perf_counter()
            epoch, index, raw = next(batches)
            window.wait += time.perf_counter() - t_wait
            if epoch != state.epoch:
                state.epoch, state.batches_in_epoch = epoch, 0
            state.batches_in_epoch = index + 1
            batch = to_model_batch(raw, device, dtype)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            window.add(out, gas)
            n = batch["input_ids"].shape[0]
            step_samples += n
            window.samples += n
            window.tokens += int(batch["attention_mask"].sum()) + n * image.size**2 // cfg.model.patch_size**2
        state.step += 1
        state.samples_seen += step_samples * world
        window.steps += 1

        final = state.step == cfg.train.steps
        do_ckpt = final or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0)
        do_eval = final or (cfg.eval.every and state.step % cfg.eval.every == 0)
        if not (do_ckpt or do_eval or state.step % cfg.train.log_every == 0):
            continue

        elapsed = time.perf_counter() - window.t0
        local = {f"loss/{k}": v / window.steps for k, v in window.losses.items()}
        local |= {f"train/{k}": v / window.steps for k, v in window.metrics.items()}
        local["data_wait_s"] = window.wait / window.steps
        metrics = _all_mean(local, world)
        wait_share = _all_max(window.wait / elapsed, world)
        metrics |= {
            "step": state.step,
            "epoch": state.epoch,
            "lr": engine.get_lr()[0],
            "samples_per_s": window.samples * world / elapsed,
            "tokens_per_s": window.tokens * world / elapsed,
            "step_time_s": elapsed / window.steps,
            "data_wait_share": wait_share,
            "samples_seen": state.samples_seen,
        }
        if do_eval:
            metrics |= run_eval()
        if do_ckpt and state.step != last_ckpt_step:
            with ckpt.staged(engine, state, rank) as folder:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=ckpt.dir_name(state.step))
            last_ckpt_step = state.step
        else:
            ray.train.report(metrics)
        window.reset()
