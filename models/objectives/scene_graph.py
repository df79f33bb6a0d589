"""Scene-graph prediction (ERNIE-ViL, Yu et al. 2021): mask the words of one kind of scene-graph
node and predict them from the image and the rest of the caption.

Shapes: B batch, T text tokens, D model dim, V vocabulary, K = 3 node types, N masked tokens.

Recipe (ERNIE-ViL §3.2): a caption's scene graph has object nodes ("circle"), attribute nodes
("red", "small") and relation nodes ("left of"); object, attribute and relation prediction each
mask 30 % of the caption's nodes of their kind and predict the masked words with the MLM head,
the word pieces replaced BERT-style (80 % [MASK], 10 % random, 10 % kept). Here each sample takes
one node type, uniformly among the types its caption mentions, and masks round(0.3 * n) of its n
words of that type, at least one (whole words: a word's "##" continuation pieces go with it), so
the three predictions share one view and one loss term, `sgp`; accuracy is reported per type
(`sgp_obj_acc`, `sgp_attr_acc`, `sgp_rel_acc`; 0 for a type with no masked word in the batch).

ERNIE-ViL parses each caption with a scene-graph parser (Anderson et al. 2016's SPICE parser) to
find its nodes. Here the node words come with the data: `TextSpec.scene_*_ids` hold the word
pieces of the dataset's object names, attribute words and relation words (its dataset card's
`scene_words`, collected from the scene json: Visual Genome's objects, attributes and
relationships; the shapes world's shapes, colours and sizes, spatial words), filled from the
run's tokenizer. A word is of the type its first piece belongs to (object first, where a piece
is listed twice); other words are never masked by this objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from models.config import TextSpec
from models.objectives.base import IGNORE_INDEX, cross_entropy_and_accuracy, encoder_inputs
from models.objectives.masked import TokenPrediction, corrupt, maskable, word_owner
from models.objectives.sampling import uniform

NODE_PROB = 0.3  # ERNIE-ViL: 30 % of the nodes of the chosen type
NODE_TYPES = ("obj", "attr", "rel")  # index = the node type id in `sgp_node_type`; metric names


def node_types(input_ids_BT: Tensor, eligible_BT: Tensor, owner_BT: Tensor, text: TextSpec) -> Tensor:
    """long [B, T]: node type (index into NODE_TYPES) of each eligible token's word, -1 for none."""
    first_BT = input_ids_BT.gather(1, owner_BT.clamp(min=0))  # the word's first piece
    type_BT = torch.full_like(input_ids_BT, -1)
    for k, ids in reversed(list(enumerate(text.scene_ids))):  # reversed: the first listed type wins
        is_k_BT = eligible_BT & torch.isin(first_BT, torch.tensor(ids, device=input_ids_BT.device, dtype=torch.long))
        type_BT = torch.where(is_k_BT, torch.full_like(type_BT, k), type_BT)
    return type_BT


def mask_scene_graph(
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    text: TextSpec,
    prob: float = NODE_PROB,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(masked_ids_BT, labels_BT, node_type_B): per sample, one node type uniformly among those its
    caption has, then round(prob * n) of its n words of that type (at least one), uniformly without
    replacement, whole words, 80/10/10 per word. node_type_B is -1 (nothing masked) for a caption
    without scene-graph words."""
    B, T = input_ids_BT.shape
    device = input_ids_BT.device
    eligible_BT = maskable(input_ids_BT, attention_mask_BT, text)
    owner_BT = word_owner(input_ids_BT, eligible_BT, text)
    type_BT = node_types(input_ids_BT, eligible_BT, owner_BT, text)
    start_BT = eligible_BT & (owner_BT == torch.arange(T, device=device))  # first piece of each word

    present_BK = torch.stack([(start_BT & (type_BT == k)).any(1) for k in range(len(NODE_TYPES))], 1)
    score_BK = torch.where(present_BK, uniform(tuple(present_BK.shape), device, generator), -1.0)
    chosen_B = torch.where(present_BK.any(1), score_BK.argmax(1), -1)

    candidate_BT = start_BT & (type_BT == chosen_B[:, None]) & (chosen_B[:, None] >= 0)
    n_B = candidate_BT.sum(1)
    budget_B = torch.where(n_B > 0, (prob * n_B).round().clamp(min=1), 0)
    # A uniform random order of each sample's candidate words; the first `budget` of them are masked.
    score_BT = torch.where(candidate_BT, uniform((B, T), device, generator), -1.0)
    rank_BT = score_BT.argsort(dim=1, descending=True).argsort(dim=1)
    chosen_start_BT = candidate_BT & (rank_BT < budget_B[:, None])
    owner0_BT = owner_BT.clamp(min=0)
    selected_BT = eligible_BT & chosen_start_BT.gather(1, owner0_BT)
    how_BT = uniform((B, T), device, generator).gather(1, owner0_BT)
    masked_BT, labels_BT = corrupt(input_ids_BT, selected_BT, how_BT, text, generator)
    return masked_BT, labels_BT, chosen_B


def scene_graph_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Caption with one node type's words masked + its own image (matched pairs only, as MLM);
    adds `sgp_labels` [B,T] and `sgp_node_type` [B] (index into NODE_TYPES, -1 none)."""
    view = encoder_inputs(batch)
    view["input_ids"], view["sgp_labels"], view["sgp_node_type"] = mask_scene_graph(
        batch["input_ids"], batch["attention_mask"], text, generator=generator
    )
    return view


class SceneGraphPrediction(TokenPrediction):
    """ERNIE-ViL's object / attribute / relation prediction: MLM's head (tied decoder) on the masked
    node words, one cross-entropy over all of them; needs `cross_modal` (the point is to recover
    the node from the image: on a dual encoder it would be text-only MLM on a few words)."""

    name: ClassVar[str] = "sgp"
    view: ClassVar[str] = "scene_graph"
    labels_key: ClassVar[str] = "sgp_labels"
    requires: ClassVar[frozenset[str]] = frozenset({"text_hidden", "cross_modal"})

    @classmethod
    def text_problems(cls, text: TextSpec) -> list[str]:
        if any(text.scene_ids):
            return []
        return [f"objective {cls.name!r} needs scene-graph words (TextSpec.scene_object_ids / scene_attribute_ids / "
                "scene_relation_ids: the token ids of object, attribute and relation words), and this TextSpec has "
                "none; a run fills them from its tokenizer and the dataset card's scene_words "
                "(jobs/data/datasets/card.py)"]

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits_NV, labels_N = self.predict(outputs, view_batch)
        loss, _ = cross_entropy_and_accuracy(logits_NV, labels_N)
        labels_BT = view_batch[self.labels_key]
        type_N = view_batch["sgp_node_type"][:, None].expand_as(labels_BT)[labels_BT != IGNORE_INDEX]
        correct_N = logits_NV.argmax(-1) == labels_N
        metrics = {}
        for k, short in enumerate(NODE_TYPES):
            of_k_N = type_N == k
            metrics[f"sgp_{short}_acc"] = ((correct_N & of_k_N).sum().float() / of_k_N.sum().clamp(min=1)).detach()
        return {"sgp": loss}, metrics
