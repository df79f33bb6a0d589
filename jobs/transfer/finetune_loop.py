"""The per-worker fine-tuning function Ray Train runs on every rank (`finetune:` in the run config).

The pretraining loop's machinery with a labelled task instead of pretraining objectives: the same
DeepSpeed engine (jobs/engine.py), Trainer (jobs/trainer.py: steps, reports averaged over ranks),
checkpoints (jobs/checkpoint.py: model, optimizer, schedule, RNG, data position) and reports
through Ray Train. The model is models/finetuner.py's: the pretrained run's encoder (weights from
its latest checkpoint, or a fresh init of the same architecture for `init: scratch`) and the task's
head. Data are in memory (jobs/transfer/labelled.py): train = a seeded subset of `finetune.labels`
examples of data.train, val = held out of data.train, test = data.eval.

Seeds: `train.seed` draws the head's init (and a scratch encoder's), the epoch order of the training
examples and, unless `finetune.subset_seed` is set, which examples the label budget keeps.

Metrics (`eval/` at eval steps and the last): `{val,test}_score` = the task's figure (accuracy for
classification and VQA, the mean of i2t/t2i R@1 over the whole split for retrieval), `{val,test}_acc`
(classification, VQA), `test_acc_<question type>` (VQA), `{val,test}_{i2t,t2i}_r1` (retrieval),
`train_examples` (the labelled examples used, all ranks).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import torch

from jobs import checkpoint as ckpt
from jobs import collectives, storage
from jobs.config import RunConfig
from jobs.data.batch import to_model_batch
from jobs.transfer import labelled as lab
from jobs.worker_host import setup_worker_host
from models import metric_keys as mk
from models.config import ImageSpec, TextSpec

INIT_FILE = "pretrained_encoder.pt"  # the from-run's encoder weights, written by the driver


@dataclass
class Splits:
    train: lab.Arrays
    val: lab.Arrays
    test: lab.Arrays
    classes: int


def task_arrays(cfg: RunConfig, spec: Any, samples: list[lab.Sample]) -> lab.Arrays:
    from jobs.transfer.tasks import SHAPES_TASKS, user_task

    ft = cfg.finetune
    assert ft is not None
    if ft.task == "vqa":
        return lab.vqa_arrays(samples, spec)
    if ft.task == "retrieval":
        return lab.retrieval_arrays(samples, spec)
    task = SHAPES_TASKS.get(ft.task) or user_task(ft.user.name, ft.user.label_field, ft.user.classes,  # type: ignore[union-attr]
                                                   ft.user.templates)  # type: ignore[union-attr]
    return lab.classification_arrays(samples, task, spec)


def num_classes(cfg: RunConfig) -> int:
    from jobs.transfer.tasks import ANSWERS, SHAPES_TASKS

    ft = cfg.finetune
    assert ft is not None
    if ft.task == "vqa":
        return len(ANSWERS)
    if ft.task == "retrieval":
        return 0
    return len(SHAPES_TASKS[ft.task].classes) if ft.task in SHAPES_TASKS else len(ft.user.classes)  # type: ignore[union-attr]


def load_splits(cfg: RunConfig, spec: Any, train_shards: list[str], eval_shards: list[str]) -> Splits:
    """train (the label budget's subset), val and test arrays of the task; the same on every rank."""
    ft = cfg.finetune
    assert ft is not None
    source = ft.user.source if ft.user is not None and ft.user.source else None
    pool_limit = None if ft.pool is None else ft.pool + ft.val_samples
    if source is not None and lab.is_image_folder(source):  # one folder: test = its last eval.max_samples
        everything = lab.read_source(source, spec)
        cut = max(0, len(everything) - cfg.eval.max_samples)
        pool, test = everything[:cut], everything[cut:]
    else:
        pool = lab.read_source(source or train_shards, spec, pool_limit)
        test = lab.read_source(eval_shards, spec, cfg.eval.max_samples) if eval_shards else []
    cut = max(0, len(pool) - ft.val_samples)
    train = task_arrays(cfg, spec, pool[:cut])
    seed = ft.subset_seed if ft.subset_seed is not None else cfg.train.seed
    return Splits(train=lab.subset(train, ft.labels, seed), val=task_arrays(cfg, spec, pool[cut:]),
                  test=task_arrays(cfg, spec, test), classes=num_classes(cfg))


def load_encoder_state(run_dir: str, options: Any) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(storage.join(run_dir, INIT_FILE), options)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@torch.no_grad()
def evaluate_split(model: Any, arrays: lab.Arrays, prefix: str, batch_size: int, device: Any,
                   dtype: torch.dtype) -> dict[str, float]:
    """The split's figures over all ranks (collective; `arrays` is this rank's equal share)."""
    from models.heads.retrieval import recall_at_1

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    if model.head.__class__.__name__ == "RetrievalHead":
        embeds = [model.encoder(to_model_batch(b, device, dtype), want=model.head.want) for b in lab.batches(arrays, batch_size)]
        image = collectives.all_gather_rows(torch.cat([e["image_embed"].float() for e in embeds]), device)
        text = collectives.all_gather_rows(torch.cat([e["text_embed"].float() for e in embeds]), device)
        ids = collectives.all_gather_rows(torch.from_numpy(arrays["input_ids"]).to(device), device)
        i2t, t2i = recall_at_1(image, text, ids)
        n = max(len(ids), 1)
        out |= {f"{prefix}_i2t_r1": float(i2t) / n, f"{prefix}_t2i_r1": float(t2i) / n}
        out[f"{prefix}_score"] = (out[f"{prefix}_i2t_r1"] + out[f"{prefix}_t2i_r1"]) / 2
    else:
        sums: dict[str, Any] = {"n": 0.0, "correct": 0.0}
        for b in lab.batches(arrays, batch_size):
            batch = to_model_batch(b, device, dtype)
            hit_B = model.scores(batch).argmax(-1) == batch["label"]
            sums["n"] += float(len(hit_B))
            sums["correct"] = sums["correct"] + hit_B.sum()
            if "qtype" in batch:
                from jobs.transfer.tasks import QUESTION_TYPES

                for q, name in enumerate(QUESTION_TYPES):
                    mine = batch["qtype"] == q
                    sums[f"n_{name}"] = sums.get(f"n_{name}", 0.0) + mine.sum()
                    sums[f"c_{name}"] = sums.get(f"c_{name}", 0.0) + (hit_B & mine).sum()
        if "qtype" in arrays:  # every rank the same keys, even with no batch
            from jobs.transfer.tasks import QUESTION_TYPES

            for name in QUESTION_TYPES:
                sums.setdefault(f"n_{name}", 0.0)
                sums.setdefault(f"c_{name}", 0.0)
        total = collectives.all_reduce_dict(sums, device)
        out[f"{prefix}_acc"] = out[f"{prefix}_score"] = total["correct"] / max(total["n"], 1.0)
        for key in [k for k in total if k.startswith("n_") and total[k] > 0]:
            out[f"{prefix}_acc_{key[2:]}"] = total[f"c_{key[2:]}"] / total[key]
    if was_training:
        model.train()
    return out


def finetune_func(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    from jobs.engine import build_engine
    from jobs.train_loop import WorkerJob, _quiet_third_party_logs
    from jobs.trainer import Trainer
    from models.blocks import resolve
    from models.factory import visual_tokens
    from models.finetuner import build_finetuner

    _quiet_third_party_logs()
    job: WorkerJob = config["job"]
    cfg = RunConfig.model_validate(job.run)
    ft = cfg.finetune
    assert ft is not None
    text = TextSpec(**job.text)
    image = ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_worker_host(cfg.scaling.cpus_per_worker, cfg.scaling.host_memory)
    spec = job.pipeline
    splits = load_splits(cfg, spec, [s for src in job.train_sources for s in src], job.eval_shards)
    train = lab.rank_share(splits.train, rank, world)
    val, test = lab.rank_share(splits.val, rank, world), lab.rank_share(splits.test, rank, world)

    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    seed = cfg.train.seed
    with resumed.as_directory() if resumed is not None else contextlib.nullcontext() as folder:
        saved = None if folder is None else ckpt.read(folder, rank, world)
        position = (saved.data_position if saved is not None else None) or {"epoch": 0, "offset": 0}
        if saved is not None:
            state = saved.state
        torch.manual_seed(seed)  # the head's init (and a scratch encoder's): varies with the seed
        model = build_finetuner(cfg.model, cfg.moe, cfg.active_objectives, text, image, head=ft.head, task=ft.task,
                                classes=splits.classes, frozen=ft.frozen)
        if ft.init == "pretrained":
            model.encoder.load_state_dict(load_encoder_state(job.run_dir, spec.storage))
        engine = build_engine(cfg, model)
        torch.manual_seed(seed * 1000 + rank + 1)
        if saved is not None:
            ckpt.restore(engine, folder, saved)
    sampler = lab.EpochSampler(train, cfg.train.batch_size, seed=seed * 1000 + rank, **position)
    trainer = Trainer(cfg, engine, visual_tokens=visual_tokens(cfg.model, resolve(cfg.model), image), state=state)
    device = trainer.device
    last_ckpt_step = state.step if resumed is not None else -1

    def run_eval(final: bool) -> dict[str, float]:
        out = evaluate_split(engine.module, val, "val", cfg.eval.batch_size, device, trainer.dtype)
        if final:
            out |= evaluate_split(engine.module, test, "test", cfg.eval.batch_size, device, trainer.dtype)
        out["train_examples"] = float(lab.size(splits.train))
        return mk.keyed(mk.EVAL, out)

    while state.step < cfg.train.steps:
        micro = [sampler.next() for _ in range(cfg.train.grad_accum)]
        trainer.train_step(micro)
        final = state.step == cfg.train.steps
        do_ckpt = final or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0)
        do_eval = final or (cfg.eval.every and state.step % cfg.eval.every == 0)
        if not (do_ckpt or do_eval or state.step % cfg.train.log_every == 0):
            continue
        metrics = trainer.report()
        metrics["epoch"] = sampler.epoch
        if do_eval:
            metrics |= run_eval(final)
        if do_ckpt and state.step != last_ckpt_step:
            state.extra["world"] = world
            with ckpt.staged(engine, state, rank, sampler.state()) as folder:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=ckpt.dir_name(state.step))
            last_ckpt_step = state.step
        else:
            ray.train.report(metrics)
