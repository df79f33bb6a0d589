"""A run's weights in formats others load: the whole model as one safetensors file, or its towers
as Hugging Face BERT / ViT model folders (the inverse of mapping.py's import maps).

`consolidate` turns a run checkpoint's DeepSpeed files into one state dict: for ZeRO 0-2 the module
weights rank 0 saved plus every expert's file (DeepSpeed saves each expert separately, keyed by
its global id, so the result holds all E experts whatever ep_size the run used); for ZeRO-3
DeepSpeed's own zero_to_fp32 gathers the partitions.

The HF towers: `text/` is a BertModel (embeddings, the text tower's layers, pooler when the model
has one), `vision/` a ViTModel (patch embeddings, class token where the model has one, the image
tower's layers and final norm), each config.json + model.safetensors, loadable by
`transformers.AutoModel.from_pretrained` and by another run's `model.init`. A MoE layer has no BERT
or ViT counterpart: its FFN is exported as the mean of its experts (noted). ViT layers compute in
transformers exactly what they compute in mmpt; BERT layers are post-LN there (see mapping.py).
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from jobs.config import RunConfig
from jobs.pretrained.mapping import TEXT_TOWERS, VISION_TOWERS, Rule, bert_rules, num_layers, vit_rules

_LN_EPS = 1e-5  # torch.nn.LayerNorm's, every mmpt norm


def consolidate(checkpoint_dir: str, zero_stage: int) -> dict[str, Tensor]:
    """One fp32 state dict of the whole model from a run checkpoint folder (local)."""
    from jobs.checkpoint import deepspeed_view

    with deepspeed_view(checkpoint_dir) as view:
        return _consolidate(view, checkpoint_dir, zero_stage)


def _consolidate(view: str, checkpoint_dir: str, zero_stage: int) -> dict[str, Tensor]:
    from jobs.checkpoint import DS_TAG

    ds = os.path.join(view, DS_TAG)
    if zero_stage == 3:
        from models.deepspeed_import import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(view, tag=DS_TAG).items()}
    main = os.path.join(ds, "mp_rank_00_model_states.pt")
    if not os.path.isfile(main):
        raise FileNotFoundError(f"{checkpoint_dir}: no {DS_TAG}/mp_rank_00_model_states.pt (not an mmpt checkpoint?)")
    # DeepSpeed's own files (they pickle its config objects, so not weights_only); the run wrote them
    state = {k: v for k, v in torch.load(main, map_location="cpu", weights_only=False)["module"].items()}
    for path in sorted(glob.glob(os.path.join(ds, "*expert_*_model_states.pt"))):
        state |= torch.load(path, map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state.items() if isinstance(v, Tensor)}


def _invert(rules: list[Rule], state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Checkpoint tensors from mmpt's: (tensors, rows kept aside: `first_row` targets by source)."""
    sums: dict[str, Tensor] = {}
    counts: defaultdict[str, int] = defaultdict(int)
    first_rows: dict[str, Tensor] = {}
    for rule in rules:
        value = state[rule.target]
        if rule.kind == "cat":
            parts = dict(zip(rule.sources, value.chunk(len(rule.sources), dim=0), strict=True))
        elif rule.kind == "first_row":
            first_rows[rule.sources[0]] = value
            continue
        else:
            parts = {rule.sources[0]: value}
        for name, part in parts.items():  # several experts fill one dense FFN: their mean
            sums[name] = part.clone() if name not in sums else sums[name] + part
            counts[name] += 1
    return {k: v / counts[k] for k, v in sums.items()}, first_rows


def _merged_experts(rules: list[Rule]) -> list[str]:
    by_source = defaultdict(set)
    for rule in rules:
        if rule.kind == "copy" and ".deepspeed_experts." in rule.target:
            by_source[rule.sources[0]].add(rule.target)
    return sorted({s.rsplit(".", 2)[0] for s, t in by_source.items() if len(t) > 1})


