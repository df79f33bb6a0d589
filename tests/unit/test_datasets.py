"""`mmpt data prepare` on each layout users have on disk, and what the run takes from the card
(no Ray): labels, scene-graph words, grounded words, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.data.datasets.card import find_card
from jobs.data.datasets.layouts import Inputs, prepare
from jobs.data.datasets.vocab import format_vocab, name_index, parse_vocab
from jobs.data.formats import iter_shard
from orchestrator.cli.main import app
from tests import dataset_layouts as layouts


def _metas(shards: list[str]) -> list[dict]:
    return [json.loads(s.parts["json"]) for shard in shards for s in iter_shard(shard)]


def test_coco_captions_and_instances(tmp_path: Path) -> None:
    src = layouts.coco(tmp_path / "coco", images=4)
    result = CliRunner().invoke(app, ["data", "prepare", "--layout", "coco", "--images", str(src["images"]),
                                      "--captions", str(src["captions"]), "--instances", str(src["instances"]),
                                      "--out", str(tmp_path / "out"), "--eval-images", "1", "--vocab-size", "100"])
    assert result.exit_code == 0, result.output
    assert "wrote 20 samples of 4 images" in result.output
    train, evals = sorted((tmp_path / "out" / "train").glob("*.tar")), sorted((tmp_path / "out" / "eval").glob("*.tar"))
    metas, eval_metas = _metas([str(p) for p in train]), _metas([str(p) for p in evals])
    assert len(metas) == 15 and len(eval_metas) == 5  # the held-out image keeps all five captions
    assert [m["image_id"] for m in metas[:5]] == [1000] * 5 and {m["image_id"] for m in eval_metas} == {1021}
    obj = metas[0]["scene"]["objects"][0]
    assert obj["name"] in {"person", "car", "dog", "chair"} and len(obj["bbox"]) == 4 and obj["bbox"][2] > obj["bbox"][0]
    card = find_card([str(train[0])])
    assert card is not None and card.layout == "coco" and card.captions_per_image == 5.0
    assert set(card.fields) == {"image_id", "boxes", "object_labels"}  # COCO has no scene graph
    assert [c[0] for c in card.classes] == ["person", "car", "dog", "chair"]  # by category id
    assert card.grounded_words == ("person", "car", "dog", "chair") and card.scene_words == {}


def test_visual_genome_regions_with_scene_graph(tmp_path: Path) -> None:
    src = layouts.visual_genome(tmp_path / "vg")
    res = prepare("vg", Inputs(images=str(src["images"]), captions=str(src["captions"]), objects=str(src["objects"]),
                               relationships=str(src["relationships"])), str(tmp_path / "out"), vocab_size=100)
    metas = _metas(res.shards)
    regions = json.loads(src["captions"].read_text())
    assert res.samples == sum(len(e["regions"]) for e in regions) and res.images == 3 and not res.skipped
    assert all(m["caption"].startswith("a ") and len(m["region"]) == 4 for m in metas)
    with_rel = next(m for m in metas if m["scene"]["relations"])
    assert with_rel["scene"]["relations"][0]["relation"] == "next to"
    assert with_rel["scene"]["objects"][0]["attributes"][0] in layouts.COLOURS
    card = find_card(res.shards)
    assert "scene_graph" in card.fields and "object_labels" in card.fields
    assert card.scene_words["relation"] == ("next",)  # "to" names no relation on its own
    assert set(card.scene_words["attribute"]) <= set(layouts.COLOURS)
    assert set(card.scene_words["object"]) == {c[0] for c in card.classes} == set(card.grounded_words)


def test_cc3m_tsv_finds_downloaded_images_and_lists_the_missing(tmp_path: Path) -> None:
    src = layouts.cc3m(tmp_path)
    res = prepare("cc3m", Inputs(images=str(src["images"]), captions=str(src["captions"])), str(tmp_path / "out"),
                  vocab_size=100)
    assert res.samples == 3 and res.skipped == [("3.jpg", "missing image")]  # the url's file name, tried first
    metas = _metas(res.shards)
    assert metas[0]["url"] == "http://example.com/pics/0.jpg?x=1" and metas[0]["image_id"] == metas[0]["url"]
    assert find_card(res.shards).fields == ("image_id",)  # captions only: no labels, no scene graph


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_img2dataset_output_as_it_is(tmp_path: Path, fmt: str) -> None:
    src = layouts.img2dataset(tmp_path, fmt)
    res = prepare("img2dataset", Inputs(images=str(src["images"])), str(tmp_path / "out"), vocab_size=100)
    metas = _metas(res.shards)
    assert res.samples == 3  # the failed download is left out
    assert [m["url"] for m in metas] == ["http://example.com/0.jpg", "http://example.com/2.jpg", "http://example.com/3.jpg"]
    assert metas[0]["original_width"] == 128 and metas[0]["caption"].endswith("square")


def test_prepare_names_what_a_layout_needs(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", "--layout", "coco", "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--layout coco needs --captions" in result.output
    result = runner.invoke(app, ["data", "prepare", "--layout", "flickr", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--layout flickr: allowed: folder, coco, vg, cc3m, img2dataset" in result.output
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"images": []}))
    result = runner.invoke(app, ["data", "prepare", "--layout", "coco", "--images", str(tmp_path), "--captions",
                                 str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a COCO annotation file (no annotations)" in result.output


def test_butd_vocabulary_file_format() -> None:
    vocab = parse_vocab("person,man,people\ncar\ntraffic light\n")
    assert vocab == (("person", "man", "people"), ("car",), ("traffic light",))
    assert name_index(vocab) == {"person": 0, "man": 0, "people": 0, "car": 1, "traffic light": 2}
    assert format_vocab(vocab) == "person,man,people\ncar\ntraffic light\n"
    with pytest.raises(ValueError, match="line 2 is empty"):
        parse_vocab("a\n\nb\n")


def _plan(tmp_path: Path, data: Path, *sets: str):  # noqa: ANN202 - orchestrator.run.data_plan.DataPlan
    from orchestrator.config import load_config
    from orchestrator.run.data_plan import plan_data
    from orchestrator.run.files import RunFiles

    cfg = load_config(None, [f"data.train={data}", "data.eval=null", f"storage.path={tmp_path}", *sets])
    return cfg, plan_data(cfg, RunFiles(cfg))


def test_the_run_takes_labels_and_words_from_the_card(tmp_path: Path) -> None:
    from orchestrator.config import ConfigError

    src = layouts.coco(tmp_path / "coco", images=3)
    out = tmp_path / "out"
    prepare("coco", Inputs(images=str(src["images"]), captions=str(src["captions"]), instances=str(src["instances"])),
            str(out), vocab_size=100)
    cfg, plan = _plan(tmp_path, out, "objectives={mlm: 1.0, mrc: 1.0}")
    assert cfg.model.object_classes == 4  # COCO fixture's 4 categories, not the shapes world's
    assert dict(plan.pipeline["object_index"]) == {"person": 0, "car": 1, "dog": 2, "chair": 3}
    assert plan.grounded_words == ("person", "car", "dog", "chair")
    assert plan.text["scene_object_ids"] == ()  # no scene words: nothing from jobs.data.synth
    with pytest.raises(ConfigError) as exc:
        _plan(tmp_path, out, "objectives={mlm: 1.0, sgp: 1.0}")
    assert exc.value.problems == [f"objectives.sgp = 1.0: needs scene_graph: scene-graph words (the dataset card's "
                                  "scene_words, from the scene json's objects, attributes and relations), which the "
                                  f"data lacks (dataset card {out}/dataset.json)"]
    with pytest.raises(ConfigError) as exc:
        _plan(tmp_path, out, "objectives={mlm: 1.0, mrc: 1.0}", "model.object_classes=2")
    assert exc.value.problems == [f"model.object_classes = 2: the data's labels range over 4 classes (dataset card "
                                  f"{out}/dataset.json); raise it, or leave it unset to take the data's"]


def test_captions_only_data_refuses_label_objectives_and_regions(tmp_path: Path) -> None:
    from orchestrator.config import ConfigError

    src = layouts.cc3m(tmp_path)
    out = tmp_path / "out"
    prepare("cc3m", Inputs(images=str(src["images"]), captions=str(src["captions"])), str(out), vocab_size=100)
    with pytest.raises(ConfigError) as exc:
        _plan(tmp_path, out, "model.preset=uniter", "objectives={mlm: 1.0, mrc_kl: 1.0, itm: 1.0}")
    where = f"dataset card {out}/dataset.json"
    assert exc.value.problems == [
        "objectives.mrc_kl = 1.0: needs object_labels: object classes (scene.objects[*] names in an object vocabulary: "
        f"the dataset card's objects_vocab.txt or data.object_vocab), which the data lacks ({where})",
        "model.visual_input = 'region' (region_source = 'crop_pool'): needs boxes: object boxes (scene.objects[*].bbox "
        f"in KEY.json), which the data lacks ({where}); or use a patch preset (vilt) or region_source: precomputed"]
    _, plan = _plan(tmp_path, out, "objectives={mlm: 1.0, itm: 1.0}")  # what captions alone support
    assert plan.grounded_words == ()


def test_precomputed_labels_default_to_visual_genome_classes(tmp_path: Path) -> None:
    """Detector labels without a vocabulary: BUTD's 1600 Visual Genome classes; a vocabulary file
    (data.object_vocab) names them."""
    from jobs.data.datasets.needs import data_facts, object_classes
    from jobs.data.regions import npz_bytes

    src = layouts.img2dataset(tmp_path, "files")
    for i, img in enumerate(sorted((src["images"] / "00000").glob("*.jpg"))):
        img.with_suffix(".npz").write_bytes(npz_bytes(np.ones((2, 8)), np.array([[0, 0, 4, 4], [1, 1, 9, 9]]),
                                                      np.array([i, 1599])))
    res = prepare("img2dataset", Inputs(images=str(src["images"])), str(tmp_path / "out"), vocab_size=100)
    facts = data_facts([res.shards])
    assert {"region_features", "region_labels"} <= facts.fields and facts.region_feature_size == 8
    assert object_classes(facts) == 1600
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("".join(f"class{i}\n" for i in range(1600)))
    assert object_classes(data_facts([res.shards], object_vocab=str(vocab))) == 1600
    _, plan = _plan(tmp_path, tmp_path / "out", "model.preset=uniter", "model.region_source=precomputed",
                    "model.region_feature_size=8", "objectives={mlm: 1.0, mrc: 1.0}")
    assert plan.pipeline["region_feature_size"] == 8
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.region_feature_size = 16: the shards' region features have 8"):
        _plan(tmp_path, tmp_path / "out", "model.preset=uniter", "model.region_source=precomputed",
              "model.region_feature_size=16", "objectives={mlm: 1.0}")


def test_shapes_world_is_a_plug_in_with_its_card(tmp_path: Path) -> None:
    from jobs.data.synth import write_synthetic

    write_synthetic(str(tmp_path / "s"), samples=8, shards=1, image_size=32, eval_samples=4, vocab_size=200)
    card = find_card([str(tmp_path / "s" / "train" / "00000.tar")])
    assert card.name == "shapes" and card.object_key == "shape"
    assert [c[0] for c in card.classes] == ["circle", "square", "triangle", "diamond"]
    (tmp_path / "s" / "dataset.json").unlink()  # a folder written before cards: its manifest says shapes
    assert find_card([str(tmp_path / "s" / "train" / "00000.tar")]).name == "shapes"
    _, plan = _plan(tmp_path, tmp_path / "s" / "train", "objectives={mlm: 1.0, sgp: 1.0, mrc: 1.0}",
                    "model.preset=vl-bert")
    assert plan.text["scene_relation_ids"] and "circle" in plan.grounded_words


def test_pipeline_labels_objects_through_the_dataset_vocabulary(tmp_path: Path) -> None:
    from jobs.data.local import local_items
    from jobs.data.pipeline import _unit_batches
    from orchestrator.run.files import RunFiles
    from orchestrator.run.runner import pipeline_spec

    src = layouts.coco(tmp_path / "coco", images=2)
    out = tmp_path / "out"
    res = prepare("coco", Inputs(images=str(src["images"]), captions=str(src["captions"]),
                                 instances=str(src["instances"])), str(out), vocab_size=100)
    cfg, plan = _plan(tmp_path, out, "objectives={mlm: 1.0, mrc: 1.0}", "data.image_size=32")
    spec = pipeline_spec(cfg, plan, RunFiles(cfg))
    (batch,) = list(_unit_batches(local_items(res.shards, spec), spec, seed=None, epoch=0, ledger=None))
    metas = _metas(res.shards)
    classes = ["person", "car", "dog", "chair"]
    for row, meta in enumerate(metas):
        objs = meta["scene"]["objects"][: cfg.data.max_objects]
        assert batch["obj_labels"][row, : len(objs)].tolist() == [classes.index(o["name"]) for o in objs]
        assert (batch["obj_labels"][row, len(objs):] == -1).all()
        x0, y0, x1, y1 = objs[0]["bbox"]
        assert np.allclose(batch["obj_boxes"][row, 0], [x0 / 32, y0 / 32, x1 / 32, y1 / 32])
    assert batch["image_id"].tolist() == [1000] * 5 + [1007] * 5  # COCO's ids: five captions each


def test_a_first_shard_that_never_answers_costs_the_probe_budget_not_the_s3_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A read accepted and never answered blocks for the S3 client's attempts × request timeout (6 min):
    the look into the first shard gives up after its budget and the card alone describes the data."""
    import threading
    import time

    from jobs.data.datasets import needs
    from jobs.data.synth import write_synthetic

    write_synthetic(str(tmp_path / "s"), samples=8, shards=1, image_size=32, eval_samples=4, vocab_size=200)
    shards = [str(tmp_path / "s" / "train" / "00000.tar")]
    full = needs.data_facts([shards])
    stuck = threading.Event()
    monkeypatch.setattr(needs, "_probe", lambda *a: stuck.wait())  # the never-answered GET
    monkeypatch.setattr(needs, "PROBE_BUDGET_S", 0.3)
    started = time.monotonic()
    facts = needs.data_facts([shards])
    stuck.set()
    assert time.monotonic() - started < 5.0
    assert f"could not look into {shards[0]} within 0.3 s" in caplog.text
    assert facts.fields == full.fields & set(find_card(shards).fields)  # what the card says, nothing probed
    assert facts.classes == full.classes
