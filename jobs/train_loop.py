"""The per-worker training function that Ray Train runs on every rank.

One step = `grad_accum` micro-batches through the DeepSpeed engine. Every rank takes the same
number of steps (at each epoch's start the ranks agree on its steps: jobs.data.stream), reports
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
from jobs import collectives, storage, watchdog
from jobs.config import RunConfig
from jobs.data.pipeline import PipelineSpec
from jobs.data.steps import synchronized_batches, synchronized_steps
from jobs.data.stream import MixtureStream, RankStream
from jobs.tensor_parallel import Mesh, data_parallel_group
from jobs.trainer import Trainer
from jobs.worker_host import setup_worker_host
from models import metric_keys as mk
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
    data_cpu_limit: float | None = None  # logical CPUs this rank's Ray Data executor may use; None = no limit
    ledger: Any = None  # the bad-sample ledger actor
    events: Any = None  # the run's hub actor (orchestrator/run/hub.py): a hang is told there before the rank fails
    grounded_words: tuple[str, ...] = ()  # the dataset's grounded words (jobs.evaluate's MLM probe)


def _bad_data(ledger: Any, cfg: RunConfig) -> dict[str, float]:
    """Rank 0: the ledger's counts as metrics; raises DataBudgetExceeded past the budget."""
    import ray

    from jobs.data.ledger import check_budget, over_budget

    totals = ray.get(ledger.counts.remote())  # running counts: O(reasons), no key lists shipped
    if over_budget(totals, cfg.data.max_bad_fraction):
        check_budget(ray.get(ledger.totals.remote()), cfg.data.max_bad_fraction)  # names the worst shards
    out = {"data/bad_samples": float(totals["bad"]), "data/bad_fraction": totals["fraction"]}
    out |= {f"data/bad/{reason}": float(n) for reason, n in totals["by_reason"].items()}
    return out


def _limit_data_cpus(cpus: float) -> None:
    """Size this rank's Ray Data executor to its share of the data CPUs.

    Every rank runs its own pipeline, and each executor would otherwise budget for every CPU of the
    cluster: W executors launching tasks for W times the CPUs there are, queueing in Ray's scheduler
    and bursting onto the cores the training processes use. Set on the process's DataContext, which
    every dataset built afterwards copies.
    """
    import ray.data
    from ray.data import ExecutionResources

    ray.data.DataContext.get_current().execution_options.resource_limits = ExecutionResources.for_limits(cpu=cpus)


