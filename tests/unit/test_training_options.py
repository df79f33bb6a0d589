"""Activation checkpointing per layer and adversarial training (VILLA/FreeLB) on tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from jobs.config import RunConfig
from models.adversarial import EmbeddingPerturbation, adversarial_forward
from models.config import AdversarialConfig, MoEConfig
from models.moe.layer import MoEFFN
from models.recompute import set_activation_checkpointing
from tests.unit.conftest import build, make_batch

# one preset per encoder family: single, interaction, coattention, cross, dual
FAMILIES = ["vilt", "interbert", "vilbert", "lxmert", "clip"]


def _loss_and_grads(model, batch: dict[str, Tensor], seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- activation checkpointing ------------------------------------------------------------------


@pytest.mark.parametrize("preset", FAMILIES)
def test_checkpointing_gives_the_same_loss_and_gradients(preset: str) -> None:
    model = build(preset)  # dropout on: the recomputation must replay the same masks
    batch = make_batch()
    loss, grads = _loss_and_grads(model, batch)
    layers = set_activation_checkpointing(model, True)
    assert layers >= 3
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("preset", FAMILIES)
def test_checkpointing_units_never_nest(preset: str) -> None:
    from models.recompute import Recomputable

    model = build(preset)
    for unit in (m for m in model.modules() if isinstance(m, Recomputable)):
        inner = [n for n, m in unit.named_modules() if n and isinstance(m, Recomputable)]
        assert inner == [], (type(unit).__name__, inner)  # a nested unit would be recomputed twice


def test_checkpointing_counts_one_unit_per_layer_and_switches_off() -> None:
    model = build("vilt", num_layers=4)
    assert set_activation_checkpointing(model, True) == 4
    assert all(layer.checkpointing for layer in model.encoder.layers)
    assert set_activation_checkpointing(model, False) == 4
    assert not any(layer.checkpointing for layer in model.encoder.layers)


def test_checkpointing_with_moe_counts_routing_once_and_matches() -> None:
    moe = MoEConfig(num_experts=4, layers="all", gate="noisy_topk", top_k=2, capacity_factor=2.0)
    model = build("vilt", None, moe)
    batch = make_batch()
    loss, grads = _loss_and_grads(model, batch)
    set_activation_checkpointing(model, True)
    for m in model.modules():
        if isinstance(m, MoEFFN):
            m.window_stats(reset=True)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_ckpt, loss)  # the noisy gate's draws are replayed too
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    views = len(model.views)
    for m in model.modules():
        if isinstance(m, MoEFFN):
            assert m._window_n == views  # one per encoder pass, none from the recomputation


def _saved_bytes(model, batch: dict[str, Tensor]) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)["loss"].backward()
    return total


def test_checkpointing_keeps_fewer_activations() -> None:
    model = build("vilt", num_layers=6, dropout=0.0)
    batch = make_batch()
    full = _saved_bytes(model, batch)
    set_activation_checkpointing(model, True)
    ckpt = _saved_bytes(model, batch)  # counts the forward's saved tensors and each recomputed layer's
    assert ckpt < full


# --- adversarial training ----------------------------------------------------------------------


def test_adversarial_config_is_off_by_default_and_validated() -> None:
    assert not RunConfig().train.adversarial.enabled
    cfg = RunConfig.model_validate({"train": {"adversarial": {"steps": 2, "norm_bound": 0.1}}})
    assert cfg.train.adversarial.enabled and cfg.train.adversarial.modalities == ["text", "image"]
    with pytest.raises(ValueError, match="modalities"):
        AdversarialConfig(modalities=["audio"])
    with pytest.raises(ValueError, match="step_size"):
        AdversarialConfig(step_size=0)


@pytest.mark.parametrize("preset", ["vilt", "lxmert"])
def test_adversarial_loss_climbs_within_the_norm_bound(preset: str) -> None:
    model = build(preset, dropout=0.0)
    batch = make_batch()
    cfg = AdversarialConfig(steps=3, step_size=0.05, norm_bound=0.08)
    perturb = EmbeddingPerturbation(model.encoder, cfg.modalities)
    torch.manual_seed(5)
    plain = model(batch)["loss"].detach()
    torch.manual_seed(5)
    out = adversarial_forward(lambda: model(batch), perturb, cfg, torch.device("cpu"))
    clean = out["loss"].detach() - out["losses"]["adv"]
    torch.testing.assert_close(clean, plain)  # the clean term is the ordinary forward, same draws
    assert out["losses"]["adv"] > plain  # the ascent found a worse point
    assert 0.0 < float(out["metrics"]["adv_delta_norm"]) <= cfg.norm_bound + 1e-6
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert perturb.deltas == {"text": [], "image": []}  # nothing held between micro-batches
    torch.manual_seed(5)
    torch.testing.assert_close(model(batch)["loss"].detach(), plain)  # hooks inactive outside


def test_adversarial_replays_the_random_draws_for_every_pass() -> None:
    model = build("vilt", dropout=0.1)  # dropout and MLM masks draw from the RNG
    batch = make_batch()
    cfg = AdversarialConfig(steps=2, step_size=1e-9)  # δ stays ~0: the adversarial pass equals the clean one
    perturb = EmbeddingPerturbation(model.encoder, cfg.modalities)
    torch.manual_seed(3)
    out = adversarial_forward(lambda: model(batch), perturb, cfg, torch.device("cpu"))
    clean = out["loss"].detach() - out["losses"]["adv"]
    torch.testing.assert_close(out["losses"]["adv"], clean, rtol=1e-5, atol=1e-6)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    model(batch)
    assert torch.equal(after, torch.get_rng_state())  # the RNG moved on by exactly one pass


def test_adversarial_text_only_and_zero_steps() -> None:
    model = build("vilt", dropout=0.0)
    batch = make_batch()
    perturb = EmbeddingPerturbation(model.encoder, ["text"], init_mag=0.01)
    seen: dict[str, int] = {}
    original_ascend = perturb.ascend

    def ascend(grads, step_size, norm_bound):  # noqa: ANN001, ANN202
        seen["text"] = len(perturb.deltas["text"])
        seen["image"] = len(perturb.deltas.get("image", []))
        original_ascend(grads, step_size, norm_bound)

    perturb.ascend = ascend  # type: ignore[method-assign]
    adversarial_forward(lambda: model(batch), perturb, AdversarialConfig(steps=1, modalities=["text"]),
                        torch.device("cpu"))
    assert seen == {"text": len(model.views), "image": 0}  # one δ per encoder pass, text only
    text_only = SimpleNamespace(text_embeddings=torch.nn.Identity(), _visual_name=None)
    with pytest.raises(ValueError, match="no objective reads the image"):
        EmbeddingPerturbation(text_only, ["text", "image"])  # type: ignore[arg-type]
