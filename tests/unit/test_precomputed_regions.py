"""Precomputed (BUTD-style) region features: from KEY.npz in the shards to the region encoder.

The end-to-end test takes the run's own path without Ray: the driver's data plan and pipeline spec
(orchestrator.run.runner), the Ray Data task body (jobs.data.pipeline._unit_batches), the batch
contract (jobs.data.batch.to_model_batch) and the model factory, and asserts that the features the
RegionInput saw are the ones stored in the shards.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.data.formats import ShardWriter
from jobs.data.regions import npz_bytes, precomputed_regions
from jobs.data.tokenizer import save_tokenizer, train_tokenizer

F = 6  # feature size of the fixture's "detector"
SAMPLES = 5


def _features(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 1 + i % 3  # 1-3 regions per image
    feats = (np.arange(n * F, dtype=np.float32).reshape(n, F) + 100 * i) / 50.0
    boxes = np.array([[4 * j, 2 * j, 20 + 4 * j, 30] for j in range(n)], dtype=np.float32)  # pixels of 32 x 32
    return feats, boxes, np.arange(n, dtype=np.int64) + i


def _shards(root: Path) -> None:
    captions = [f"a photo number {i} of a thing" for i in range(SAMPLES)]
    with ShardWriter(str(root / "train" / "00000.tar")) as w:
        for i, text in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (10 * i, 80, 160)).save(buf, format="JPEG")
            feats, boxes, labels = _features(i)
            w.write(f"{i:09d}", {"jpg": buf.getvalue(), "txt": text.encode(),
                                 "json": json.dumps({"key": f"{i:09d}", "width": 32, "height": 32}).encode(),
                                 "npz": npz_bytes(feats, boxes, labels, 32, 32)})
    save_tokenizer(train_tokenizer(captions * 4, vocab_size=100), str(root / "tokenizer.json"))


def test_region_preset_sees_the_shards_precomputed_features(tmp_path: Path) -> None:
    from jobs.data.batch import to_model_batch
    from jobs.data.local import local_items
    from jobs.data.pipeline import _unit_batches
    from models import build_pretrainer
    from models.config import ImageSpec, TextSpec
    from orchestrator.config import load_config
    from orchestrator.run.data_plan import plan_data
    from orchestrator.run.files import RunFiles
    from orchestrator.run.runner import pipeline_spec

    _shards(tmp_path)
    cfg = load_config(None, [f"data.train={tmp_path}/train", "data.eval=null", "data.image_size=32",
                             "data.max_objects=4", f"storage.path={tmp_path}", "model.preset=uniter",
                             "model.region_source=precomputed", f"model.region_feature_size={F}",
                             "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
                             "objectives={mlm: 1.0, itm: 1.0, mrfr: 1.0}"])
    files = RunFiles(cfg)
    plan = plan_data(cfg, files)
    spec = pipeline_spec(cfg, plan, files)
    items = local_items([f"{tmp_path}/train/00000.tar"], spec)
    (raw,) = list(_unit_batches(items, spec, seed=None, epoch=0, ledger=None))
    batch = to_model_batch({k: torch.as_tensor(v) for k, v in raw.items()})

    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, TextSpec(**plan.text),
                             ImageSpec(size=cfg.data.image_size))
    seen: list[torch.Tensor] = []
    region_input = model.encoder.region_embeddings
    region_input.register_forward_hook(lambda mod, args, out: seen.append(out.feats_BPF.detach().clone()))
    model.eval()
    out = model(batch)
    assert torch.isfinite(out["loss"])

    feats_BNF = seen[0]  # the first encoder pass: the clean view (the MRFR target)
    assert feats_BNF.shape == (SAMPLES, 1 + 4, F)  # whole-image token + max_objects regions
    for i in range(SAMPLES):
        want, _, _ = _features(i)
        n = want.shape[0]
        assert torch.allclose(feats_BNF[i, 1:1 + n], torch.from_numpy(want))
        assert torch.all(feats_BNF[i, 1 + n:] == 0)  # padding regions
        assert torch.allclose(feats_BNF[i, 0], torch.from_numpy(want.mean(0)))  # ViLBERT's [IMG] = mean
    boxes = batch["region_boxes"][2]
    assert torch.allclose(boxes[:3], torch.tensor([[0, 0, 20, 30], [4, 2, 24, 30], [8, 4, 28, 30]]) / 32.0)
    assert batch["region_labels"][2].tolist() == [2, 3, 4, -1]


def test_npz_layouts_of_the_extractors(tmp_path: Path) -> None:
    """py-bottom-up-attention (x, bbox, image_w/h), UNITER (features, norm_bb, soft_labels) and a
    pickled member (never unpickled)."""
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((2, 3), np.float32), bbox=np.array([[0, 0, 50, 100], [10, 10, 20, 20]]),
             image_w=np.array(100), image_h=np.array(200), info=np.array([{"objects_id": [1, 2]}], dtype=object))
    feats, boxes, labels = precomputed_regions("", 3, buf.getvalue())
    assert feats.shape == (3, 3) and feats[:2].sum() == 6
    assert np.allclose(boxes[:2], [[0.0, 0.0, 0.5, 0.5], [0.1, 0.05, 0.2, 0.1]])
    assert labels.tolist() == [-1, -1, -1]  # the classes were only in the pickled `info`
    buf = io.BytesIO()
    soft = np.zeros((2, 5), np.float32)
    soft[0, 3], soft[1, 1] = 1.0, 1.0  # background is column 0
    np.savez(buf, features=np.zeros((2, 4), np.float32), norm_bb=np.array([[0, 0, 0.5, 0.5, 0.5, 0.5, 0.25]] * 2),
             soft_labels=soft)
    _, boxes, labels = precomputed_regions("", 2, buf.getvalue())
    assert labels.tolist() == [2, 0]
    assert boxes.tolist() == [[0.0, 0.0, 0.5, 0.5]] * 2  # UNITER's 7-d norm_bb: first four are the box
    assert precomputed_regions("", 2, b"not an npz") is None
