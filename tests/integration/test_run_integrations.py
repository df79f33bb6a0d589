"""One real `mmpt run` (2 Ray Train workers, ZeRO-2, MoE) with the tools a lab brings: started from
Hugging Face BERT and ViT checkpoints (tiny, random, built by transformers here), tracked by MLflow,
TensorBoard and W&B (offline) at once, exported for others (`mmpt export`), and its report rendered
by headless Chromium. Each tracker read back with its own reader must hold metrics.jsonl's series;
the exported weights must be the checkpoints' (the learning rate is ~0, so six steps move nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, tiny
from tests.readers import tensorboard_images, tensorboard_scalars, wandb_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _checkpoints(root: Path, shapes: Path) -> tuple[Path, Path]:
    """A BERT with the shapes tokenizer's vocabulary (and that tokenizer beside it) and a ViT, both the
    tiny run's size (hidden 32, 2 heads, 2 layers, FFN 64 = quickstart's mlp_ratio 2, patch 8 on 32 px)."""
    import shutil

    import torch
    import transformers
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(shapes / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "layer_norm_eps": 1e-5}
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=vocab, max_position_embeddings=64, **sizes)
                                 ).save_pretrained(root / "bert")
    shutil.copy(shapes / "tokenizer.json", root / "bert" / "tokenizer.json")
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **sizes)).save_pretrained(root / "vit")
    return root / "bert", root / "vit"


def test_a_pretrained_run_is_tracked_exported_and_reported(ray_session, shapes_data, tmp_path) -> None:
    from mlflow import MlflowClient

    bert, vit = _checkpoints(tmp_path / "hf", shapes_data)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(QUICKSTART, tiny(shapes_data, tmp_path, name="tracked", **{
        "model.init": {"text": str(bert), "vision": str(vit)}, "train.lr": 1e-9, "train.warmup_steps": 0,
        "tracking.mlflow": {"tracking_uri": store, "experiment": "it"}, "tracking.tensorboard": True,
        "tracking.wandb": {"project": "mmpt-it", "mode": "offline"}}))
    result = run(cfg)
    run_dir = Path(result.run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["loss/total"]) for r in records]
    assert [s for s, _ in want] == [2, 3, 4, 6]
    ids = json.loads((run_dir / "tracking.json").read_text())

    client = MlflowClient(tracking_uri=store)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert mlrun.info.run_id == ids["mlflow"] and mlrun.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "loss/total")) == want
    assert mlrun.data.params["model.hidden_size"] == "32" and mlrun.data.params["moe.num_experts"] == "4"
    assert mlrun.data.metrics["final/eval/i2t_r1"] == result.summary["eval"]["i2t_r1"]
    load = [client.get_metric_history(mlrun.info.run_id, f"moe/layer0/load/{e}")[-1].value for e in range(4)]
    assert load == pytest.approx(records[-1]["moe/layer0/load"])
    assert {f.path for f in client.list_artifacts(mlrun.info.run_id)} == {"config.yaml", "summary.json",
                                                                          "moe_load.png", "report.html"}

    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in tb["loss/total"]] == want
    assert [s for s, _ in tb["samples_per_s"]] == [2, 3, 4, 6]
    assert "moe_load" in tensorboard_images(run_dir / "tensorboard")

    (wb,) = wandb_runs(run_dir / "wandb")
    assert wb["run"]["id"] == ids["wandb"] and wb["config"]["model"]["preset"] == "vilt"
    assert wb["history"]["loss/total"] == [(s, pytest.approx(v)) for s, v in want]
    assert wb["summary"]["final/steps"] == 6 and wb["exit_code"] == 0
    assert {"moe_load.png", "report.html"} <= set(wb["files"])
    assert (run_dir / "report.html").read_text().startswith("<!doctype html>")

    # model.init: planned on the driver, applied on the workers; the checkpoint now holds those weights
    init = result.summary["init"]
    # patch proj + positions, 2 x (qkv, norms, out), layer 0's FFN, layer 1's 2 local experts (ep_size 2), final norm
    assert init["vision"]["loaded"] == 3 + 2 * 8 + 4 + 2 * 4 + 2
    assert init["text"]["loaded"] == 5 + 5  # embeddings + MLM head (the joint stack is ViT's)
    assert "encoder.layers.1.ffn.moe.deepspeed_moe.gate.wg.weight" in init["new"]
    from typer.testing import CliRunner

    from jobs.pretrained.checkpoint import load_tensors
    from orchestrator.cli.main import app

    for fmt in ("safetensors", "hf"):
        out = CliRunner().invoke(app, ["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert out.exit_code == 0, out.output
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "safetensors" / "model.safetensors")
    src = load_tensors(str(vit)) | load_tensors(str(bert))
    qkv = [src[f"encoder.layer.0.attention.attention.{x}.weight"] for x in ("query", "key", "value")]
    assert (weights["encoder.layers.0.attn.qkv.weight"] - __import__("torch").cat(qkv)).abs().max() < 1e-5
    assert (weights["encoder.text_embeddings.word.weight"] - src["bert.embeddings.word_embeddings.weight"]).abs().max() < 1e-5
    experts = [weights[f"encoder.layers.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"] for e in range(4)]
    for expert in experts:  # all four experts, from both ranks' expert files, start as ViT layer 1's FFN
        assert (expert - src["encoder.layer.1.intermediate.dense.weight"]).abs().max() < 1e-5
    import transformers

    hf_vit, info = transformers.ViTModel.from_pretrained(tmp_path / "hf" / "vision", output_loading_info=True)
    assert set(info["unexpected_keys"]) == set() and set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    hf_bert, info = transformers.BertModel.from_pretrained(tmp_path / "hf" / "text", output_loading_info=True)
    assert set(info["unexpected_keys"]) == set() and (tmp_path / "hf" / "text" / "tokenizer.json").is_file()

    # the run's report, as a person sees it
    from tests.browser import render

    shown = render(run_dir / "report.html")
    (tmp_path / "report.png").write_bytes(shown.screenshot)
    assert shown.errors == [] and len(shown.images) >= 6 and all(i["decoded"] for i in shown.images)
    assert "Run tracked" in shown.text and "MoE expert load" in shown.text
