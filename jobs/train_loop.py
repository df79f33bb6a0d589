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
from typing import Any

import torch
import torch.distributed as dist

from jobs import checkpoint as ckpt
from jobs import storage
from jobs.config import RunConfig
from jobs.data.batch import to_model_batch
from jobs.data.pipeline import PipelineSpec
from jobs.data.stream import MixtureStream, RankStream, synchronized_batches, synchronized_steps
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
        self.sample_ids: dict[int, list[int]] = {}  # step -> ids (data.record_samples)

    def add(self, out: dict[str, Any], micro_batches: int) -> None:
        for name, v in out["losses"].items():
            self.losses[name] = self.losses.get(name, 0.0) + float(v) / micro_batches
        self.losses["total"] = self.losses.get("total", 0.0) + out["loss"].item() / micro_batches
        for name, v in out["metrics"].items():
            self.metrics[name] = self.metrics.get(name, 0.0) + float(v) / micro_batches


def _quiet_third_party_logs() -> None:
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist(), strict=True)}


def _flatten_lists(values: dict[str, Any]) -> dict[str, float]:
    """{"k": [a, b]} -> {"k[0]": a, "k[1]": b}, so per-expert loads can be all-reduced as floats."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, list):
            out |= {f"{k}[{j}]": float(x) for j, x in enumerate(v)}
        else:
            out[k] = float(v)
    return out


def _regroup_lists(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k.endswith("]") and "[" in k:
            name, idx = k[:-1].rsplit("[", 1)
            out.setdefault(name, []).append((int(idx), v))
        else:
            out[k] = v
    return {k: [x for _, x in sorted(v)] if isinstance(v, list) else v for k, v in out.items()}


def _all_max(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


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
    cfg = RunConfig.model_validate(config["run"])
    text = TextSpec(**config["text"])
    image = ImageSpec(size=cfg.data.image_size)
    spec: PipelineSpec = config["pipeline"]
    ledger = config.get("ledger")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    from jobs.engine import build_engine, diversify_experts
    from jobs.evaluate import evaluate, grounded_token_ids
    from jobs.memory import measure_model_states, watch_gradients
    from models import build_pretrainer
    from models.adversarial import EmbeddingPerturbation, adversarial_forward
    from models.moe import collect_stats
    from models.recompute import set_activation_checkpointing

    remote_args = config.get("data_remote_args")
    sources = [RankStream(shards, spec, batch_size=cfg.train.batch_size, rank=rank, world=world,
                          seed=cfg.data.shuffle_seed, ledger=ledger, prefetch_batches=cfg.data.prefetch_batches,
                          read_tasks=cfg.data.read_tasks, ray_remote_args=remote_args)
               for shards in config["train_sources"]]
    stream: RankStream | MixtureStream = (sources[0] if len(sources) == 1 else MixtureStream(
        sources, config["train_weights"], seed=cfg.data.shuffle_seed, rank=rank))

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
    memory: dict[str, int] | None = None
    adv = cfg.train.adversarial
    perturb = EmbeddingPerturbation(model.encoder, adv.modalities, adv.init_mag) if adv.enabled else None
    device = engine.device
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    steps = synchronized_steps(stream, cfg.train.grad_accum, world)
    gas = cfg.train.grad_accum
    visual_tokens = getattr(engine.module, "num_visual_tokens", image.size**2 // cfg.model.patch_size**2)
    window = _Window()
    last_ckpt_step = state.step if resumed is not None else -1

    def run_eval() -> dict[str, float]:
        if not config.get("eval_shards"):
            return {}
        per_rank = -(-cfg.eval.max_samples // world)
        eval_stream = RankStream(config["eval_shards"], spec, batch_size=cfg.eval.batch_size, rank=rank,
                                 world=world, seed=None, limit=per_rank, ray_remote_args=remote_args)
        batches = synchronized_batches(eval_stream, world)
        grounded = grounded_token_ids(spec.tokenizer_uri, spec.storage)  # MLM accuracy on grounded words
        return {f"eval/{k}": v for k, v in evaluate(engine.module, batches, device=device, dtype=dtype,
                                                     grounded_ids=grounded).items()}

    while state.step < cfg.train.steps:
        step_samples = 0
        t_wait = time.perf_counter()
        micro = next(steps)
        window.wait += time.perf_counter() - t_wait
        for raw in micro:
            batch = to_model_batch(raw, device, dtype)
            if perturb is None:
                out = engine(batch)
            else:
                out = adversarial_forward(lambda b=batch: engine(b), perturb, adv, device)
            engine.backward(out["loss"])
            engine.step()
            window.add(out, gas)
            n = batch["input_ids"].shape[0]
            step_samples += n
            window.samples += n
            window.tokens += int(batch["attention_mask"].sum()) + n * visual_tokens
        state.step += 1
        state.samples_seen += step_samples * world
        if memory is None:
            memory = measure_model_states(engine)
        if cfg.data.record_samples:
            window.sample_ids[state.step] = [int(i) for raw in micro for i in raw["sample_id"]]
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
        if cfg.moe.enabled:  # per-layer expert load, drops, router losses, averaged over the window
            local |= _flatten_lists(collect_stats(engine.module))
        metrics = _regroup_lists(_all_mean(local, world))
        wait_share = _all_max(window.wait / elapsed, world)
        metrics |= {
            "step": state.step,
            "epoch": sources[0].position.epoch,
            "lr": engine.get_lr()[0],
            "samples_per_s": window.samples * world / elapsed,
            "tokens_per_s": window.tokens * world / elapsed,
            "step_time_s": elapsed / window.steps,
            "data_wait_share": wait_share,
            "samples_seen": state.samples_seen,
        }
        if rank == 0 and ledger is not None:
            metrics |= _bad_data(ledger, cfg)
        if memory:  # this rank's bytes (ranks differ only by padding): rank 0's reach the driver
            metrics |= {k: float(v) for k, v in memory.items()}
            memory = {}
        if window.sample_ids:
            first = min(window.sample_ids)
            storage.write_text(storage.join(config["run_dir"], "samples", f"rank{rank}_{first:07d}.json"),
                               json.dumps(window.sample_ids), spec.storage)
        if do_eval:
            metrics |= run_eval()
        if do_ckpt and state.step != last_ckpt_step:
            if rank == 0 and ledger is not None:
                state.extra["ledger"] = ray.get(ledger.state.remote())
            state.extra["world"] = world
            with ckpt.staged(engine, state, rank, stream.state(), config.get("crash_while_writing")) as folder:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=ckpt.dir_name(state.step))
            last_ckpt_step = state.step
        else:
            ray.train.report(metrics)
        window.reset()
