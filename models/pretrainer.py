"""The pretraining model: one encoder, several objectives, one weighted loss.

Shapes: B batch, T text tokens, C channels, H/W image size, L_moe MoE layers, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.config import TextSpec
from models.encoders import Encoder
from models.objectives import VIEWS, VISUAL_MASK_VIEWS, Objective
from models.objectives.base import CAUSAL_TEXT, CLEAN_FEATS, NUM_VISUAL_TOKENS, VISUAL_MASK

# The key of the MoE load-balancing loss in `losses`: a loss term like any other (DESIGN.md).
MOE_AUX = "moe_aux"


def check_requires(objectives: Mapping[str, type[Objective]], provides: frozenset[str], preset: str) -> None:
    """Raise if an objective needs an encoder output the preset cannot give, or an unknown view."""
    for name, cls in objectives.items():
        for key in sorted(cls.requires - provides):
            raise ValueError(f"objective {name!r} needs {key!r}, which preset {preset!r} does not provide")
        if cls.view not in VIEWS:
            raise ValueError(f"objective {name!r} consumes view {cls.view!r}; known views: {sorted(VIEWS)}")


class Pretrainer(nn.Module):
    """forward(batch) -> {"loss", "losses", "metrics", "moe_counts"}.

    batch: `image` float [B,C,H,W], `input_ids` long [B,T], `attention_mask` long [B,T], and the visual
    columns the preset's visual input reads (`obj_boxes`, `obj_labels`, `region_*`); other keys are
    ignored. The encoder runs once per distinct view the objectives consume (e.g. masked text
    for MLM, shuffled pairs for ITM), and each objective reads its own view's outputs. Each run is
    told what its view's objectives read (`want` = the union of their `requires`), so the encoder
    can leave out work no one reads there (e.g. a single-stream encoder's unimodal passes for ITC).

    - loss: sum_o weight_o * sum(losses of o) + moe_aux   (scalar, for backward); moe_aux is
      already weighted by the MoE layers (moe.aux_loss_weight and any router z-loss weight)
    - losses: unweighted, detached, by name; `moe_aux` (summed over MoE layers, averaged over views) only for a MoE model
    - metrics: detached scalars by name
    - moe_counts: long [L_moe, E], tokens each expert processed, summed over views; None if dense
    """

    def __init__(
        self,
        encoder: Encoder,
        objectives: Mapping[str, Objective],
        weights: Mapping[str, float],
        text: TextSpec,
        preset: str = "?",
        visual_tokens: int = 0,
    ) -> None:
        super().__init__()
        if not objectives:
            raise ValueError("a pretrainer needs at least one objective")
        if set(objectives) != set(weights):
            raise ValueError(f"objectives {sorted(objectives)} and weights {sorted(weights)} differ")
        check_requires({n: type(o) for n, o in objectives.items()}, encoder.provides, preset)
        self.encoder = encoder
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)
        self.text = text
        self.preset = preset
        self._visual_tokens = visual_tokens
        # view -> objectives that consume it, in the objectives' order (fixes the RNG draw order).
        self.views: dict[str, list[str]] = {}
        for name, objective in objectives.items():
            self.views.setdefault(objective.view, []).append(name)
        # view -> the encoder outputs its objectives read (the encoder's `want` for that view).
        self.wants: dict[str, frozenset[str]] = {
            view: frozenset().union(*(type(objectives[n]).requires for n in names))
            for view, names in self.views.items()
        }

    @property
    def has_moe(self) -> bool:
        return self.encoder.num_moe_layers > 0

    def forward(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor | dict[str, Tensor] | None]:
        terms: list[Tensor] = []
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        aux: Tensor | None = None
        counts: Tensor | None = None
        for view_name, names in self.views.items():
            source = batch
            if view_name in VISUAL_MASK_VIEWS:  # the view draws a [B, P] mask: tell it P
                P = self.encoder.num_visual_tokens(batch)
                source = {**batch, NUM_VISUAL_TOKENS: torch.tensor(P)}
            view = VIEWS[view_name](source, self.text, generator)
            clean = self._clean_features(view, generator) if VISUAL_MASK in view else None
            outputs = self.encoder(view, visual_mask_BP=view.get(VISUAL_MASK), causal_text=CAUSAL_TEXT in view,
                                   generator=generator, want=self.wants[view_name])
            if clean is not None:
                outputs = {**outputs, CLEAN_FEATS: clean}
            for name in names:
                named_losses, named_metrics = self.objectives[name](outputs, view)
                for key, value in named_losses.items():
                    terms.append(self.weights[name] * value)
                    losses[key] = value.detach()
                metrics.update(named_metrics)
            view_aux, view_counts = outputs["moe_aux"], outputs["moe_counts"]
            if self.has_moe and view_aux is not None:
                aux = view_aux if aux is None else aux + view_aux
            if view_counts is not None:
                counts = view_counts if counts is None else counts + view_counts
        if aux is not None:
            # Mean over views: each view is one forward of the same batch, and the balancing
            # term should not grow with the number of objectives switched on.
            aux = aux / len(self.views)
            terms.append(aux)
            losses[MOE_AUX] = aux.detach()
        return {
            "loss": sum(terms[1:], start=terms[0]),
            "losses": losses,
            "metrics": metrics,
            "moe_counts": counts,
        }

    def _clean_features(self, view: Mapping[str, Tensor], generator: torch.Generator | None) -> Tensor:
        """[B,P,F] the visual input's features without the view's mask (the MRFR target), detached.

        The RNG is rewound afterwards, so the masked forward that follows draws the same samples
        (Pixel-BERT's kept cells) and the target lines up with its tokens.
        """
        image = view["image"]
        devices = [image.device] if image.device.type == "cuda" else []
        state = generator.get_state() if generator is not None else None
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            feats_BPF = self.encoder.embed_visual(view, None, generator).feats_BPF.detach()
        if generator is not None and state is not None:
            generator.set_state(state)
        return feats_BPF

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per sample the encoder sees in training (throughput accounting): patches or
        grid cells (times Pixel-BERT's sampled share), or 1 + image.max_objects regions."""
        return self._visual_tokens

    def itm_logits(self, image_BCHW: Tensor, input_ids_BT: Tensor, attention_mask_BT: Tensor,
                   visual: Mapping[str, Tensor] | None = None) -> Tensor:
        """Match score [B] of each (image, text) pair: logit(matched) - logit(mismatched).

        For evaluation and retrieval; runs the encoder on the pairs as given (no masking, no swap)
        in whatever train/eval mode the model is in. `visual` holds the image's other columns
        (`obj_boxes`, ...; objectives.base.IMAGE_COLUMNS), row-aligned with `image_BCHW`: region
        inputs need them.
        """
        if "itm" not in self.objectives:
            raise ValueError(f"this model has no 'itm' objective (objectives: {sorted(self.objectives)})")
        inputs = {**(visual or {}), "image": image_BCHW, "input_ids": input_ids_BT,
                  "attention_mask": attention_mask_BT}
        outputs = self.encoder(inputs, want=type(self.objectives["itm"]).requires)
        logits_B2 = self.objectives["itm"].logits(outputs)
        return logits_B2[:, 1] - logits_B2[:, 0]
