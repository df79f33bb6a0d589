"""`mmpt plan`: what fits on a GPU, per ZeRO stage and expert-parallel size, before anything launches.

Legend: b micro-batch per GPU, s tokens per sample (text tokens + visual tokens), h hidden size,
a attention heads, r FFN width / h, L layers, V encoder passes per step (one per objective view),
E experts, C expert capacity, S = b*s tokens per GPU, t tensor-parallel size (`parallel.tp_size`).

Per GPU = model states (ZeRO paper's accounting, `jobs.memory.expected_model_states`)
        + DeepSpeed's reduce bucket (stages 1-3 allocate `reduce_bucket_size` elements up front; measured)
        + activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
          Transformer Models", §4.1: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, generalised
          below to any FFN ratio, fp32 and a fused attention kernel; with tensor parallelism, §4.2.2:
          s*b*h*(10 + 24/t + 5*a*s/(h*t))).
Tensor parallelism (jobs/tensor_parallel.py) puts 1/t of the split layers' parameters on a GPU and
leaves world / t GPUs for ZeRO's data-parallel partitioning.
Parameters are counted exactly by building the run's model on the `meta` device (no memory).
Activations treat the encoder as num_layers layers over one sequence of text + visual tokens: exact
for single-stream presets (ViLT, UNITER), an approximation for two-stream and dual encoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from jobs.config import RunConfig
from orchestrator.cli.console import SetOpt, fail
from orchestrator.config import ConfigError, load_config

if TYPE_CHECKING:
    from models import Pretrainer

GiB = 1024**3
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
_ACT_BYTES = {"bf16": 2, "fp32": 4}
ZERO3_MOE = ("DeepSpeed's MoE layers cannot run under ZeRO-3: stage 3 partitions every parameter over "
             "all data-parallel ranks and gathers it on use, while expert parallelism needs each rank to "
             "own its experts whole for the all-to-all (deepspeed.initialize refuses it)")
ZERO3_TP = "ZeRO-3 is not combined with tensor parallelism here (jobs/tensor_parallel.py): use stages 0-2"


@dataclass(frozen=True)
class ModelSize:
    """What the memory model needs to know about one run's model."""

    dense: int  # parameters every rank holds (Ψ), the tensor-parallel split layers' whole
    expert: int  # all experts of all MoE layers (each rank holds expert / ep)
    num_layers: int
    num_moe_layers: int
    views: int  # encoder passes per step whose activations are all alive at backward
    text_len: int
    visual_tokens: int  # patches, grid cells or regions per sample (the preset's visual input)
    split: int = 0  # of `dense`: parameters of the layers tensor parallelism splits (t ranks hold 1/t each)

    def dense_per_rank(self, tp: int) -> float:
        """Dense parameters one GPU holds at tensor-parallel size `tp` (before ZeRO)."""
        return self.dense - self.split + self.split / tp

    @property
    def seq_len(self) -> int:
        return self.text_len + self.visual_tokens


def count_model(cfg: RunConfig, vocab_size: int) -> ModelSize:
    """Count parameters exactly by building the run's model on the meta device (no allocation)."""
    import torch

    from jobs.memory import count_params
    from jobs.tensor_parallel import per_rank_numel
    from models import build_pretrainer
    from models.config import ImageSpec, TextSpec

    moe = cfg.moe.model_copy(update={"ep_size": 1})  # ep_size 1: the model holds every expert
    # No head's size depends on which ids are word pieces or scene words: a stand-in id lets the
    # objectives that need them (mlm_wwm, sgp) build without the run's tokenizer.
    stand_in = (vocab_size - 1,)
    text = TextSpec(vocab_size=vocab_size, max_len=cfg.data.max_text_len, continuation_ids=stand_in,
                    scene_object_ids=stand_in, scene_attribute_ids=stand_in, scene_relation_ids=stand_in)
    with torch.device("meta"):
        model: Pretrainer = build_pretrainer(cfg.model, moe, cfg.active_objectives, text,
                                             ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects))
    dense, expert = count_params(model)
    _, split = per_rank_numel(model.named_parameters(), 1)
    return ModelSize(dense=dense, expert=expert, num_layers=cfg.model.num_layers,
                     num_moe_layers=model.encoder.num_moe_layers, views=len(model.views),
                     text_len=cfg.data.max_text_len, visual_tokens=model.num_visual_tokens, split=split)


