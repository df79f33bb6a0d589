"""The per-worker training function that Ray Train runs on every rank.

One step = `grad_accum` micro-batches through the DeepSpeed engine. Every rank takes the same
number of steps (before each step the ranks agree that all have data: jobs.data.stream), reports
at the same steps (Ray Train's report is a barrier) and checkpoints at the same steps (DeepSpeed's
save is collective). Each rank streams its own deterministic part of the shards, and its position
in it is part of every checkpoint.

Reports carry every loss term, throughput (samples/s, tokens/s), the mean step time and the share
of it spent waiting for data, all averaged over ranks (wait: max over ranks, the straggler is
what stalls a synchronous step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs import checkpoint as ckpt
from jobs import storage
from jobs.config import RunConfig
from jobs.data.pipeline import PipelineSpec
from jobs.data.stream import MixtureStream, RankStream, synchronized_batches, synchronized_steps
from jobs.trainer import Trainer
from models.config import ImageSpec, TextSpec


def _quiet_third_party_logs() -> None:
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class WorkerJob:
    """What the driver hands every Ray Train worker (`train_loop_config={"job": WorkerJob(...)}`)."""

    run: dict[str, Any]  # RunConfig.to_dict(): validated again on the worker
    text: dict[str, Any]  # TextSpec fields
    pipeline: PipelineSpec
    train_sources: list[list[str]]  # shards of each source (one unless data.train is a mixture)
    train_weights: list[float]
    eval_shards: list[str]
    run_dir: str
    data_remote_args: dict[str, Any] = field(default_factory=dict)  # where the Ray Data tasks run
    ledger: Any = None  # the bad-sample ledger actor
    crash_while_writing: Any = None  # tests only: jobs.checkpoint.CrashWhileWriting


def _bad_data(ledger: Any, cfg: RunConfig) -> dict[str, float]:
    """Rank 0: the ledger's counts as metrics; raises DataBudgetExceeded past the budget."""
    import ray

    from jobs.data.ledger import check_budget

    totals = ray.get(ledger.totals.remote())
    check_budget(totals, cfg.data.max_bad_fraction)
    out = {"data/bad_samples": float(totals["bad"]), "data/bad_fraction": totals["fraction"]}
    out |= {f"data/bad/{reason}": float(n) for reason, n in totals["by_reason"].items()}
    return out


