"""One rank's optimisation steps through the DeepSpeed engine, with their figures kept on the device.

torchtitan's split: `forward_backward_step` is one micro-batch's forward and backward, `train_step`
is `train.grad_accum` of them and the optimizer step, and `report` turns the steps since the last
report into its figures, averaged over ranks. Nothing here knows Ray: the Ray Train worker
(jobs/train_loop.py) and the GPU check (benchmarks/gpu_check.py) run the same code.

No host sync per micro-batch: losses and metrics are summed into device tensors; samples and tokens
are counted on the host copy of the batch (its shape and its CPU attention mask) before the copy to
the device; the sums are read back once per report, by the all-reduce that averages them
(jobs/collectives.py). A GPU therefore runs ahead of the Python loop between reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jobs import collectives
from jobs.checkpoint import TrainerState
from jobs.config import RunConfig
from jobs.data.batch import to_model_batch
from models import metric_keys as mk

Batch = dict[str, Tensor]


@dataclass
class Window:
    """Running sums between two reports. `sums` are device tensors, already divided by grad_accum."""

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    wait: float = 0.0
    sums: dict[str, Tensor] = field(default_factory=dict)

    def add(self, name: str, value: Tensor, scale: float) -> None:
        value = value.detach().float() * scale
        self.sums[name] = value if name not in self.sums else self.sums[name] + value


def _flatten_lists(values: dict[str, Any]) -> dict[str, Any]:
    """{"k": [a, b]} -> {"k[0]": a, "k[1]": b}, so per-expert loads are reduced as scalars."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, list):
            out |= {f"{k}[{j}]": x for j, x in enumerate(v)}
        else:
            out[k] = v
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


def host_tokens(raw: Batch) -> int | Tensor:
    """Real text tokens of a batch: a host int from a CPU mask, else a device scalar (summed, read later)."""
    mask = raw["attention_mask"]
    return int(mask.sum()) if mask.device.type == "cpu" else mask.sum()


class Trainer:
    """The steps of one rank. `state` is what a checkpoint saves besides DeepSpeed's own state."""

    def __init__(self, cfg: RunConfig, engine: Any, *, visual_tokens: int, state: TrainerState | None = None,
                 perturb: Any = None) -> None:
        self.cfg, self.engine, self.perturb = cfg, engine, perturb
        self.device: torch.device = engine.device
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.gas = cfg.train.grad_accum
        self.visual_tokens = visual_tokens
        self.state = state or TrainerState()
        self.window = Window()
        self.memory: dict[str, int] | None = None  # model-state bytes after the first step, reported once

    def forward_backward_step(self, batch: Batch) -> dict[str, Any]:
        """One micro-batch: the model's output dict (loss, losses, metrics), gradients accumulated."""
        if self.perturb is None:
            out = self.engine(batch)
        else:
            from models.adversarial import adversarial_forward

            adv = self.cfg.train.adversarial
            out = adversarial_forward(lambda: self.engine(batch), self.perturb, adv, self.device)
        self.engine.backward(out["loss"])
        return out

    def train_step(self, micro_batches: Sequence[Batch], wait_s: float = 0.0) -> None:
        """`grad_accum` micro-batches (host tensors, pinned on a GPU), then the optimizer step."""
        window, scale = self.window, 1.0 / self.gas
        samples = 0
        device_tokens: Tensor | None = None
        for raw in micro_batches:
            batch = to_model_batch(raw, self.device, self.dtype)
            out = self.forward_backward_step(batch)
            self.engine.step()  # DeepSpeed steps the optimizer at the grad_accum boundary only
            for name, v in out["losses"].items():
                window.add(mk.key(mk.LOSS, name), v, scale)
            window.add(mk.TOTAL_LOSS, out["loss"], scale)
            for name, v in out["metrics"].items():
                window.add(mk.key(mk.TRAIN, name), v, scale)
            n = raw["input_ids"].shape[0]
            samples += n
            tokens = host_tokens(raw)
            if isinstance(tokens, Tensor):
                device_tokens = tokens if device_tokens is None else device_tokens + tokens
                tokens = 0
            window.tokens += tokens + n * self.visual_tokens
        if device_tokens is not None:
            window.add("_tokens", device_tokens, 1.0)
        window.samples += samples
        window.steps += 1
        window.wait += wait_s
        self.state.step += 1
        self.state.samples_seen += samples * collectives.world_size()
        if self.memory is None:
            from jobs.memory import measure_model_states

            self.memory = measure_model_states(self.engine)

    def report(self) -> dict[str, Any]:
        """The window's figures averaged over ranks (collective: every rank calls it at the same step),
        then a new window. Keys: loss/*, train/*, moe/* (MoE models), data_wait_s, step, lr,
        samples_per_s, tokens_per_s, step_time_s, data_wait_share (max over ranks), samples_seen."""
        window, world = self.window, collectives.world_size()
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        steps = max(window.steps, 1)
        local: dict[str, Any] = {k: v / steps for k, v in window.sums.items()}
        local["data_wait_s"] = window.wait / steps
        if self.cfg.moe.enabled:  # per-layer expert load, drops, router losses, averaged over the window
            from models.moe import collect_stats

            local |= _flatten_lists(collect_stats(self.engine.module))
        metrics = _regroup_lists(collectives.all_mean(local, self.device))
        tokens = window.tokens + metrics.pop("_tokens", 0.0) * steps
        metrics |= {
            "step": self.state.step,
            "lr": self.engine.get_lr()[0],
            "samples_per_s": window.samples * world / elapsed,
            "tokens_per_s": tokens * world / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_share": collectives.all_max(window.wait / elapsed, self.device),
            "samples_seen": self.state.samples_seen,
        }
        if self.memory:  # this rank's bytes (ranks differ only by padding): rank 0's reach the driver
            metrics |= {k: float(v) for k, v in self.memory.items()}
            self.memory = {}
        self.window = Window()
        return metrics
