"""Fine-tuning heads on the factories' encoders: shapes, losses against hand computation, freezing,
and `--labels` subsetting of the labelled splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.transfer import labelled as lab
from models.config import MoEConfig
from models.finetuner import build_finetuner
from tests.unit.conftest import IMAGE, TEXT, B, make_batch, tiny

D = 32


def finetuner(preset: str, objectives: dict[str, float], head: str, classes: int = 5, frozen: bool = False):  # noqa: ANN201
    torch.manual_seed(0)
    return build_finetuner(tiny(preset), MoEConfig(), objectives, TEXT, IMAGE, head=head, task="t",
                           classes=classes, frozen=frozen)


def labelled_batch(classes: int) -> dict[str, torch.Tensor]:
    return {**make_batch(), "label": torch.arange(B) % classes}


@pytest.mark.parametrize(("preset", "objectives", "features"), [("clip", {"itc": 1.0}, D),  # image embed
                                                                ("vilt", {"mlm": 1.0}, D)])  # mean image states
def test_probe_is_linear_on_frozen_features(preset: str, objectives: dict[str, float], features: int) -> None:
    model = finetuner(preset, objectives, "probe", classes=5, frozen=True).train()
    assert model.head.linear.in_features == features and model.head.linear.out_features == 5
    assert not model.encoder.training  # frozen: no dropout in the features
    batch = labelled_batch(5)
    out = model(batch)
    logits = model.scores(batch)
    assert logits.shape == (B, 5)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, batch["label"]).item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.linear.weight.grad is not None and model.head.linear.weight.grad.abs().sum() > 0
    assert set(out["metrics"]) == {"t_acc"} and set(out["losses"]) == {"t"}


@pytest.mark.parametrize(("preset", "objectives", "features"), [("vilt", {"itm": 1.0}, D),  # ITM pooler
                                                                ("vilt", {"mlm": 1.0}, D),  # [CLS] state
                                                                ("clip", {"itc": 1.0}, 3 * D)])  # [t, i, t*i]
def test_vqa_head_classifies_answers_and_trains_the_encoder(preset: str, objectives: dict[str, float],
                                                          features: int) -> None:
    model = finetuner(preset, objectives, "vqa", classes=7)
    assert model.head.classifier[0].in_features == features
    batch = labelled_batch(7)
    out = model(batch)
    model.eval()
    logits = model.scores(batch)
    assert logits.shape == (B, 7)
    model.train()
    out["loss"].backward()
    assert out["loss"].item() > 0
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


def test_vqa_head_needs_a_joint_representation() -> None:
    with pytest.raises(ValueError, match="no joint image-text representation"):
        finetuner("clip", {"mlm": 1.0}, "vqa")


def test_retrieval_loss_is_clip_infonce_with_identical_captions_as_positives() -> None:
    model = finetuner("clip", {"itc": 1.0}, "retrieval").eval()
    batch = make_batch()
    batch["input_ids"][1] = batch["input_ids"][0]
    batch["attention_mask"][1] = batch["attention_mask"][0]
    out = model(batch)
    enc = model.encoder(batch)
    logits = enc["logit_scale"] * enc["image_embed"] @ enc["text_embed"].T
    target = torch.eye(B)
    target[0, 1] = target[1, 0] = 1.0
    target = target / target.sum(1, keepdim=True)
    hand = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="ITC head"):
        finetuner("vilt", {"itm": 1.0}, "retrieval")


def _arrays(n: int) -> lab.Arrays:
    return {"image": np.zeros((n, 3, 2, 2), np.uint8), "label": np.arange(n), "input_ids": np.zeros((n, 4), np.int64)}


def test_labels_subset_is_seeded_and_exact() -> None:
    a = _arrays(50)
    s1, s1_again, s2 = lab.subset(a, 10, seed=1), lab.subset(a, 10, seed=1), lab.subset(a, 10, seed=2)
    assert lab.size(s1) == 10 and len(set(s1["label"].tolist())) == 10
    assert s1["label"].tolist() == s1_again["label"].tolist() and s1["label"].tolist() != s2["label"].tolist()
    assert set(s1["label"].tolist()) <= set(range(50))
    assert lab.size(lab.subset(a, None, 0)) == 50 and lab.size(lab.subset(a, 80, 0)) == 50
    shares = [lab.rank_share(lab.subset(a, 11, 0), r, 2) for r in range(2)]
    assert [lab.size(s) for s in shares] == [5, 5]
    assert not set(shares[0]["label"].tolist()) & set(shares[1]["label"].tolist())


def test_epoch_sampler_orders_by_seed_and_resumes() -> None:
    a = _arrays(10)
    sampler = lab.EpochSampler(a, 4, seed=3)
    seen = [sampler.next()["label"].tolist() for _ in range(3)]  # 2 full batches per epoch, then epoch 1
    assert sampler.state() == {"epoch": 1, "offset": 4}
    assert len(set(seen[0] + seen[1])) == 8
    resumed = lab.EpochSampler(a, 4, seed=3, epoch=1, offset=4)
    assert resumed.next()["label"].tolist() == sampler.next()["label"].tolist()
    assert lab.EpochSampler(a, 4, seed=4).next()["label"].tolist() != seen[0]
    with pytest.raises(ValueError, match="fewer than train.batch_size"):
        lab.EpochSampler(a, 16, seed=0)


def test_splits_from_shards_honour_labels_and_hold_out_val(tmp_path) -> None:  # noqa: ANN001 - fixture
    from jobs.config import RunConfig
    from jobs.data.pipeline import PipelineSpec
    from jobs.data.synth import write_synthetic
    from jobs.storage import StorageOptions
    from jobs.transfer.finetune_loop import load_splits

    data = write_synthetic(str(tmp_path), samples=40, shards=2, seed=5, image_size=32, eval_samples=12)
    spec = PipelineSpec(tokenizer_uri=data.tokenizer, image_size=32, max_text_len=24, max_objects=3,
                        storage=StorageOptions())
    cfg = RunConfig.model_validate({"finetune": {"task": "vqa", "init": "scratch", "labels": 20, "val_samples": 8},
                                    "eval": {"max_samples": 12}})
    splits = load_splits(cfg, spec, data.train_shards, data.eval_shards)
    assert lab.size(splits.train) == 20 and splits.classes == 15
    assert lab.size(splits.val) >= 8 * 3 and lab.size(splits.test) >= 12 * 3  # >= 3 questions per image
    assert splits.train["input_ids"].shape[1] == 24 and (splits.train["obj_labels"] == -1).all()
    probe = RunConfig.model_validate({"finetune": {"task": "color", "init": "scratch", "val_samples": 8}})
    s = load_splits(probe, spec, data.train_shards, data.eval_shards)
    assert lab.size(s.train) == 32 and lab.size(s.val) == 8 and s.classes == 6
    assert int(s.train["label"].max()) < 6


def test_finetune_config_errors_name_the_field() -> None:
    from orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"finetune.task = .poetry.: allowed: shape, color, count, vqa, retrieval"):
        load_config(None, ["finetune.task=poetry", "finetune.init=scratch"])
    with pytest.raises(ConfigError, match=r"finetune.init = .*: needs from_run"):
        load_config(None, ["finetune.task=vqa"])
    with pytest.raises(ConfigError, match="finetune.labels = 0"):
        load_config(None, ["finetune.task=vqa", "finetune.init=scratch", "finetune.labels=0"])