def train_func(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    _quiet_third_party_logs()
    job: WorkerJob = config["job"]
    cfg = RunConfig.model_validate(job.run)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_worker_host(cfg.scaling.cpus_per_worker, cfg.scaling.host_memory)
    if cfg.train.hang_timeout_s:
        watchdog.install(watchdog.Watchdog(cfg.train.hang_timeout_s, rank, notify=_notifier(job.events, rank)))
    try:
        _train(job, cfg, rank, world)
    finally:
        watchdog.install(None)


def _notifier(events: Any, rank: int) -> Any:
    import ray

    def notify(message: str) -> None:
        if events is not None:
            ray.get(events.put.remote({"event": "hang", "rank": rank, "message": message}), timeout=5)

    return notify


def _train(job: WorkerJob, cfg: RunConfig, rank: int, world: int) -> None:
    import ray
    import ray.train

    text = TextSpec(**job.text)
    image = ImageSpec(size=cfg.data.image_size)
    spec, ledger = job.pipeline, job.ledger

    from jobs.engine import build_engine, diversify_experts
    from jobs.evaluate import evaluate, grounded_token_ids
    from jobs.memory import watch_gradients
    from jobs.transfer.zero_shot import transfer_eval
    from models import build_pretrainer
    from models.adversarial import EmbeddingPerturbation
    from models.recompute import set_activation_checkpointing

    pin = cfg.scaling.use_gpu  # pinned host batches: asynchronous copies to the GPU
    if job.data_cpu_limit is not None:
        _limit_data_cpus(job.data_cpu_limit)
    # Data (streams, RNG draws, metrics, evaluation) goes by the data-parallel rank: the ranks of one
    # tensor-parallel group compute the same samples (jobs/tensor_parallel.py).
    mesh = Mesh(rank, world, cfg.parallel.tp_size)
    sources = [RankStream(shards, spec, batch_size=cfg.train.batch_size, rank=mesh.dp_rank, world=mesh.dp,
                          seed=cfg.data.shuffle_seed, ledger=ledger, prefetch_batches=cfg.data.prefetch_batches,
                          read_tasks=cfg.data.read_tasks, ray_remote_args=job.data_remote_args, pin_memory=pin,
                          unit_samples=cfg.data.unit_samples, next_epoch_ahead=cfg.data.next_epoch_ahead)
               for shards in job.train_sources]
    stream: RankStream | MixtureStream = (sources[0] if len(sources) == 1 else MixtureStream(
        sources, job.train_weights, seed=cfg.data.shuffle_seed, rank=mesh.dp_rank))

    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    with resumed.as_directory() if resumed is not None else contextlib.nullcontext() as folder:
        saved = None if folder is None else ckpt.read(folder, rank, world)
        if saved is not None:  # the data position and the ledger first: the pipeline starts from them
            state = saved.state
            if saved.data_position is not None:
                stream.load(saved.data_position)
            elif saved.world_positions is not None:  # another number of ranks: deal their epoch's rest
                stream.regroup(saved.world_positions, cfg.train.grad_accum)
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
        collectives.use_group(data_parallel_group(mesh))
        # Masking and negative sampling draw from the global RNG: a different stream per data-parallel rank.
        torch.manual_seed(cfg.train.seed * 1000 + mesh.dp_rank + 1)
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
        per_rank = -(-cfg.eval.max_samples // mesh.dp)
        eval_stream = RankStream(job.eval_shards, spec, batch_size=cfg.eval.batch_size, rank=mesh.dp_rank, world=mesh.dp,
                                 seed=None, limit=per_rank, ray_remote_args=job.data_remote_args, pin_memory=pin,
                                 unit_samples=cfg.data.unit_samples, next_epoch_ahead=False)
        batches = synchronized_batches(eval_stream, device)  # closes its pipeline when done
        grounded = grounded_token_ids(spec.tokenizer_uri, job.grounded_words, spec.storage)  # MLM on grounded words
        from jobs.generative.probe import caption_decoder  # DALL-E: captions judged against generated images

        per_rank_gen = -(-cfg.eval.generate_samples // mesh.dp)
        out = evaluate(engine.module, batches, device=device, dtype=trainer.dtype, grounded_ids=grounded,
                       generate_samples=per_rank_gen, captions=caption_decoder(spec.tokenizer_uri, spec.storage))
        # downstream: zero-shot classification (ITC encoders) and a linear probe (jobs/transfer/zero_shot.py)
        out |= transfer_eval(engine.module, cfg.eval.zero_shot, spec, job.eval_shards, rank=mesh.dp_rank,
                             world=mesh.dp, batch_size=cfg.eval.batch_size, device=device, dtype=trainer.dtype)
        return mk.keyed(mk.EVAL, out)

    try:
        while state.step < cfg.train.steps:
            t_wait = time.perf_counter()
            micro = next(steps)
            with watchdog.waiting("the training step's collectives (DeepSpeed's gradient all-reduce)",
                                  watchdog.STARTUP_ALLOWANCE if trainer.memory is None else watchdog.COLLECTIVE_ALLOWANCE):
                trainer.train_step(micro, wait_s=time.perf_counter() - t_wait)
            if cfg.data.record_samples and mesh.tp_rank == 0:
                sample_ids[state.step] = [int(i) for raw in micro for i in raw["sample_id"]]

            final = state.step == cfg.train.steps
            do_ckpt = final or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0)
            do_eval = final or (cfg.eval.every and state.step % cfg.eval.every == 0)
            if not (do_ckpt or do_eval or state.step % cfg.train.log_every == 0):
                continue

            with watchdog.waiting("the report's metrics all-reduce", watchdog.COLLECTIVE_ALLOWANCE):
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
                ckpt.report(metrics, engine, state, rank, stream.state(),
                            background=cfg.train.checkpoint_upload == "background")
                last_ckpt_step = state.step
            else:
                with watchdog.waiting("ray.train.report (a barrier of all ranks)", watchdog.COLLECTIVE_ALLOWANCE):
                    ray.train.report(metrics)
    finally:  # the pipelines (and their threads) of this run end with it, also on a failure
        steps.close()
        stream.close()
