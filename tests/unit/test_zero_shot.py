"""Zero-shot classification: prompt embedding, CLIP's ensembling, the classifier against hand-computed
similarities, shapes-world task labels, and the eval-time transfer figures on real shards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jobs.transfer.tasks import ANSWERS, SHAPES_TASKS, questions, user_task
from models import build_pretrainer
from models.config import MoEConfig
from models.zero_shot import (
    blank_visual,
    class_embeddings,
    embed_texts,
    ensemble,
    topk_correct,
    zero_shot_logits,
)
from tests.unit.conftest import IMAGE, TEXT, make_batch, tiny


def test_ensemble_is_the_renormalised_mean_of_normalised_prompts() -> None:
    prompts_CKE = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[1.0, 0.0], [10.0, 0.0]]])
    # class 0: (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9); class 1: (1, 0) both
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], [1.0, 0.0]])
    assert torch.allclose(ensemble(prompts_CKE), expected, atol=1e-6)


def test_classifier_matches_hand_computed_similarities() -> None:
    classes_CE = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    images_NE = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 1.0, 1.5]])
    logits = zero_shot_logits(images_NE, classes_CE)
    hand = torch.tensor([[2 / math.sqrt(5), 1 / math.sqrt(5), 0.0],
                         [0.0, 0.5 / math.sqrt(9.25), 3 / math.sqrt(9.25)],
                         [1 / math.sqrt(4.25), 1 / math.sqrt(4.25), 1.5 / math.sqrt(4.25)]])
    assert torch.allclose(logits, hand, atol=1e-6)
    labels = torch.tensor([0, 1, 2])  # predictions are 0, 2, 2
    assert int(topk_correct(logits, labels, 1)) == 2
    assert int(topk_correct(logits, labels, 2)) == 3
    assert int(topk_correct(logits, labels, 5)) == 3  # k capped at C


@pytest.mark.parametrize("preset", ["clip", "vilt"])
def test_class_embeddings_embed_each_prompt_and_ensemble(preset: str) -> None:
    torch.manual_seed(0)
    model = build_pretrainer(tiny(preset), MoEConfig(), {"itc": 1.0}, TEXT, IMAGE).eval()
    batch = make_batch()
    C, K = 2, 3
    ids_CKT = batch["input_ids"][:3].repeat(2, 1).view(C, K, -1)
    ids_CKT[1, :, 1] = 7  # class 1's prompts differ from class 0's
    mask_CKT = batch["attention_mask"][:3].repeat(2, 1).view(C, K, -1)
    visual = blank_visual(batch, C * K)
    got = class_embeddings(model.encoder, ids_CKT, mask_CKT, visual)
    one_by_one = torch.stack([
        torch.stack([embed_texts(model.encoder, ids_CKT[c, k][None], mask_CKT[c, k][None], blank_visual(batch, 1))[0]
                     for k in range(K)]) for c in range(C)])
    assert got.shape == (C, 32)
    assert torch.allclose(got, ensemble(one_by_one), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(C), atol=1e-5)
    assert not torch.allclose(got[0], got[1])


SCENE = {"objects": [{"shape": "circle", "color": "red", "size": "small", "bbox": [1, 1, 7, 7]},
                     {"shape": "square", "color": "blue", "size": "large", "bbox": [20, 20, 32, 32]}],
         "relations": [{"subject": 0, "relation": "above", "object": 1}]}


def test_shapes_world_labels_come_from_the_scene() -> None:
    meta = {"scene": SCENE}
    assert SHAPES_TASKS["shape"].classes[SHAPES_TASKS["shape"].label(meta)] == "circle"
    assert SHAPES_TASKS["color"].classes[SHAPES_TASKS["color"].label(meta)] == "red"
    assert SHAPES_TASKS["count"].classes[SHAPES_TASKS["count"].label(meta)] == "two"
    assert SHAPES_TASKS["shape"].label({}) is None
    assert {len(p) for t in SHAPES_TASKS.values() for p in t.prompts} == {4, 8}
    pets = user_task("pets", "label", ["cat", "dog"], ["a photo of a {}."])
    assert pets.label({"label": "dog"}) == 1 and pets.label({"label": 0}) == 0 and pets.label({"label": "cow"}) is None
    assert pets.prompts == (("a photo of a cat.",), ("a photo of a dog.",))


def test_vqa_questions_are_true_of_the_scene() -> None:
    qa = {kind: (q, ANSWERS[a]) for kind, q, a in questions({"scene": SCENE}, "k0")}
    assert set(qa) == {"color", "count", "relation", "yesno"}
    assert qa["count"] == ("how many objects", "two")
    assert qa["relation"] == ("where is the red circle relative to the blue square", "above")
    q, a = qa["color"]
    assert a == {"circle": "red", "square": "blue"}[q.split()[-1]]
    q, a = qa["yesno"]
    present = (q.split()[-2], q.split()[-1]) in {("red", "circle"), ("blue", "square")}
    assert a == ("yes" if present else "no")
    answers = [ANSWERS[a] for k in range(40) for kind, _, a in questions({"scene": SCENE}, f"k{k}") if kind == "yesno"]
    assert 10 < answers.count("yes") < 30  # about half


def test_transfer_eval_on_shards(tmp_path) -> None:  # noqa: ANN001 - fixture
    from jobs.data.pipeline import PipelineSpec
    from jobs.data.synth import write_synthetic
    from jobs.data.tokenizer import load_tokenizer, text_spec
    from jobs.storage import StorageOptions
    from jobs.transfer.config import ZeroShotConfig
    from jobs.transfer.zero_shot import transfer_eval
    from models.config import ImageSpec

    data = write_synthetic(str(tmp_path), samples=8, shards=1, seed=3, image_size=32, eval_samples=48)
    text = text_spec(load_tokenizer(data.tokenizer), 24)
    spec = PipelineSpec(tokenizer_uri=data.tokenizer, image_size=32, max_text_len=24, max_objects=3,
                        storage=StorageOptions())
    torch.manual_seed(0)
    model = build_pretrainer(tiny("clip"), MoEConfig(), {"itc": 1.0}, text, ImageSpec(size=32))
    out = transfer_eval(model, ZeroShotConfig(max_samples=48), spec, data.eval_shards, rank=0, world=1,
                        batch_size=16, device="cpu")
    for task, classes in (("shape", 4), ("color", 6), ("count", 3)):
        assert 0.0 <= out[f"zs_{task}_top1_acc"] <= 1.0
        assert out[f"zs_{task}_chance"] == pytest.approx(1 / classes)
        assert 0.0 <= out[f"probe_{task}_acc"] <= 1.0
    assert out["zs_color_top5_acc"] >= out["zs_color_top1_acc"]
    assert "zs_shape_top5_acc" not in out  # 4 classes: top-5 is trivially 1
    vilt = build_pretrainer(tiny("vilt"), MoEConfig(), {"itm": 1.0}, text, ImageSpec(size=32))
    no_itc = transfer_eval(vilt, ZeroShotConfig(max_samples=48), spec, data.eval_shards, rank=0, world=1,
                           batch_size=16, device="cpu")
    assert sorted(no_itc) == ["probe_color_acc", "probe_count_acc", "probe_shape_acc"]


def test_ridge_probe_separates_separable_classes() -> None:
    from jobs.transfer.zero_shot import ridge_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(60, 3, generator=g)
    assert ridge_probe(x[:30], y[:30], x[30:], y[30:], 3) == 1.0
    noise = torch.randn(60, 3, generator=g)
    assert ridge_probe(noise[:30], y[:30], noise[30:], y[30:], 3) < 0.8
