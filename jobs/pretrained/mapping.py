"""Name and shape maps between Hugging Face checkpoints and mmpt towers (the format on disk, as
`save_pretrained` writes it and the Hub serves it).

Text: BERT (`model_type: bert`; BertModel, BertForMaskedLM, BertForPreTraining: the `bert.` prefix
is found). Vision: ViT (`model_type: vit`; ViTModel, ViTForImageClassification: `vit.`).

mmpt's layers are pre-LN (models/encoders/layers.py: x + f(LN(x))). ViT is pre-LN too, so a ViT
layer maps onto an mmpt layer exactly (the test compares their outputs). BERT is post-LN
(LN(x + f(x))): its sublayers (attention, FFN) and its embeddings map exactly, and each of its
LayerNorms goes to the mmpt norm that feeds the same sublayer (attention.output.LayerNorm, which
normalises the FFN's input in BERT, -> ffn_norm; output.LayerNorm of layer i, the input of layer
i+1, -> attn_norm of layer i+1; the last one -> the tower's final norm). The residual stream
then carries un-normalised sums where BERT's was normalised, so a BERT-initialised stack is a
close start, not BERT's function (layer 0's attn_norm has no BERT counterpart and stays new).

A MoE layer's experts each start as a copy of the checkpoint's dense FFN (sparse upcycling,
Komatsuzaki et al. 2022); the router is new.

Shapes: D model dim, T text positions, P patches, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kind = Literal["copy", "cat", "first_row", "rows", "grid"]
Modality = Literal["text", "vision"]
# The HF model types each modality takes, and the prefix their task heads' checkpoints add.
MODEL_TYPES: dict[Modality, dict[str, str]] = {"text": {"bert": "bert."}, "vision": {"vit": "vit."}}
_EXPERTS = "ffn.moe.deepspeed_moe.experts.deepspeed_experts"


@dataclass(frozen=True)
class Rule:
    """target (an mmpt parameter) <- sources (checkpoint tensors), transformed by `kind`:
    copy | cat (rows concatenated: fused QKV) | first_row (row 0 of a table or token) |
    rows (the first rows: position tables longer than the model's) | grid (ViT positions without
    the class token, resampled when the patch grid differs)."""

    target: str
    sources: tuple[str, ...]
    kind: Kind = "copy"
    group: str = ""  # rules that load together or not at all (one FFN: fc1 and fc2); default: the module

    @property
    def unit(self) -> str:
        return self.group or self.target.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Tower:
    layers: str  # the ModuleList of transformer layers
    final_norm: str | None  # the LayerNorm right after it, when the tower ends there


# Where each family keeps the stacks a unimodal checkpoint can start (models/encoders/*).
TEXT_TOWERS: dict[str, Tower] = {"single": Tower("encoder.layers", "encoder.norm"),
                                 "interaction": Tower("encoder.layers", None),
                                 "coattention": Tower("encoder.text_layers", None),
                                 "cross": Tower("encoder.text_layers", None),
                                 "dual": Tower("encoder.text_layers", "encoder.text_norm")}
VISION_TOWERS: dict[str, Tower] = {"single": Tower("encoder.layers", "encoder.norm"),
                                   "interaction": Tower("encoder.layers", None),
                                   "cross": Tower("encoder.image_layers", None),
                                   "dual": Tower("encoder.image_layers", "encoder.image_norm")}


def num_layers(params: set[str], tower: Tower) -> int:
    n = 0
    while f"{tower.layers}.{n}.attn.qkv.weight" in params:
        n += 1
    return n


def _ffn(params: set[str], layer: str, fc1: str, fc2: str) -> list[Rule]:
    """The FFN of one target layer: dense, or every local expert of its MoE FFN (upcycled)."""
    heads = [f"{layer}.ffn"] if f"{layer}.ffn.fc1.weight" in params else sorted(
        {p.rsplit(".fc1.weight", 1)[0] for p in params if p.startswith(f"{layer}.{_EXPERTS}.") and p.endswith(".fc1.weight")})
    return [Rule(f"{h}.{name}.{w}", (f"{src}.{w}",), group=h) for h in heads for name, src in (("fc1", fc1), ("fc2", fc2))
            for w in ("weight", "bias")]


def _pair(target: str, source: str) -> list[Rule]:
    return [Rule(f"{target}.{w}", (f"{source}.{w}",)) for w in ("weight", "bias")]


def bert_rules(params: set[str], tower: Tower | None, source_layers: int, prefix: str) -> list[Rule]:
    """BERT -> text embeddings, `tower`'s layers (None: embeddings only), pooler and MLM head."""
    e, s = "encoder.text_embeddings", f"{prefix}embeddings"
    rules = [Rule(f"{e}.word.weight", (f"{s}.word_embeddings.weight",)),
             Rule(f"{e}.position_D", (f"{s}.position_embeddings.weight",), "rows"),
             Rule(f"{e}.type_D", (f"{s}.token_type_embeddings.weight",), "first_row"), *_pair(f"{e}.norm", f"{s}.LayerNorm")]
    if tower is not None:
        n = min(num_layers(params, tower), source_layers)
        for i in range(n):
            t, b = f"{tower.layers}.{i}", f"{prefix}encoder.layer.{i}"
            for w in ("weight", "bias"):
                rules.append(Rule(f"{t}.attn.qkv.{w}", tuple(f"{b}.attention.self.{x}.{w}" for x in ("query", "key", "value")), "cat"))
            rules += [*_pair(f"{t}.attn.out", f"{b}.attention.output.dense"), *_pair(f"{t}.ffn_norm", f"{b}.attention.output.LayerNorm"),
                      *_ffn(params, t, f"{b}.intermediate.dense", f"{b}.output.dense")]
            if i > 0:  # the post-LN output of layer i-1 is layer i's input: its norm feeds layer i's attention
                rules += _pair(f"{t}.attn_norm", f"{prefix}encoder.layer.{i - 1}.output.LayerNorm")
        if n and tower.final_norm:
            rules += _pair(tower.final_norm, f"{prefix}encoder.layer.{n - 1}.output.LayerNorm")
    rules += _pair("encoder.pooler.dense", f"{prefix}pooler.dense")
    h = "objectives.mlm.head"
    rules += [*_pair(f"{h}.transform", "cls.predictions.transform.dense"),
              *_pair(f"{h}.norm", "cls.predictions.transform.LayerNorm"),
              Rule(f"{h}.decoder.bias", ("cls.predictions.bias",))]
    return [r for r in rules if r.target in params]