def layer_activation_bytes(s: int, b: int, h: int, a: int, ffn_ratio: float, act_bytes: int,
                           dropout: bool, fused_attention: bool = True, tp: int = 1) -> float:
    """Activations one transformer layer keeps for backward (Korthikanti et al. 2022, §4.1).

    With 16-bit activations, ffn_ratio 4, dropout and unfused attention this is exactly the paper's
    s*b*h*(34 + 5*a*s/h): attention 11sbh + 5as²b, MLP 19sbh, two LayerNorm inputs 4sbh.
    A fused kernel (PyTorch SDPA: flash / memory-efficient) keeps Q, K, V and its output but never
    the s x s scores, softmax or dropout mask (it regenerates them in backward), so 5as²b drops.
    Tensor parallelism over `tp` ranks (Korthikanti §4.2.2, no sequence parallelism) splits what lies
    between a column and a row layer (Q, K, V, the scores, the output projection's input, fc1 and GeLU
    outputs): s*b*h*(10 + 24/t + 5*a*s/(h*t)) in the paper's setting.
    """
    sbh = s * b * h
    mask = 1 if dropout else 0  # dropout masks are 1 byte per element
    # QKV input (replicated); Q, K, V and the output projection's input (split); out dropout (replicated)
    attention = act_bytes * sbh + act_bytes * 4 * sbh / tp + mask * sbh
    if not fused_attention:
        attention += (2 * act_bytes + mask) * a * s * s * b / tp  # scores, softmax output, softmax dropout
    # input (replicated), fc1 out and GeLU out (split), dropout (replicated)
    mlp = act_bytes * sbh + act_bytes * 2 * ffn_ratio * sbh / tp + mask * sbh
    norms = 2 * act_bytes * sbh
    return attention + mlp + norms


def _moe_extra_bytes(cfg: RunConfig, b: int, s: int, act_bytes: int) -> float:
    """A MoE FFN over a dense one: the experts see capacity_factor x the tokens, plus the dispatch.

    `moe.dispatch: deepspeed` builds GShard's dense dispatch tensors [S, E, C] over all the batch's
    tokens (fp32 combine weights + bool mask, Lepikhin et al. 2020): quadratic in the tokens, and its
    buffers have E*C slots. The default `indexed` dispatch has a buffer of a static K*S rows (every
    route; dropped ones are not computed but have their row: no host sync sizes it), or E*C for expert
    choice, plus int64 destination/source/expert indices and an fp32 gate weight per route (models/moe/
    dispatch.py); expert choice's routes are its [E, S] picks (int64 expert and slot, fp32 gate).
    """
    tokens = b * s
    E, cf, h, k = cfg.moe.num_experts, cfg.moe.capacity_factor, cfg.model.hidden_size, cfg.moe.k
    r = (cfg.moe.expert_hidden_size or int(h * cfg.model.mlp_ratio)) / h
    if cfg.moe.dispatch == "deepspeed":
        C = tokens * k if cfg.moe.dropless else max(math.ceil(tokens * k / E * cf), cfg.moe.min_capacity)
        slots = E * C if not cfg.moe.dropless else tokens * k
        routing = 5 * tokens * E * C
    elif cfg.moe.gate == "expert_choice":
        slots = E * max(math.ceil(cf * tokens / E), cfg.moe.min_capacity)
        routing = (8 + 8 + 4) * E * tokens + (3 * 8 + 4) * E * tokens
    else:
        slots = tokens * k
        routing = (3 * 8 + 4) * slots
    experts = act_bytes * (1 + 2 * r) * slots * h  # expert MLP activations over the buffer rows
    dense = act_bytes * (1 + 2 * cfg.model.mlp_ratio) * tokens * h  # what a dense FFN would have kept
    moved = 2 * act_bytes * slots * h  # dispatched inputs and expert outputs
    return experts - dense + moved + routing


def activation_bytes(cfg: RunConfig, size: ModelSize, checkpointing: bool) -> float:
    """Activations alive at the start of backward on one GPU, all layers and views.

    Full activation checkpointing keeps each layer's input (Korthikanti: 2sbhL in 16-bit) plus one
    layer's activations while that layer is recomputed in backward.
    """
    act = _ACT_BYTES[cfg.train.precision]
    b, s, h = cfg.train.batch_size, size.seq_len, cfg.model.hidden_size
    dense_layer = layer_activation_bytes(s, b, h, cfg.model.num_heads, cfg.model.mlp_ratio, act,
                                         dropout=cfg.model.dropout > 0, tp=cfg.parallel.tp_size)
    moe_layer = dense_layer + (_moe_extra_bytes(cfg, b, s, act) if size.num_moe_layers else 0.0)
    full = (size.num_layers - size.num_moe_layers) * dense_layer + size.num_moe_layers * moe_layer
    if checkpointing:
        return size.views * size.num_layers * act * s * b * h + max(dense_layer, moe_layer)
    return size.views * full


