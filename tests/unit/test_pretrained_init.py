"""`model.init` from Hugging Face checkpoints: tiny random BERT and ViT models built by
`transformers` from configs (nothing downloaded), saved with save_pretrained, loaded into mmpt
models built by the runs' factory, and the loaded layers' outputs compared with transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.pretrained import checkpoint as ckpt
from jobs.pretrained.load import InitError, load_pretrained, plan_init
from models import build_pretrainer
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.layers import MoETally, key_mask
from models.moe.experts import split_stacked

transformers = pytest.importorskip("transformers")

D, H, LAYERS, FFN, VOCAB = 32, 2, 2, 128, 60
TEXT, IMAGE = TextSpec(vocab_size=VOCAB, max_len=16), ImageSpec(size=32)


def _bert(folder: Path, **kw: object) -> Path:
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H,
                                  intermediate_size=FFN, max_position_embeddings=40, layer_norm_eps=1e-5,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    transformers.BertForPreTraining(cfg).save_pretrained(folder)
    return folder


def _vit(folder: Path, image_size: int = 32, **kw: object) -> Path:
    torch.manual_seed(2)
    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H, intermediate_size=FFN,
                                 image_size=image_size, patch_size=8, layer_norm_eps=1e-5, **kw)
    transformers.ViTModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"bert": _bert(root / "bert"), "vit": _vit(root / "vit")}


def _model(preset: str, objectives: dict[str, float], moe: MoEConfig | None = None, **init: str):
    cfg = ModelConfig(preset=preset, hidden_size=D, num_layers=LAYERS, num_heads=H, dropout=0.0, init=init)
    model = build_pretrainer(cfg, moe or MoEConfig(), objectives, TEXT, IMAGE).eval()
    return cfg, model


def _hf(cls: type, folder: Path):
    return cls.from_pretrained(folder).eval()


def _vit_layers(vit) -> list:  # noqa: ANN001 - transformers 5 renamed ViT's `encoder.layer` to `layers`
    return list(vit.layers) if hasattr(vit, "layers") else list(vit.encoder.layer)


@torch.no_grad()
def test_clip_towers_from_bert_and_vit_compute_what_transformers_computes(folders: dict[str, Path]) -> None:
    cfg, model = _model("clip", {"itc": 1.0}, text=str(folders["bert"]), vision=str(folders["vit"]))
    plan = load_pretrained(model, cfg)
    assert plan is not None
    vision, text = plan.sources
    assert (vision.modality, vision.model_type, len(vision.loaded)) == ("vision", "vit", 2 + 1 + 2 + 12 * LAYERS + 2)
    assert (text.modality, text.model_type) == ("text", "bert")
    assert set(vision.skipped) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "bert.pooler.dense.weight" in text.skipped and "cls.seq_relationship.weight" in text.skipped
    assert text.skipped["cls.predictions.bias"].startswith("no counterpart in preset 'clip'")  # CLIP has no MLM
    new = set(plan.new)
    assert {"encoder.image_pre_norm.weight", "encoder.logit_scale_log", "encoder.text_proj.weight",
            "encoder.text_layers.0.attn_norm.weight"} <= new  # nothing in BERT / ViT for these
    assert not any(n.startswith("encoder.image_layers.") for n in new)
    summary = plan.summary()
    assert summary["vision"]["loaded"] == len(vision.loaded) and summary["new"] == plan.new

    vit, bert = _hf(transformers.ViTModel, folders["vit"]), _hf(transformers.BertModel, folders["bert"])
    enc = model.encoder
    # ViT: embeddings, every layer, the final norm: exactly transformers' outputs
    pixels = torch.randn(3, 3, 32, 32)
    emb = vit.embeddings(pixels)
    mine = enc.patch_embeddings({"image": pixels})
    torch.testing.assert_close(mine.x_BPD - enc.patch_embeddings.type_D, emb[:, 1:])  # type vector: mmpt's own, new
    torch.testing.assert_close((enc.class_D + enc.class_position_D).expand(3, -1), emb[:, 0])
    keep = torch.ones(3, emb.shape[1], dtype=torch.bool)
    h = emb
    for i, layer in enumerate(enc.image_layers):
        ours = layer(h, key_mask(keep), keep, MoETally(h))
        theirs = _vit_layers(vit)[i](h)
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        h = theirs
    torch.testing.assert_close(enc.image_norm(h), vit.layernorm(h))
    # BERT: embeddings, and each layer's attention and FFN sublayers (mmpt's layers are pre-LN)
    ids = torch.randint(5, VOCAB, (3, 12))
    torch.testing.assert_close(enc.text_embeddings(ids), bert.embeddings(input_ids=ids))
    x = torch.randn(3, 12, D)
    allow = key_mask(torch.ones(3, 12, dtype=torch.bool))
    for i, layer in enumerate(enc.text_layers):
        b = bert.encoder.layer[i]
        attn = b.attention.self(x)
        attn = attn[0] if isinstance(attn, tuple) else attn
        torch.testing.assert_close(layer.attn(x, allow), b.attention.output.dense(attn), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.ffn(x), b.output.dense(b.intermediate(x)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.ffn_norm.weight, b.attention.output.LayerNorm.weight)
    torch.testing.assert_close(enc.text_norm.bias, bert.encoder.layer[-1].output.LayerNorm.bias)


@torch.no_grad()
def test_vilt_takes_vit_for_the_joint_stack_bert_for_the_rest_and_upcycles_experts(folders: dict[str, Path]) -> None:
    moe = MoEConfig(num_experts=2, ep_size=1, layers=[1])
    cfg, model = _model("vilt", {"mlm": 1.0, "itm": 1.0}, moe, text=str(folders["bert"]), vision=str(folders["vit"]))
    plan = load_pretrained(model, cfg)
    assert plan is not None
    vision, text = plan.sources
    assert any("start from model.init.vision" in n for n in text.notes)
    assert text.skipped["bert.encoder.layer.0.attention.self.query.weight"] == "encoder.layers start from model.init.vision"
    assert {r.target for r in text.loaded} >= {"encoder.text_embeddings.word.weight", "encoder.pooler.dense.weight",
                                               "objectives.mlm.head.transform.weight", "objectives.mlm.head.decoder.bias"}
    bert = transformers.BertForPreTraining.from_pretrained(folders["bert"]).eval()
    vit = _hf(transformers.ViTModel, folders["vit"])
    torch.testing.assert_close(model.objectives["mlm"].head.decoder.bias, bert.cls.predictions.bias)
    torch.testing.assert_close(model.encoder.pooler.dense.weight, bert.bert.pooler.dense.weight)
    # both experts of the MoE layer start as ViT layer 1's FFN (sparse upcycling); the router is new
    experts = model.encoder.layers[1].ffn.moe.deepspeed_moe.experts
    saved = ckpt.load_tensors(str(folders["vit"]))
    assert experts.num_local_experts == 2
    for e in range(experts.num_local_experts):
        torch.testing.assert_close(experts.fc1_weight[e], saved["encoder.layer.1.intermediate.dense.weight"])
        torch.testing.assert_close(experts.fc2_bias[e], saved["encoder.layer.1.output.dense.bias"])
    assert "encoder.layers.1.ffn.moe.deepspeed_moe.gate.wg.weight" in plan.new
    h = torch.randn(2, 17, D)
    keep = torch.ones(2, 17, dtype=torch.bool)
    out = model.encoder.layers[0](h, key_mask(keep), keep, MoETally(h))
    ref = _vit_layers(vit)[0](h)
    torch.testing.assert_close(out, ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)


def test_position_grid_resampled_sharded_and_bin_checkpoints_load_the_same(tmp_path: Path, folders: dict[str, Path]) -> None:
    big = _vit(tmp_path / "vit64", image_size=64)  # an 8x8 grid for mmpt's 4x4
    cfg, model = _model("clip", {"itc": 1.0}, vision=str(big))
    plan = load_pretrained(model, cfg)
    assert "encoder.patch_embeddings.position_PD" in {r.target for r in plan.sources[0].loaded}
    src = ckpt.load_tensors(str(big))["embeddings.position_embeddings"][0, 1:]
    want = torch.nn.functional.interpolate(src.T.reshape(1, D, 8, 8), size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.encoder.patch_embeddings.position_PD.detach(), want.reshape(D, 16).T)
    # the same BERT as shards + index, and as pytorch_model.bin
    bert = transformers.BertForPreTraining.from_pretrained(folders["bert"])
    bert.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / ckpt.SAFETENSORS_INDEX).is_file()
    torch.save(bert.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin.pt").rename(tmp_path / "bin" / ckpt.PYTORCH_BIN)
    (tmp_path / "bin" / "config.json").write_text((folders["bert"] / "config.json").read_text())
    states = []
    for folder in (folders["bert"], tmp_path / "sharded", tmp_path / "bin"):
        cfg, model = _model("clip", {"itc": 1.0}, text=str(folder))
        assert ckpt.tensor_shapes(str(folder))["bert.embeddings.word_embeddings.weight"] == (VOCAB, D)
        load_pretrained(model, cfg)
        states.append(model.encoder.text_layers[1].attn.qkv.weight.detach().clone())
    torch.testing.assert_close(states[0], states[1])
    torch.testing.assert_close(states[0], states[2])


def test_a_checkpoint_from_s3_loads_as_from_disk(folders: dict[str, Path], s3_server) -> None:  # noqa: ANN001
    import boto3

    from jobs.storage import StorageOptions

    bucket = s3_server.create_bucket()
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    for f in folders["vit"].iterdir():
        s3.upload_file(str(f), bucket, f"vit/{f.name}")
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    cfg, remote = _model("clip", {"itc": 1.0}, vision=f"s3://{bucket}/vit")
    plan = load_pretrained(remote, cfg, opts)
    cfg_local, local = _model("clip", {"itc": 1.0}, vision=str(folders["vit"]))
    load_pretrained(local, cfg_local)
    assert len(plan.sources[0].loaded) == 31
    torch.testing.assert_close(remote.encoder.image_layers[0].attn.qkv.weight, local.encoder.image_layers[0].attn.qkv.weight)


def test_mismatches_are_one_line_errors_naming_the_field(tmp_path: Path, folders: dict[str, Path]) -> None:
    cases = [
        ({"text": str(folders["vit"])}, {}, "model.init.text = '{p}': model_type 'vit'; allowed for text: bert"),
        ({"vision": str(tmp_path / "nothing")}, {}, "model.init.vision = '{p}': no config.json in {p} (expected a "
         "Hugging Face model folder, as save_pretrained writes it)"),
        ({"text": str(folders["bert"])}, {"hidden_size": 64}, "model.init.text = '{p}': the checkpoint's hidden_size "
         "is 32, model.hidden_size is 64; set model.hidden_size=32 to load it"),
        ({"vision": str(folders["vit"])}, {"num_heads": 4}, "model.init.vision = '{p}': the checkpoint's "
         "num_attention_heads is 2, model.num_heads is 4; set model.num_heads=2 to load it"),
        ({"text": str(folders["bert"])}, {"mlp_ratio": 2.0}, "model.init.text = '{p}': the checkpoint's "
         "intermediate_size is 128, model.mlp_ratio=2.0 gives 64; set model.mlp_ratio=4 to load it"),
    ]
    for init, sizes, message in cases:
        cfg = ModelConfig(preset="clip", hidden_size=sizes.get("hidden_size", D), num_layers=LAYERS,
                          num_heads=sizes.get("num_heads", H), mlp_ratio=sizes.get("mlp_ratio", 4.0), init=init)
        model = build_pretrainer(cfg, MoEConfig(), {"itc": 1.0}, TEXT, IMAGE)
        with pytest.raises(InitError) as err:
            plan_init(model, cfg)
        assert str(err.value) == message.format(p=next(iter(init.values())))
    # experts of another width than the checkpoint's FFN: skipped whole (no half FFN), the rest loads
    cfg = ModelConfig(preset="clip", hidden_size=D, num_layers=LAYERS, num_heads=H, init={"vision": str(folders["vit"])})
    model = build_pretrainer(cfg, MoEConfig(num_experts=2, ep_size=1, layers=[1], expert_hidden_size=96), {"itc": 1.0},
                             TEXT, IMAGE)
    plan = plan_init(model, cfg)
    experts = "encoder.image_layers.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts"
    assert not any(r.target.startswith(experts) for r in plan.sources[0].loaded)
    assert {f"{experts}.{e}.fc2.bias" for e in range(2)} <= set(plan.new)  # shape-compatible, yet not half-loaded
    assert plan.sources[0].skipped["encoder.layer.1.output.dense.bias"].endswith("(32, 128) from the checkpoint, (32, 96) in the model")
    with pytest.raises(ValueError, match="init.vision='x' needs patch visual input"):
        ModelConfig(preset="uniter", init={"vision": "x"})


@torch.no_grad()
def test_exported_towers_load_in_transformers_and_back_into_mmpt(tmp_path: Path) -> None:
    from jobs.pretrained.checkpoint import save_folder
    from jobs.pretrained.export import bert_folder, vit_folder
    from orchestrator.config import load_config

    run = load_config(None, {"model.preset": "clip", "model.hidden_size": D, "model.num_layers": LAYERS, "model.num_heads": H,
                             "model.dropout": 0.0, "data.image_size": 32, "data.max_text_len": 16, "objectives": {"itc": 1.0},
                             "moe.num_experts": 2, "moe.ep_size": 1, "moe.layers": [1], "scaling.num_workers": 1})
    torch.manual_seed(3)
    model = build_pretrainer(run.model, run.moe, run.active_objectives, TEXT, IMAGE).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folders = {}
    for name, built in (("text", bert_folder(state, run)), ("vision", vit_folder(state, run))):
        config, tensors, notes = built
        save_folder(str(tmp_path / name), config, tensors)
        folders[name] = tmp_path / name
        assert any("mean of its experts" in n for n in notes)  # layer 1 is MoE in both towers
    bert, info = transformers.BertModel.from_pretrained(folders["text"], output_loading_info=True)
    assert set(info["unexpected_keys"]) == set() and set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    vit, info = transformers.ViTModel.from_pretrained(folders["vision"], output_loading_info=True)
    assert set(info["unexpected_keys"]) == set() and set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    bert, vit = bert.eval(), vit.eval()
    # ViT: the dense layer 0 computes in transformers what it computes in mmpt; embeddings likewise
    h = torch.randn(2, 17, D)
    keep = torch.ones(2, 17, dtype=torch.bool)
    ref = _vit_layers(vit)[0](h)
    torch.testing.assert_close(model.encoder.image_layers[0](h, key_mask(keep), keep, MoETally(h)),
                               ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.embeddings(pixels)[:, 1:], model.encoder.patch_embeddings({"image": pixels}).x_BPD
                               - model.encoder.patch_embeddings.type_D)
    ids = torch.randint(5, VOCAB, (2, 10))
    torch.testing.assert_close(bert.embeddings(input_ids=ids), model.encoder.text_embeddings(ids))
    # and back: a fresh mmpt model started from the export holds the same dense weights
    cfg, fresh = _model("clip", {"itc": 1.0}, MoEConfig(num_experts=2, ep_size=1, layers=[1]),
                        text=str(folders["text"]), vision=str(folders["vision"]))
    plan = load_pretrained(fresh, cfg)
    loaded = {r.target for s in plan.sources for r in s.loaded}
    back = split_stacked(dict(fresh.named_parameters()))
    dense = [n for n in loaded if ".deepspeed_experts." not in n]
    assert len(dense) > 50
    for name in dense:
        torch.testing.assert_close(back[name], state[name], msg=name)
    experts = ".ffn.moe.deepspeed_moe.experts.deepspeed_experts"
    mean = (state[f"encoder.image_layers.1{experts}.0.fc1.weight"] + state[f"encoder.image_layers.1{experts}.1.fc1.weight"]) / 2
    torch.testing.assert_close(back[f"encoder.image_layers.1{experts}.1.fc1.weight"], mean)
