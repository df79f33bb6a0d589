"""Attention in the form that lets SDPA pick a fused kernel: no mask where the host knows nothing is
padded (FlashAttention takes none), the boolean key mask where something is (the memory-efficient
kernel takes it), is_causal for causal text; and the outputs are those of the masked attention."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from jobs.data.batch import to_model_batch
from models.encoders import layers
from models.objectives.base import TEXT_FULL
from tests.unit.conftest import TEXT, build, make_batch


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every SDPA call's mask (None or its dtype and shape) and is_causal, then the real kernel."""
    calls: list[dict[str, Any]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):  # noqa: ANN001, ANN202
        calls.append({"mask": None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)),
                      "causal": is_causal, "Q": q.shape[2], "K": k.shape[2]})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    return calls


def _legacy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old attention: a boolean mask always, causal text as causal & real keys."""
    def old_key_mask(keep_BK: torch.Tensor, full: bool = False) -> layers.Allow:
        return layers.Allow(keep_BK[:, None, None, :])

    def old_text_mask(keep_BT: torch.Tensor, causal: bool, full: bool = False) -> layers.Allow:
        if not causal:
            return old_key_mask(keep_BT)
        return layers.Allow((layers.causal_mask(keep_BT.shape[1], keep_BT.device) & keep_BT[:, None, :])[:, None])

    for module in ("models.encoders.layers", "models.encoders.single_stream", "models.encoders.clip",
                   "models.encoders.co_attention", "models.encoders.cross"):
        mod = __import__(module, fromlist=["x"])
        if hasattr(mod, "key_mask"):
            monkeypatch.setattr(mod, "key_mask", old_key_mask)
        if hasattr(mod, "text_mask"):
            monkeypatch.setattr(mod, "text_mask", old_text_mask)


def _full_batch() -> dict[str, torch.Tensor]:
    batch = make_batch()
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch["input_ids"][:, -1] = TEXT.sep_id
    return batch


def test_to_model_batch_flags_unpadded_text_on_the_host() -> None:
    full = to_model_batch(_full_batch())
    padded = to_model_batch(make_batch())
    assert full[TEXT_FULL].device.type == "cpu" and bool(full[TEXT_FULL]) is True
    assert bool(padded[TEXT_FULL]) is False
    on_device = {k: v.to("meta") for k, v in full.items() if k != TEXT_FULL}
    again = to_model_batch({**on_device, TEXT_FULL: full[TEXT_FULL]}, device="meta")
    assert again[TEXT_FULL] is full[TEXT_FULL]  # kept as it was, never moved to the device
    assert TEXT_FULL not in to_model_batch(on_device, device="meta")  # a device mask is not read back


@pytest.mark.parametrize("preset", ["vilt", "pixel-bert"])
def test_unpadded_batches_of_dense_visual_tokens_attend_without_a_mask(preset: str, sdpa_calls) -> None:  # noqa: ANN001
    model = build(preset=preset, objectives={"mlm": 1.0, "itm": 1.0}).eval()
    model(to_model_batch(_full_batch()))
    assert sdpa_calls and all(c["mask"] is None and not c["causal"] for c in sdpa_calls), sdpa_calls


def test_padded_text_keeps_the_boolean_key_mask(sdpa_calls) -> None:  # noqa: ANN001
    model = build(preset="vilt", objectives={"mlm": 1.0, "itm": 1.0}).eval()
    model(to_model_batch(make_batch()))
    S = TEXT.max_len + 4  # text + 4 patches
    assert sdpa_calls and all(c["mask"] == (torch.bool, (4, 1, 1, S)) for c in sdpa_calls), sdpa_calls


@pytest.mark.parametrize("preset", ["vilbert", "lxmert"])
def test_two_streams_mask_only_the_padded_keys(preset: str, sdpa_calls) -> None:  # noqa: ANN001
    """Unpadded text: text keys need no mask; region keys (images differ in their objects) keep theirs."""
    model = build(preset=preset, objectives={"mlm": 1.0, "itm": 1.0}).eval()
    model(to_model_batch(_full_batch()))
    T, R = TEXT.max_len, 1 + make_batch()["obj_labels"].shape[1]
    over_text = [c for c in sdpa_calls if c["K"] == T]
    over_regions = [c for c in sdpa_calls if c["K"] == R]
    assert over_text and all(c["mask"] is None for c in over_text)
    assert over_regions and all(c["mask"] == (torch.bool, (4, 1, 1, R)) for c in over_regions)
    assert len(over_text) + len(over_regions) == len(sdpa_calls)


def test_region_tokens_are_padded_so_they_keep_their_mask(sdpa_calls) -> None:  # noqa: ANN001
    model = build(preset="uniter", objectives={"mlm": 1.0}).eval()
    batch = make_batch()
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    model(to_model_batch(batch))
    assert sdpa_calls and all(c["mask"] is not None and c["mask"][0] == torch.bool for c in sdpa_calls)


def test_clip_text_is_causal_without_a_mask_and_equals_the_masked_attention(
        sdpa_calls, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build(preset="clip", objectives={"itc": 1.0}).eval()
    batch = to_model_batch(make_batch())  # padded captions of different lengths
    with torch.no_grad():
        new = model.encoder(batch)
    text_calls = [c for c in sdpa_calls if c["Q"] == batch["input_ids"].shape[1]]
    assert text_calls and all(c["causal"] and c["mask"] is None for c in text_calls)
    _legacy(monkeypatch)
    with torch.no_grad():
        old = model.encoder(batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(new["text_embed"], old["text_embed"])
    torch.testing.assert_close(new["text_hidden"][keep], old["text_hidden"][keep])  # every real token
    torch.testing.assert_close(new["image_embed"], old["image_embed"])


@pytest.mark.parametrize("preset", ["vilt", "pixel-bert", "vilbert", "lxmert", "interbert"])
def test_fast_path_gives_the_masked_outputs_and_gradients(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build(preset=preset, objectives={"mlm": 1.0, "itm": 1.0}, dropout=0.0)
    batch = to_model_batch(_full_batch())

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(batch, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        return out["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast_loss, fast_grads = run()
    _legacy(monkeypatch)
    old_loss, old_grads = run()
    torch.testing.assert_close(fast_loss, old_loss)
    for a, b in zip(fast_grads, old_grads, strict=True):
        torch.testing.assert_close(a, b)