@dataclass(frozen=True)
class Row:
    stage: int
    ep: int
    params: float
    grads: float
    optim: float
    buffers: float
    activations: float
    activations_ckpt: float
    gpu_mem: float
    infeasible: str | None = None

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optim

    @property
    def total(self) -> float:
        return self.states + self.buffers + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.states + self.buffers + self.activations_ckpt

    @property
    def fits(self) -> bool:
        return self.infeasible is None and self.total <= self.gpu_mem

    @property
    def fits_ckpt(self) -> bool:
        return self.infeasible is None and self.total_ckpt <= self.gpu_mem


def _reduce_bucket(cfg: RunConfig) -> int:
    zero = cfg.deepspeed.extra.get("zero_optimization", {})
    return int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)) if isinstance(zero, dict) else DS_REDUCE_BUCKET


def estimate(cfg: RunConfig, size: ModelSize, gpus: int, stage: int, ep: int, gpu_mem: float = 80 * GiB) -> Row:
    """Per-GPU bytes for one (stage, ep) setting on `gpus` GPUs: `cfg.parallel.tp_size` of them per
    tensor-parallel group, the groups data-parallel."""
    from jobs.memory import expected_model_states

    tp = cfg.parallel.tp_size
    if gpus % tp:
        raise ValueError(f"parallel.tp_size={tp} must divide the {gpus} GPUs")
    states = expected_model_states(round(size.dense_per_rank(tp)), size.expert, stage, gpus // tp, ep,
                                   cfg.train.precision, tp)
    buffers = float(_reduce_bucket(cfg) * _ACT_BYTES[cfg.train.precision]) if stage > 0 else 0.0
    return Row(stage=stage, ep=ep, params=states["params"], grads=states["grads"], optim=states["optim"],
               buffers=buffers, activations=activation_bytes(cfg, size, False),
               activations_ckpt=activation_bytes(cfg, size, True), gpu_mem=gpu_mem,
               infeasible=ZERO3_MOE if stage == 3 and size.expert else ZERO3_TP if stage == 3 and tp > 1 else None)


def ep_choices(num_experts: int, gpus: int, tp: int = 1) -> list[int]:
    """Expert-parallel sizes: divisors of the GPU count that also divide the number of experts
    (only 1 under tensor parallelism: jobs/tensor_parallel.py)."""
    if num_experts == 0 or tp > 1:
        return [1]
    return [d for d in range(1, gpus + 1) if gpus % d == 0 and num_experts % d == 0]


def plan(cfg: RunConfig, size: ModelSize, gpus: int, gpu_mem: float) -> list[Row]:
    return [estimate(cfg, size, gpus, stage, ep, gpu_mem)
            for stage in (0, 1, 2, 3) for ep in ep_choices(cfg.moe.num_experts, gpus, cfg.parallel.tp_size)]


def suggest(rows: list[Row]) -> tuple[Row, bool] | None:
    """(row, needs checkpointing) or None when nothing fits.

    The lowest stage that fits: stages 1 and 2 cost no more communication than plain data
    parallelism, stage 3 costs 1.5x (ZeRO §7), and each stage adds bookkeeping. Among ep sizes the
    largest: fewer experts per GPU leaves the most room for activations (the all-to-all is paid
    as soon as ep > 1). Checkpointing only when nothing fits without it (it costs a forward pass).
    """
    for ckpt in (False, True):
        fitting = [r for r in rows if (r.fits_ckpt if ckpt else r.fits)]
        if fitting:
            return min(fitting, key=lambda r: (r.stage, -r.ep)), ckpt
    return None


def _vocab(cfg: RunConfig, override: int | None) -> tuple[int, str]:
    """The vocabulary size: --vocab-size, else the run's tokenizer.json where `mmpt run` looks for
    it (data.tokenizer, beside the train shards, their parent, the run dir), else data.vocab_size
    (the size `mmpt run` trains a tokenizer with when there is none)."""
    if override is not None:
        return override, "--vocab-size"
    import posixpath

    from jobs import storage
    from jobs.data.tokenizer import load_tokenizer
    from orchestrator.run.files import run_uri, tokenizer_candidates

    opts = storage.StorageOptions.of(cfg.storage)
    try:
        folder = posixpath.dirname(storage.expand_shards(cfg.data.train, opts, suffixes=(".tar", ".parquet"))[0])
    except (ValueError, OSError):
        folder = None
    for uri in tokenizer_candidates(cfg, folder, run_uri(cfg.storage.path, cfg.name)):
        try:
            if storage.exists(uri, opts):
                return load_tokenizer(uri, opts).get_vocab_size(with_added_tokens=True), uri
        except (ValueError, OSError):
            continue
    return cfg.data.vocab_size, "data.vocab_size (no tokenizer.json found)"


