"""`model.init`: start a built mmpt model from Hugging Face unimodal checkpoints, and say exactly
what happened: every model parameter is `loaded` (from which checkpoint tensors) or `new` (kept at
its random init), and every checkpoint tensor used or `skipped` with the reason.

    plan = plan_init(model, model_cfg, opts)     # names and shapes only (safetensors headers)
    apply_init(model, plan, opts)                # reads the tensors the plan uses, copies them in

The driver plans on a model built on the meta device (no memory) before Ray starts, so a wrong
folder, a checkpoint of another kind or a size mismatch is a one-line error naming the field,
and the plan is printed and kept in summary.json; each worker plans again on its real model and
applies (jobs/engine.py), before DeepSpeed wraps the model.

Which stacks a checkpoint starts (jobs/pretrained/mapping.py): text -> the text embeddings and the
text tower (single-stream: the joint transformer, unless a vision checkpoint is given: then the
joint transformer is ViT's and the text checkpoint starts the embeddings, pooler and MLM head, the
ViLT recipe, Kim et al. 2021 §3.1); vision -> the patch embeddings and the image tower (CLIP's
image tower with the class token; the joint transformer of a single-stream model).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jobs import storage
from jobs.config import RunConfig
from jobs.pretrained import checkpoint as ckpt
from jobs.pretrained.mapping import (
    MODEL_TYPES,
    TEXT_TOWERS,
    VISION_TOWERS,
    Modality,
    Rule,
    bert_rules,
    source_shape,
    transform,
    vit_rules,
)
from models.config import ImageSpec, ModelConfig, TextSpec

log = logging.getLogger(__name__)


class InitError(ValueError):
    """A `model.init` setting that cannot work; one line naming the field."""


@dataclass
class SourcePlan:
    modality: Modality
    uri: str
    model_type: str
    loaded: list[Rule] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> why it is not used
    notes: list[str] = field(default_factory=list)

    @property
    def used(self) -> set[str]:
        return {s for r in self.loaded for s in r.sources}


@dataclass
class InitPlan:
    sources: list[SourcePlan]
    new: list[str]  # model parameters no checkpoint starts

    def summary(self) -> dict[str, Any]:
        """JSON for summary.json: per checkpoint, what was loaded / skipped; the parameters left new."""
        out: dict[str, Any] = {}
        for s in self.sources:
            out[s.modality] = {"checkpoint": s.uri, "model_type": s.model_type, "loaded": len(s.loaded),
                               "loaded_params": sorted(r.target for r in s.loaded),
                               "tensors_used": len(s.used), "skipped": dict(sorted(s.skipped.items())), "notes": s.notes}
        out["new"] = self.new
        return out

    def lines(self) -> list[str]:
        """What a person reads: one line per checkpoint, then the new parameters grouped by module."""
        out = []
        for s in self.sources:
            why = Counter(s.skipped.values())
            skipped = "; ".join(f"{n} {reason}" for reason, n in why.most_common(3))
            out.append(f"model.init.{s.modality} ({s.model_type}, {s.uri}): loaded {len(s.loaded)} parameters from "
                       f"{len(s.used)} tensors; skipped {len(s.skipped)} tensors" + (f" ({skipped})" if skipped else ""))
            out += [f"  note: {n}" for n in s.notes]
        groups = Counter(".".join(n.split(".")[:3]) for n in self.new)
        out.append(f"new (random init): {len(self.new)} parameters"
                   + (": " + ", ".join(f"{g} ({k})" for g, k in sorted(groups.items())) if groups else ""))
        return out


def _prefix(names: set[str], modality: Modality, model_type: str) -> str:
    """'' or the task model's prefix (`bert.`, `vit.`): whichever the embeddings are found under."""
    probe = "embeddings.word_embeddings.weight" if modality == "text" else "embeddings.patch_embeddings.projection.weight"
    head = MODEL_TYPES[modality][model_type]
    for prefix in ("", head):
        if prefix + probe in names:
            return prefix
    raise InitError(f"model.init.{modality}: no {probe} (or {head}{probe}) in the checkpoint; is it a "
                    f"{model_type} model?")


def _check(modality: Modality, uri: str, hf: dict[str, Any], cfg: ModelConfig) -> tuple[str, list[str]]:
    field_name = f"model.init.{modality}"
    kinds = MODEL_TYPES[modality]
    model_type = str(hf.get("model_type", "?"))
    if model_type not in kinds:
        raise InitError(f"{field_name} = {uri!r}: model_type {model_type!r}; allowed for {modality}: {', '.join(kinds)}")
    for key, want in (("hidden_size", cfg.hidden_size), ("num_attention_heads", cfg.num_heads),
                      *((("patch_size", cfg.patch_size),) if modality == "vision" else ())):
        if hf.get(key) != want:
            mine = {"hidden_size": "model.hidden_size", "num_attention_heads": "model.num_heads",
                    "patch_size": "model.patch_size"}[key]
            raise InitError(f"{field_name} = {uri!r}: the checkpoint's {key} is {hf.get(key)}, {mine} is {want}; "
                            f"set {mine}={hf.get(key)} to load it")
    from models.ffn import ffn_size

    width = ffn_size(cfg.hidden_size, cfg.mlp_ratio)
    if hf.get("intermediate_size") is not None and hf["intermediate_size"] != width:
        ratio = hf["intermediate_size"] / cfg.hidden_size
        raise InitError(f"{field_name} = {uri!r}: the checkpoint's intermediate_size is {hf['intermediate_size']}, "
                        f"model.mlp_ratio={cfg.mlp_ratio} gives {width}; set model.mlp_ratio={ratio:g} to load it")
    notes = []
    if hf.get("hidden_act", "gelu") != "gelu":
        notes.append(f"hidden_act {hf['hidden_act']!r} in the checkpoint; mmpt's FFN uses exact GELU")
    eps = hf.get("layer_norm_eps")
    if eps is not None and abs(float(eps) - 1e-5) > 1e-9:
        notes.append(f"layer_norm_eps {eps} in the checkpoint, 1e-05 in mmpt's LayerNorms")
    if modality == "vision" and hf.get("qkv_bias") is False:
        notes.append("qkv_bias false in the checkpoint: the QKV biases start at 0")
    return model_type, notes


