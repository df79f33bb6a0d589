"""Whole-word masking, ITM with mined hard negatives, scene-graph prediction: rates, choices and
loss values on hand-built captions with known answers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import TextSpec
from models.factory import objective_problems
from models.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    ImageTextMatchingHard,
    ObjectiveContext,
    SceneGraphPrediction,
    WholeWordMasking,
    itm_hard_pairs_view,
    mask_words,
)
from models.objectives.masked import word_owner
from models.objectives.matching import caption_similarity, mine_hard_negatives
from models.objectives.scene_graph import NODE_TYPES, mask_scene_graph
from tests.unit.conftest import build, make_batch, tiny
from tests.unit.test_objectives import SPECIALS, captions, image_batch
from tests.unit.test_objectives import TEXT as PLAIN

CONTINUATION = tuple(range(40, 50))  # "##" pieces among the ids 5..49 that `captions` draws
TEXT = dataclasses.replace(PLAIN, continuation_ids=CONTINUATION)
OBJ, ATTR, REL = (10, 11, 12), (20, 21, 22), (30, 31)
SCENE = dataclasses.replace(TEXT, scene_object_ids=OBJ, scene_attribute_ids=ATTR, scene_relation_ids=REL)
C, S, P, M = TEXT.cls_id, TEXT.sep_id, TEXT.pad_id, TEXT.mask_id


def _ctx(text: TextSpec, hidden: int = 8) -> ObjectiveContext:
    return ObjectiveContext(hidden_size=hidden, text=text, word_embeddings=nn.Embedding(text.vocab_size, hidden))


class _Perfect(nn.Module):
    """hidden = one-hot of the answer -> confident, right logits."""

    def forward(self, h_NV: Tensor) -> Tensor:
        return 100.0 * h_NV


# ------------------------------------------------------------------------------ whole-word masking

def test_word_owner_groups_continuation_pieces_with_their_word() -> None:
    #        [CLS] a  ##b ##c  d  ##e [SEP] [PAD]   and a "##" right after [CLS] starts its own word
    ids = torch.tensor([[C, 5, 41, 42, 6, 43, S, P], [C, 44, 45, 7, S, P, P, P]])
    mask = (ids != P).long()
    eligible = mask.bool() & ~torch.isin(ids, SPECIALS)
    assert word_owner(ids, eligible, TEXT).tolist() == [[-1, 1, 1, 1, 4, 4, -1, -1], [-1, 1, 1, 3, -1, -1, -1, -1]]
    assert word_owner(ids, eligible, PLAIN).tolist()[0] == [-1, 1, 2, 3, 4, 5, -1, -1]  # no pieces known: tokens


def test_whole_word_masking_rates_and_words_stay_whole() -> None:
    ids, mask = captions(20_000)
    masked, labels = mask_words(ids, mask, TEXT, generator=torch.Generator().manual_seed(0))
    eligible = mask.bool() & ~torch.isin(ids, SPECIALS)
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(masked[~selected], ids[~selected])
    assert not selected[~eligible].any()
    # a continuation piece is selected exactly when the piece before it (same word) is
    follows = torch.isin(ids[:, 1:], torch.tensor(CONTINUATION)) & eligible[:, 1:] & eligible[:, :-1]
    assert follows.sum() > 10_000
    assert torch.equal(selected[:, 1:][follows], selected[:, :-1][follows])
    # 15 % of words
    owner = word_owner(ids, eligible, TEXT)
    starts = eligible & (owner == torch.arange(ids.shape[1]))
    assert abs(selected[starts].float().mean().item() - 0.15) < 0.01
    # 80/10/10 per word: a selected word is all [MASK], all itself, or (the 10 % random) neither
    is_mask, is_same = masked == M, masked == ids
    words = [(b, t) for b, t in starts.nonzero().tolist() if selected[b, t]]
    all_mask = all_same = 0
    for b, t in words:
        span = owner[b] == t
        assert is_mask[b][span].all() or not is_mask[b][span].any()  # never half masked
        all_mask += int(is_mask[b][span].all())
        all_same += int(is_same[b][span].all())
    n = len(words)
    assert abs(all_mask / n - 0.8) < 0.02 and abs(all_same / n - 0.1) < 0.02
    assert abs((n - all_mask - all_same) / n - 0.1) < 0.02
    assert not torch.isin(masked[selected & ~is_mask & ~is_same], SPECIALS).any()  # random pieces: never special


def test_whole_word_masking_needs_continuation_pieces() -> None:
    with pytest.raises(ValueError, match=r"objective 'mlm_wwm' needs the tokenizer's word-continuation pieces"):
        WholeWordMasking(_ctx(PLAIN))
    assert WholeWordMasking.text_problems(TEXT) == []


def test_whole_word_masking_loss_of_a_perfect_predictor_is_zero_under_its_own_names() -> None:
    V = TEXT.vocab_size
    wwm = WholeWordMasking(_ctx(TEXT, hidden=V))
    wwm.head = _Perfect()
    ids, mask = captions(16)
    _, labels = mask_words(ids, mask, TEXT, prob=0.5)
    hidden = F.one_hot(labels.clamp(min=0), V).float()
    losses, metrics = wwm({"text_hidden": hidden}, {"mlm_labels": labels})
    assert set(losses) == {"mlm_wwm"} and set(metrics) == {"mlm_wwm_acc"}
    assert losses["mlm_wwm"].item() < 1e-6 and metrics["mlm_wwm_acc"].item() == 1.0
    losses, metrics = wwm({"text_hidden": hidden.roll(1, dims=-1)}, {"mlm_labels": labels})
    assert losses["mlm_wwm"].item() > 10 and metrics["mlm_wwm_acc"].item() == 0.0


# ---------------------------------------------------------------------------- ITM, hard negatives

def _hard_batch() -> tuple[Tensor, Tensor]:
    """Caption 1 shares 4 of its 5 words with caption 0 (cosine 0.8); captions 2-5 share none with it."""
    rows = [[10, 11, 12, 13, 14], [10, 11, 12, 13, 15], [20, 21, 22, 23, 24], [25, 26, 27, 28, 29],
            [30, 31, 32, 33, 34], [35, 36, 37, 38, 39]]
    ids = torch.tensor([[C, *r, S, P] for r in rows])
    return ids, (ids != P).long()


def test_caption_similarity_is_the_cosine_of_word_counts_without_specials() -> None:
    ids = torch.tensor([[C, 10, 11, S, P], [C, 10, 12, S, P], [C, 13, 13, S, P], [C, S, P, P, P]])
    sim = caption_similarity(ids, (ids != P).long(), TEXT)
    assert sim[0, 1].item() == pytest.approx(0.5)  # with [CLS]/[SEP] counted it would be 3/4
    assert sim[0, 2].item() == 0.0 and sim[2, 2].item() == pytest.approx(1.0)
    assert sim[3].tolist() == [0.0, 0.0, 0.0, 0.0]  # a caption without words is like nothing


def test_the_mined_negative_is_the_similar_caption_drawn_from_the_softmax() -> None:
    ids, mask = _hard_batch()
    g = torch.Generator().manual_seed(0)
    rows = torch.zeros(4000, dtype=torch.long)  # sample 0, 4000 times
    sharp = mine_hard_negatives(ids, mask, TEXT, rows, tau=0.05, generator=g)
    assert (sharp != 0).all()  # never itself
    assert (sharp == 1).float().mean() > 0.99  # e^16 against 4 * e^0
    # sampled, not the argmax: at tau 0.5, P(1) = e^1.6 / (e^1.6 + 4) = 0.553, the rest share 0.447
    soft = mine_hard_negatives(ids, mask, TEXT, rows, tau=0.5, generator=g)
    p1 = torch.e ** 1.6 / (torch.e ** 1.6 + 4)
    assert abs((soft == 1).float().mean().item() - p1) < 0.025
    for j in range(2, 6):
        assert abs((soft == j).float().mean().item() - (1 - p1) / 4) < 0.02


def test_identical_captions_are_no_negatives_unless_there_is_nothing_else() -> None:
    ids, mask = _hard_batch()
    ids[2], mask[2] = ids[0], mask[0]  # caption 2 = caption 0: the most similar, and no negative
    mined = mine_hard_negatives(ids, mask, TEXT, torch.zeros(2000, dtype=torch.long), tau=0.05,
                                generator=torch.Generator().manual_seed(0))
    assert not torch.isin(mined, torch.tensor([0, 2])).any() and (mined == 1).float().mean() > 0.99
    same, same_mask = ids[:1].expand(4, -1).clone(), mask[:1].expand(4, -1).clone()
    fallback = mine_hard_negatives(same, same_mask, TEXT, torch.zeros(3000, dtype=torch.long),
                                   generator=torch.Generator().manual_seed(0))
    assert (fallback != 0).all()
    assert all(abs((fallback == j).float().mean().item() - 1 / 3) < 0.03 for j in (1, 2, 3))


def test_itm_hard_view_swaps_half_with_mined_images() -> None:
    ids, mask = _hard_batch()
    batch = image_batch(ids, mask)
    g = torch.Generator().manual_seed(0)
    matched, zero_gets = [], []
    for _ in range(600):
        view = itm_hard_pairs_view(batch, TEXT, g)
        source = view["image"][:, 0, 0, 0].long()
        assert torch.equal(view["itm_labels"], (source == torch.arange(6)).long())  # distinct captions
        assert torch.equal(view["input_ids"], ids)
        matched.append(view["itm_labels"].float().mean())
        if source[0] != 0:
            zero_gets.append(source[0].item())
    assert abs(torch.stack(matched).mean().item() - 0.5) < 1e-6  # B even: exactly 3 of 6 every time
    assert len(zero_gets) > 200 and sum(j == 1 for j in zero_gets) / len(zero_gets) > 0.95


def test_itm_hard_runs_next_to_itm_with_its_own_head_and_names() -> None:
    model = build("vilt", {"itm": 1.0, "itm_hard": 1.0}, text=TEXT)
    assert isinstance(model.objectives["itm_hard"], ImageTextMatchingHard)
    assert model.objectives["itm"].head.weight is not model.objectives["itm_hard"].head.weight
    assert set(model.views) == {"itm_pairs", "itm_hard_pairs"}
    out = model(make_batch(), torch.Generator().manual_seed(0))
    assert set(out["losses"]) == {"itm", "itm_hard"} and {"itm_acc", "itm_hard_acc"} <= set(out["metrics"])
    assert out["loss"].item() == pytest.approx((out["losses"]["itm"] + out["losses"]["itm_hard"]).item(), rel=1e-5)


# -------------------------------------------------------------------------- scene-graph prediction

def test_scene_graph_masks_30_percent_of_one_node_type_per_sample() -> None:
    # six objects, seven attributes, one relation word; a two-piece object word (10 ##45) at 13-14
    full = [C, 10, 20, 5, 11, 21, 22, 30, 12, 20, 6, 10, 21, 10, 45, 22, 7, 11, 20, S]
    no_rel = [C, 10, 20, 5, 11, 21, 6, S] + [P] * 12
    none = [C, 5, 6, 7, S] + [P] * 15
    ids = torch.tensor([full, no_rel, none]).repeat(2000, 1)
    mask = (ids != P).long()
    text = dataclasses.replace(SCENE, continuation_ids=(45,))
    masked, labels, node = mask_scene_graph(ids, mask, text, generator=torch.Generator().manual_seed(0))
    selected = labels != IGNORE_INDEX
    kinds = {0: OBJ + (45,), 1: ATTR, 2: REL}
    expected = {0: 2, 1: 2, 2: 1}  # round(0.3 * 6) = 2 objects, round(0.3 * 7) = 2 attributes, >= 1 relation
    full_rows, no_rel_rows, none_rows = (torch.arange(r, ids.shape[0], 3) for r in range(3))
    for rows in (full_rows, no_rel_rows):
        for b in rows[:300].tolist():
            k = node[b].item()
            assert torch.isin(ids[b][selected[b]], torch.tensor(kinds[k])).all()
            words = selected[b] & (ids[b] != 45)  # the word "10 ##45" counts once
            assert words.sum().item() == (expected[k] if b % 3 == 0 else 1)
            if selected[b, 13] or selected[b, 14]:
                assert selected[b, 13] and selected[b, 14]  # a word's pieces go together
    # the type is uniform among those the caption has
    for rows, present in ((full_rows, (0, 1, 2)), (no_rel_rows, (0, 1))):
        share = torch.bincount(node[rows], minlength=3).float() / rows.numel()
        for k in range(3):
            assert abs(share[k].item() - (1 / len(present) if k in present else 0.0)) < 0.04
    assert (node[none_rows] == -1).all() and not selected[none_rows].any()
    # 80/10/10 per word, over all masked tokens
    n = selected.sum()
    assert abs(((masked == M) & selected).sum() / n - 0.8) < 0.02
    assert abs(((masked == ids) & selected).sum() / n - 0.1) < 0.02


def test_scene_graph_prediction_needs_scene_words() -> None:
    with pytest.raises(ValueError, match=r"objective 'sgp' needs scene-graph words"):
        SceneGraphPrediction(_ctx(TEXT))
    assert SceneGraphPrediction.text_problems(SCENE) == []
    assert SceneGraphPrediction.text_problems(dataclasses.replace(TEXT, scene_relation_ids=REL)) == []


def test_scene_graph_loss_and_accuracy_per_node_type() -> None:
    V = SCENE.vocab_size
    sgp = SceneGraphPrediction(_ctx(SCENE, hidden=V))
    sgp.head = _Perfect()
    labels = torch.full((3, 4), IGNORE_INDEX)
    labels[0, 1], labels[0, 2] = 10, 11  # an object sample, two masked words
    labels[1, 3] = 20  # an attribute sample
    node = torch.tensor([0, 1, -1])
    right = F.one_hot(labels.clamp(min=0), V).float()
    hidden = right.clone()
    hidden[1] = right[1].roll(1, dims=-1)  # wrong on the attribute
    losses, metrics = sgp({"text_hidden": hidden}, {"sgp_labels": labels, "sgp_node_type": node})
    assert set(losses) == {"sgp"} and set(metrics) == {f"sgp_{k}_acc" for k in NODE_TYPES}
    assert metrics["sgp_obj_acc"].item() == 1.0 and metrics["sgp_attr_acc"].item() == 0.0
    assert metrics["sgp_rel_acc"].item() == 0.0  # none masked in this batch
    assert losses["sgp"].item() == pytest.approx(100.0 / 3, rel=1e-4)  # one of three tokens off by a logit gap of 100


def test_new_objectives_build_and_train_through_the_factory() -> None:
    model = build("uniter", {"mlm_wwm": 1.0, "sgp": 1.0, "itm_hard": 1.0}, text=SCENE)
    batch = make_batch()
    batch["input_ids"][:, 1:4] = torch.tensor([10, 20, 30])  # every caption names a scene node of each type
    out = model(batch, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert set(out["losses"]) == {"mlm_wwm", "sgp", "itm_hard"}
    assert all(torch.isfinite(v) and v > 0 for v in out["losses"].values())
    heads = [n for n, p in model.named_parameters() if n.startswith("objectives.") and p.grad is None]
    assert heads == []


@pytest.mark.parametrize("preset, objective, missing", [
    ("clip", "itm_hard", "'pooled'"), ("clip", "sgp", "'cross_modal'"), ("vilt", "sgp", None),
    ("clip", "mlm_wwm", None), ("vilbert", "itm_hard", None), ("lxmert", "sgp", None)])
def test_preset_fit_of_the_new_objectives(preset: str, objective: str, missing: str | None) -> None:
    problems = objective_problems(tiny(preset=preset), {objective: 1.0})
    if missing is None:
        assert problems == []
    else:
        ((field, _, allowed),) = problems
        assert field == f"objectives.{objective}" and allowed.startswith(f"needs {missing}")
    assert objective in OBJECTIVES


def test_run_config_cross_check_names_the_new_objectives_a_preset_cannot_serve() -> None:
    from jobs.config import RunConfig, cross_check

    objectives = {"mlm_wwm": 1.0, "sgp": 1.0, "itm_hard": 1.0}
    clip = cross_check(RunConfig.model_validate({"model": {"preset": "clip"}, "objectives": objectives}))
    assert [(field, why.split(",")[0]) for field, _, why in clip] == [
        ("objectives.sgp", "needs 'cross_modal'"), ("objectives.itm_hard", "needs 'pooled'")]
    assert cross_check(RunConfig.model_validate({"model": {"preset": "uniter"}, "objectives": objectives})) == []