def render(cfg: RunConfig, size: ModelSize, rows: list[Row], gpus: int, vocab_note: str, console: Console) -> None:
    gpu_mem = rows[0].gpu_mem
    # MiB when the model states are small, so they do not all print as 0.00
    unit, scale = ("GiB", GiB) if max(r.states for r in rows) >= 0.1 * GiB else ("MiB", 1024**2)

    def gib(x: float) -> str:
        return f"{x / scale:.2f}"

    console.print(f"[bold]{cfg.name}[/bold]: {cfg.model.preset}, {size.dense:,} dense + {size.expert:,} expert "
                  f"parameters (vocab {vocab_note}), {size.num_layers} layers ({size.num_moe_layers} MoE), "
                  f"{cfg.train.precision}, micro-batch {cfg.train.batch_size} x {size.seq_len} tokens "
                  f"({size.text_len} text + {size.visual_tokens} visual), {size.views} encoder passes/step; "
                  f"{gpus} GPUs of {gpu_mem / GiB:g} GiB", highlight=False)
    if (tp := cfg.parallel.tp_size) > 1:
        console.print(f"tensor parallel: tp {tp} x dp {gpus // tp}; {size.split:,} parameters split (1/{tp} "
                      f"per GPU), {size.dense - size.split:,} replicated", highlight=False)
    table = Table(title=f"per-GPU memory, {unit}", title_justify="left")
    for col in ("ZeRO", "ep", "params", "grads", "optim", "buffers", "states", "act", "act ckpt",
                "total", "total ckpt", "fits"):
        table.add_column(col, justify="left" if col == "fits" else "right")
    for r in rows:
        fits = ("n/a: MoE" if r.infeasible == ZERO3_MOE else "n/a: tp") if r.infeasible else ("yes" if r.fits else "with ckpt" if r.fits_ckpt else "no")
        table.add_row(str(r.stage), str(r.ep), gib(r.params), gib(r.grads), gib(r.optim), gib(r.buffers),
                      gib(r.states), gib(r.activations), gib(r.activations_ckpt), gib(r.total),
                      gib(r.total_ckpt), fits)
    console.print(table)
    best = suggest(rows)
    if best is None:
        console.print("suggested: nothing fits; lower train.batch_size, add GPUs or offload the optimizer",
                      highlight=False)
    else:
        row, ckpt = best
        sets = [f"deepspeed.zero_stage={row.stage}"] + ([f"moe.ep_size={row.ep}"] if size.expert else [])
        sets += ["train.activation_checkpointing=true"] if ckpt else []
        console.print(f"suggested: --set {' --set '.join(sets)}"
                      + f" ({gib(row.total_ckpt if ckpt else row.total)} {unit} of {gpu_mem / GiB:g} GiB)", highlight=False)
    for reason in dict.fromkeys(r.infeasible for r in rows if r.infeasible):
        console.print(f"ZeRO-3 n/a: {reason}.", highlight=False)
    console.print("model states: ZeRO paper (Rajbhandari et al. 2020) for mixed-precision Adam; fp32 as DeepSpeed "
                  "0.19 keeps it (jobs/memory.py). buffers: DeepSpeed's reduce bucket. act: Korthikanti et al. "
                  "2022 per layer, fused attention; embeddings and heads not counted.", highlight=False)




def plan_cmd(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="data-parallel GPUs")],
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", min=0.1, help="memory per GPU, GiB")] = 80.0,
    set_: SetOpt = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", min=8, help="default: the run's tokenizer")] = None,
) -> None:
    """Per-GPU memory for ZeRO stages 0-3 and each expert-parallel size: what fits, and a suggestion."""
    console = Console(width=max(Console().width, 120))
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(exc.problems)
    if gpus % cfg.parallel.tp_size:
        fail(f"--gpus {gpus} is not a multiple of parallel.tp_size={cfg.parallel.tp_size}")
    vocab, source = _vocab(cfg, vocab_size)
    size = count_model(cfg, vocab)
    rows = plan(cfg, size, gpus, gpu_mem * GiB)
    render(cfg, size, rows, gpus, f"{vocab:,}: {source}", console)


__all__ = ["ModelSize", "Row", "activation_bytes", "count_model", "estimate", "layer_activation_bytes", "plan",
           "plan_cmd", "suggest"]