def train_func(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    _quiet_third_party_logs()
    job: WorkerJob = config["job"]
    cfg = RunConfig.model_validate(job.run)
    text = TextSpec(**job.text)
    image = ImageSpec(size=cfg.data.image_size)
    spec, ledger = job.pipeline, job.ledger
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    from jobs.engine import build_engine, diversify_experts
    from jobs.evaluate import evaluate, grounded_token_ids
    from jobs.memory import watch_gradients
    from jobs.transfer.zero_shot import transfer_eval
    from models import build_pretrainer
    from models.adversarial import EmbeddingPerturbation
    from models.recompute import set_activation_checkpointing

    pin = cfg.scaling.use_gpu  # pinned host batches: asynchronous copies to the GPU
    sources = [RankStream(shards, spec, batch_size=cfg.train.batch_size, rank=rank, world=world,
                          seed=cfg.data.shuffle_seed, ledger=ledger, prefetch_batches=cfg.data.prefetch_batches,
                          read_tasks=cfg.data.read_tasks, ray_remote_args=job.data_remote_args, pin_memory=pin)
               for shards in job.train_sources]
    stream: RankStream | MixtureStream = (sources[0] if len(sources) == 1 else MixtureStream(
        sources, job.train_weights, seed=cfg.data.shuffle_seed, rank=rank))

    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    with resumed.as_directory() if resumed is not None else contextlib.nullcontext() as folder:
        saved = None if folder is None else ckpt.read(folder, rank, world)
        if saved is not None:  # the data position and the ledger first: the pipeline starts from them
            state = saved.state
            if saved.data_position is not None:
                stream.load(saved.data_position)
            if rank == 0 and ledger is not None and "ledger" in state.extra:
                ray.get(ledger.load.remote(state.extra["ledger"]))
        if isinstance(stream, RankStream):
            stream.start_early()  # the first batch is read while DeepSpeed initialises

        # Same seed on every rank: identical dense init (DeepSpeed broadcasts rank 0's anyway).
        torch.manual_seed(cfg.train.seed)
        model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, text, image)
        set_activation_checkpointing(model, cfg.train.activation_checkpointing)
        if cfg.moe.enabled:
            diversify_experts(model, cfg.train.seed, ep_rank=rank % cfg.moe.ep_size)
        engine = build_engine(cfg, model)
        # Masking and negative sampling draw from the global RNG: a different stream per rank.
        torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
        if saved is not None:  # model, optimizer, schedule and this rank's RNG
            ckpt.restore(engine, folder, saved)
    watch_gradients(engine)  # per-rank model-state bytes, reported once with the first report
    adv = cfg.train.adversarial
    perturb = EmbeddingPerturbation(model.encoder, adv.modalities, adv.init_mag) if adv.enabled else None
    visual_tokens = getattr(engine.module, "num_visual_tokens", image.size**2 // cfg.model.patch_size**2)
    trainer = Trainer(cfg, engine, visual_tokens=visual_tokens, state=state, perturb=perturb)
    device = trainer.device
    steps = synchronized_steps(stream, cfg.train.grad_accum, device)
    sample_ids: dict[int, list[int]] = {}  # step -> ids (data.record_samples), written at each report
    last_ckpt_step = state.step if resumed is not None else -1

    def run_eval() -> dict[str, float]:
        if not job.eval_shards:
            return {}
        per_rank = -(-cfg.eval.max_samples // world)
        eval_stream = RankStream(job.eval_shards, spec, batch_size=cfg.eval.batch_size, rank=rank, world=world,
                                 seed=None, limit=per_rank, ray_remote_args=job.data_remote_args, pin_memory=pin)
        batches = synchronized_batches(eval_stream, device)
        grounded = grounded_token_ids(spec.tokenizer_uri, spec.storage)  # MLM accuracy on grounded words
        out = evaluate(engine.module, batches, device=device, dtype=trainer.dtype, grounded_ids=grounded)
        # downstream: zero-shot classification (ITC encoders) and a linear probe (jobs/transfer/zero_shot.py)
        out |= transfer_eval(engine.module, cfg.eval.zero_shot, spec, job.eval_shards, rank=rank, world=world,
                             batch_size=cfg.eval.batch_size, device=device, dtype=trainer.dtype)
        return {f"eval/{k}": v for k, v in out.items()}

    while state.step < cfg.train.steps:
        t_wait = time.perf_counter()
        micro = next(steps)
        trainer.train_step(micro, wait_s=time.perf_counter() - t_wait)
        if cfg.data.record_samples:
            sample_ids[state.step] = [int(i) for raw in micro for i in raw["sample_id"]]

        final = state.step == cfg.train.steps
        do_ckpt = final or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0)
        do_eval = final or (cfg.eval.every and state.step % cfg.eval.every == 0)
        if not (do_ckpt or do_eval or state.step % cfg.train.log_every == 0):
            continue

        metrics = trainer.report()
        metrics["epoch"] = stream.epoch_number
        if rank == 0 and ledger is not None:
            metrics |= _bad_data(ledger, cfg)
        if sample_ids:
            first = min(sample_ids)
            storage.write_text(storage.join(job.run_dir, "samples", f"rank{rank}_{first:07d}.json"),
                               json.dumps(sample_ids), spec.storage)
            sample_ids = {}
        if do_eval:
            metrics |= run_eval()
        if do_ckpt and state.step != last_ckpt_step:
            if rank == 0 and ledger is not None:
                state.extra["ledger"] = ray.get(ledger.state.remote())
            state.extra["world"] = world
            with ckpt.staged(engine, state, rank, stream.state(), job.crash_while_writing) as folder:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=ckpt.dir_name(state.step))
            last_ckpt_step = state.step
        else:
            ray.train.report(metrics)