def bert_folder(state: dict[str, Tensor], cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Tensor], list[str]] | None:
    """(config.json, tensors, notes) of the model's text tower as a BertModel; None without text embeddings."""
    from models.blocks import resolve

    params = set(state)
    if "encoder.text_embeddings.word.weight" not in params:
        return None
    tower = TEXT_TOWERS.get(resolve(cfg.model).family)
    n = num_layers(params, tower) if tower else 0
    rules = [r for r in bert_rules(params, tower, n, "") if not r.target.startswith("objectives.")]
    tensors, rows = _invert(rules, state)
    D = cfg.model.hidden_size
    tensors["embeddings.token_type_embeddings.weight"] = rows["embeddings.token_type_embeddings.weight"].expand(2, D)
    notes = [f"{layer}: a MoE FFN, exported as the mean of its experts" for layer in _merged_experts(rules)]
    last = f"encoder.layer.{n - 1}.output.LayerNorm"
    if n and f"{last}.weight" not in tensors:  # the tower does not end in a norm of its own (co-attention, cross)
        tensors[f"{last}.weight"], tensors[f"{last}.bias"] = torch.ones(D), torch.zeros(D)
        notes.append(f"{last}: no counterpart in mmpt's tower (cross-modal layers follow it): identity")
    if "pooler.dense.weight" not in tensors:
        notes.append("pooler: the model has none (no objective reads a pooled pair); transformers draws one")
    ffn = next((v.shape[0] for k, v in tensors.items() if k.endswith("intermediate.dense.weight")), int(D * cfg.model.mlp_ratio))
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": state["encoder.text_embeddings.word.weight"].shape[0],
              "hidden_size": D, "num_hidden_layers": n, "num_attention_heads": cfg.model.num_heads,
              "intermediate_size": ffn, "max_position_embeddings": tensors["embeddings.position_embeddings.weight"].shape[0],
              "type_vocab_size": 2,
              "hidden_act": "gelu", "layer_norm_eps": _LN_EPS, "hidden_dropout_prob": cfg.model.dropout,
              "attention_probs_dropout_prob": cfg.model.dropout, "initializer_range": 0.02}
    return config, tensors, notes


def vit_folder(state: dict[str, Tensor], cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Tensor], list[str]] | None:
    """(config.json, tensors, notes) of the image tower as a ViTModel; None without patch input."""
    from models.blocks import resolve

    params = set(state)
    if "encoder.patch_embeddings.proj.weight" not in params:
        return None
    tower = VISION_TOWERS.get(resolve(cfg.model).family)
    n = num_layers(params, tower) if tower else 0
    rules = vit_rules(params, tower, n, "")
    tensors, rows = _invert(rules, state)
    D, notes = cfg.model.hidden_size, [f"{layer}: a MoE FFN, exported as the mean of its experts" for layer in _merged_experts(rules)]
    grid = state["encoder.patch_embeddings.position_PD"]
    cls_pos = rows.get("embeddings.position_embeddings")
    cls = rows.get("embeddings.cls_token")
    if cls is None:
        notes.append("embeddings.cls_token: the model has no class token (single-stream patches): zeros")
    tensors["embeddings.position_embeddings"] = torch.cat([torch.zeros(1, D) if cls_pos is None else cls_pos[None], grid])[None]
    tensors["embeddings.cls_token"] = (torch.zeros(D) if cls is None else cls).reshape(1, 1, D)
    if "layernorm.weight" not in tensors:
        tensors["layernorm.weight"], tensors["layernorm.bias"] = torch.ones(D), torch.zeros(D)
        notes.append("layernorm: the tower does not end in a norm of its own: identity")
    ffn = next((v.shape[0] for k, v in tensors.items() if k.endswith("intermediate.dense.weight")), int(D * cfg.model.mlp_ratio))
    config = {"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": D, "num_hidden_layers": n,
              "num_attention_heads": cfg.model.num_heads, "intermediate_size": ffn, "image_size": cfg.data.image_size,
              "patch_size": cfg.model.patch_size, "num_channels": 3, "qkv_bias": True, "hidden_act": "gelu",
              "layer_norm_eps": _LN_EPS, "hidden_dropout_prob": cfg.model.dropout,
              "attention_probs_dropout_prob": cfg.model.dropout, "initializer_range": 0.02}
    return config, tensors, notes