def plan_init(model: nn.Module, cfg: ModelConfig, opts: storage.StorageOptions | None = None) -> InitPlan:
    """Which checkpoint tensors go where (names and shapes only); InitError for a setting that cannot work."""
    from models.blocks import resolve

    params = {n: tuple(p.shape) for n, p in _parameters(model).items()}
    names = set(params)
    family = resolve(cfg).family
    plans: list[SourcePlan] = []
    for modality, uri in (("vision", cfg.init.vision), ("text", cfg.init.text)):
        if not uri:
            continue
        try:
            hf = ckpt.read_config(uri, opts)
            shapes = ckpt.tensor_shapes(uri, opts)
        except (ckpt.CheckpointError, OSError) as exc:
            raise InitError(f"model.init.{modality} = {uri!r}: {exc}") from None
        model_type, notes = _check(modality, uri, hf, cfg)  # type: ignore[arg-type]
        prefix = _prefix(set(shapes), modality, model_type)  # type: ignore[arg-type]
        layers = int(hf.get("num_hidden_layers", 0))
        plan = SourcePlan(modality, uri, model_type, notes=notes)  # type: ignore[arg-type]
        if modality == "vision":
            rules = vit_rules(names, VISION_TOWERS.get(family), layers, prefix)
        else:
            # A single-stream joint transformer given a ViT starts from it (ViLT); BERT starts the rest.
            taken = cfg.init.vision and family in ("single", "interaction")
            rules = bert_rules(names, None if taken else TEXT_TOWERS.get(family), layers, prefix)
            if taken:
                plan.notes.append(f"{TEXT_TOWERS[family].layers} start from model.init.vision (ViLT's recipe); "
                                  "this checkpoint's layers are skipped")
        claimed = {r.target for p in plans for r in p.loaded}
        reasons: dict[Rule, str | None] = {}
        for rule in rules:
            missing = [s for s in rule.sources if s not in shapes]
            reasons[rule] = (f"missing in the checkpoint: {missing[0]}" if missing else
                             "started by another checkpoint" if rule.target in claimed else
                             source_shape(rule, [shapes[s] for s in rule.sources], params[rule.target]))
        # A module loads whole or not at all: half an FFN from a checkpoint is no one's FFN.
        failed = {r.unit: f"{r.target}: {why}" for r, why in reasons.items() if why is not None}
        for rule in rules:
            if rule.unit not in failed:
                plan.loaded.append(rule)
                continue
            for s in rule.sources:
                if s in shapes:
                    plan.skipped.setdefault(s, failed[rule.unit])
        used = plan.used
        layers_taken = modality == "text" and cfg.init.vision and family in ("single", "interaction")
        for name in shapes:
            if name not in used:
                why = (f"{TEXT_TOWERS[family].layers} start from model.init.vision" if layers_taken and
                       name.startswith(f"{prefix}encoder.layer.") else f"no counterpart in preset {cfg.preset!r} ({family})")
                plan.skipped.setdefault(name, why)
        for name in used:
            plan.skipped.pop(name, None)
        plans.append(plan)
    loaded = {r.target for p in plans for r in p.loaded}
    return InitPlan(sources=plans, new=sorted(n for n in names if n not in loaded))


def _parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters by name, a MoE layer's stacked experts as DeepSpeed's per-expert entries
    (views into the stacked tensors: copying into one sets that expert)."""
    from models.moe.experts import split_stacked

    return split_stacked(dict(model.named_parameters()))


@torch.no_grad()
def apply_init(model: nn.Module, plan: InitPlan, opts: storage.StorageOptions | None = None) -> int:
    """Copy the planned tensors into the model; returns how many parameters were set."""
    params = _parameters(model)
    n = 0
    for source in plan.sources:
        tensors = ckpt.load_tensors(source.uri, opts, names=source.used)
        for rule in source.loaded:
            param = params[rule.target]
            value = transform(rule, [tensors[s].float() for s in rule.sources], tuple(param.shape))
            param.copy_(value.to(dtype=param.dtype, device=param.device))
            n += 1
    return n


def load_pretrained(model: nn.Module, cfg: ModelConfig, opts: storage.StorageOptions | None = None,
                    announce: bool = False) -> InitPlan | None:
    """Plan and apply `cfg.init` (None when it names no checkpoint)."""
    if not cfg.init.enabled:
        return None
    plan = plan_init(model, cfg, opts)
    apply_init(model, plan, opts)
    if announce:
        for line in plan.lines():
            log.warning("%s", line)
    return plan


def plan_for_run(run: RunConfig, text: TextSpec, opts: storage.StorageOptions | None = None) -> InitPlan | None:
    """The driver's check: the run's model built on the meta device (no memory, no init draws), planned."""
    if not run.model.init.enabled:
        return None
    from models import build_pretrainer

    image = ImageSpec(size=run.data.image_size, max_objects=run.data.max_objects)
    with torch.device("meta"):
        model = build_pretrainer(run.model, run.moe, run.active_objectives, text, image)
    return plan_init(model, run.model, opts)