def vit_rules(params: set[str], tower: Tower | None, source_layers: int, prefix: str) -> list[Rule]:
    """ViT -> patch embeddings, the class token (dual encoder), `tower`'s layers and final norm."""
    s = f"{prefix}embeddings"
    rules = [*_pair("encoder.patch_embeddings.proj", f"{s}.patch_embeddings.projection"),
             Rule("encoder.patch_embeddings.position_PD", (f"{s}.position_embeddings",), "grid"),
             Rule("encoder.class_D", (f"{s}.cls_token",), "first_row"),
             Rule("encoder.class_position_D", (f"{s}.position_embeddings",), "first_row")]
    if tower is not None:
        n = min(num_layers(params, tower), source_layers)
        for i in range(n):
            t, b = f"{tower.layers}.{i}", f"{prefix}encoder.layer.{i}"
            for w in ("weight", "bias"):
                rules.append(Rule(f"{t}.attn.qkv.{w}", tuple(f"{b}.attention.attention.{x}.{w}" for x in ("query", "key", "value")), "cat"))
            rules += [*_pair(f"{t}.attn_norm", f"{b}.layernorm_before"), *_pair(f"{t}.attn.out", f"{b}.attention.output.dense"),
                      *_pair(f"{t}.ffn_norm", f"{b}.layernorm_after"), *_ffn(params, t, f"{b}.intermediate.dense", f"{b}.output.dense")]
        if n and tower.final_norm:
            rules += _pair(tower.final_norm, f"{prefix}layernorm")
    return [r for r in rules if r.target in params]


def resize_grid(pos_PD: Tensor, side: int) -> Tensor:
    """[P0, D] positions of a sqrt(P0)^2 patch grid -> [side^2, D], bicubic (as ViT fine-tuning at a
    new resolution does: Dosovitskiy et al. 2021, §3.2)."""
    old = math.isqrt(pos_PD.shape[0])
    if old * old != pos_PD.shape[0]:
        raise ValueError(f"{pos_PD.shape[0]} positions are not a square patch grid")
    if old == side:
        return pos_PD
    grid = pos_PD.T.reshape(1, -1, old, old).float()
    return F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).reshape(-1, side * side).T.to(pos_PD.dtype)


def transform(rule: Rule, sources: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    """The target's value from its sources, or ValueError saying why the shapes do not fit."""
    if rule.kind == "cat":
        value = torch.cat(sources, dim=0)
    elif rule.kind == "first_row":
        value = sources[0].reshape(-1, sources[0].shape[-1])[0]
    elif rule.kind == "rows":
        if sources[0].shape[0] < shape[0]:
            raise ValueError(f"the checkpoint has {sources[0].shape[0]} positions, the model needs {shape[0]}")
        value = sources[0][: shape[0]]
    elif rule.kind == "grid":
        value = resize_grid(sources[0].reshape(-1, sources[0].shape[-1])[1:], math.isqrt(shape[0]))
    else:
        value = sources[0]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"shape {tuple(value.shape)} from the checkpoint, {tuple(shape)} in the model")
    return value


def source_shape(rule: Rule, shapes: list[tuple[int, ...]], target: tuple[int, ...]) -> str | None:
    """Why the rule cannot apply, from shapes alone (None: it applies)."""
    try:
        transform(rule, [torch.empty(s, device="meta") for s in shapes], target)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None
