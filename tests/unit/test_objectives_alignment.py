"""ITC (with the cross-worker gather), IPOT word-region alignment and the evaluation metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from jobs.evaluate import _itc_retrieval, _reduce, evaluate
from models.objectives.alignment import ipot, ot_distance
from models.objectives.contrastive import clip_loss
from tests.unit import ranks
from tests.unit.conftest import TEXT, build, make_batch


def test_itc_of_aligned_embeddings_is_near_zero_and_of_uninformative_ones_log_b() -> None:
    B = 8
    eye = torch.eye(B)
    loss, acc = clip_loss(eye, eye, torch.tensor(100.0))
    assert loss.item() < 1e-3 and acc.item() == 1.0
    same = torch.nn.functional.normalize(torch.ones(B, B), dim=-1)  # every pair equally similar
    assert clip_loss(same, same, torch.tensor(100.0))[0].item() == pytest.approx(math.log(B), rel=1e-5)
    shuffled = eye[torch.randperm(B, generator=torch.Generator().manual_seed(0))]
    assert clip_loss(eye, shuffled, torch.tensor(1.0))[0].item() == pytest.approx(math.log(B), rel=0.15)


def _gather_worker(rank: int, port: int, image: torch.Tensor, text: torch.Tensor, out: str) -> None:
    ranks.join(rank, port)
    B = image.shape[0] // 2
    img = image[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    loss, _ = clip_loss(img, text[rank * B:(rank + 1) * B], torch.tensor(10.0))
    loss.backward()
    torch.save((loss.item(), img.grad), f"{out}/rank{rank}.pt")
    ranks.leave()


@pytest.mark.slow  # two spawned processes import torch (~14 s)
def test_itc_negatives_are_gathered_across_workers_with_gradients(tmp_path) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    ranks.spawn_two(_gather_worker, image, text, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full = image.clone().requires_grad_(True)
    global_loss, _ = clip_loss(full, text, torch.tensor(10.0))
    global_loss.backward()
    # each rank's local loss ranks its 4 queries against all 8: their mean is the global loss
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(global_loss.item(), rel=1e-5)
    # the gather's backward sums every rank's gradient into the slice's owner: 2 x d(global)/dx
    grads = torch.cat([results[0][1], results[1][1]])
    assert torch.allclose(grads, 2 * full.grad, atol=1e-6)


def test_ipot_plan_has_the_uniform_marginals_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 6, 7, generator=g)
    words = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    tokens = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    plan = ipot(cost, words, tokens)
    for b, (n, m) in enumerate([(5, 7), (3, 4)]):
        # the last Sinkhorn step fits the columns exactly; the rows are within IPOT's 50-step tolerance
        assert torch.allclose(plan[b, :, :m].sum(0), torch.full((m,), 1 / m), atol=1e-6)
        assert torch.allclose(plan[b, :n].sum(1), torch.full((n,), 1 / n), atol=1e-3)
        assert plan[b, n:].abs().sum() == 0 and plan[b, :, m:].abs().sum() == 0


def test_ot_distance_is_zero_for_identical_states_and_positive_otherwise() -> None:
    h = torch.nn.functional.normalize(torch.randn(1, 3, 8), dim=-1)
    ones = torch.ones(1, 3, dtype=torch.bool)
    # a permutation of the same states: the optimal plan matches each word to its twin (cost 0)
    assert ot_distance(h, h[:, [2, 0, 1]], ones, ones).item() == pytest.approx(0.0, abs=0.02)
    one = ones[:, :1]
    assert ot_distance(h[:, :1], -h[:, :1], one, one).item() == pytest.approx(2.0, abs=1e-5)  # cos = -1


def test_itc_retrieval_of_perfect_embeddings_is_recall_one() -> None:
    sums: dict[str, float] = {}

    def add(k: str, v: float) -> None:
        sums[k] = sums.get(k, 0.0) + float(v)

    eye = torch.eye(12)
    ids = torch.arange(12)  # 12 distinct images, one caption each
    _itc_retrieval([(eye[:6], eye[:6], ids[:6]), (eye[6:], eye[6:], ids[6:])], add, "cpu")
    assert sums["itc_i2t_r1"] == 12 and sums["itc_t2i_r1"] == 12 and sums["itc_text_queries"] == 12
    assert sums["itc_image_queries"] == 12
    assert sums["itc_i2t_chance_r1"] == pytest.approx(1.0)  # 12 queries x 1/12


def test_itc_retrieval_counts_every_caption_of_an_image() -> None:
    """COCO: 4 images x 5 captions. An image is one query (not five), right when ANY of its five
    captions ranks first; each caption queries the 4 distinct images (ground truth: the image id)."""
    sums: dict[str, float] = {}

    def add(k: str, v: float) -> None:
        sums[k] = sums.get(k, 0.0) + float(v)

    image_ids = torch.arange(4).repeat_interleave(5)  # rows: (image, caption) pairs, 5 per image
    images = torch.eye(4)[image_ids]
    texts = images.clone()
    texts[0:5] *= 0.5  # image 0's captions match it weakly ...
    texts[5] = torch.tensor([0.9, 1.0, 0.0, 0.0])  # ... and one of image 1's matches it better
    _itc_retrieval([(images, texts, image_ids)], add, "cpu")
    out = _reduce({**sums, "batches": 1.0}, "cpu")
    assert sums["itc_image_queries"] == 4 and sums["itc_text_queries"] == 20
    assert out["itc_candidates"] == 20 and out["itc_images"] == 4 and out["captions_per_image"] == 5.0
    # image 0 ranks image 1's caption first (a miss at R@1), then its own four: a hit at R@5
    assert out["itc_i2t_r1"] == 0.75 and out["itc_i2t_r5"] == 1.0
    assert out["itc_t2i_r1"] == 1.0  # every caption, image 1's included, still ranks its image first
    assert out["itc_i2t_chance_r1"] == pytest.approx(5 / 20) and out["itc_t2i_chance_r1"] == pytest.approx(1 / 4)


def test_evaluate_reports_grounded_and_blind_mlm_and_itm_retrieval() -> None:
    model = build("vilt", {"mlm": 1.0, "itm": 1.0})
    batches = [{**make_batch(seed=s), "image": (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)} for s in range(2)]
    ev = evaluate(model, batches, grounded_ids=list(range(5, 30)))
    for key in ("itm_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r10", "mlm_token_acc", "mlm_grounded_acc",
                "mlm_blind_acc", "mlm_blind_grounded_acc", "mlm_grounding_gain"):
        assert key in ev and math.isfinite(ev[key]), key
    assert ev["i2t_r10"] == 1.0  # 4 candidates: every true caption is in the top 10
    assert ev["mlm_grounded_tokens"] > 0 and ev["samples"] == 8
    clip = build("clip", {"itc": 1.0})
    ev = evaluate(clip, batches)
    assert ev["itc_candidates"] == 8 and 0.0 <= ev["itc_i2t_r1"] <= 1.0 and "itm_acc" not in ev


def test_the_mlm_probe_serves_every_mlm_variant_with_its_own_head() -> None:
    text = dataclasses.replace(TEXT, continuation_ids=(40, 41, 42))  # mlm_wwm needs "##" pieces
    batches = [{**make_batch(seed=s), "image": (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)} for s in range(2)]
    probe = ("mlm_token_acc", "mlm_blind_acc", "mlm_grounded_acc", "mlm_blind_grounded_acc", "mlm_grounding_gain",
             "mlm_grounded_tokens")
    # the same weights under another name (same build order, same seed): the same probe figures
    ref = evaluate(build("vilt", {"mlm": 1.0, "itm": 1.0}, text=text), batches, grounded_ids=list(range(5, 30)))
    for name in ("msm", "mlm_wwm"):
        model = build("vilt", {name: 1.0, "itm": 1.0}, text=text)
        ev = evaluate(model, batches, grounded_ids=list(range(5, 30)))
        assert {k: ev[k] for k in probe} == {k: ref[k] for k in probe}, name
        assert 0.0 <= ev["mlm_token_acc"] <= 1.0 and ev["mlm_grounded_tokens"] > 0
    captioner = build("unimo", {"caption": 1.0}, text=text)  # an LM head, but not masked modelling: no probe
    assert not any(k.startswith("mlm") for k in evaluate(captioner, batches))
