"""Held-out evaluation of a DALL-E model: generate images for eval captions and judge them.

Legend: B eval batch, n captions generated for, N image tokens, K codebook entries.

For the first captions of the eval split (eval.generate_samples in all, shared by the ranks), one
image each is sampled (top-k GENERATE_TOP_K, temperature GENERATE_TEMPERATURE, a fixed seed per
batch) and judged by jobs/generative/scene_check.py. The same captions are also judged against
three references, each counted the same way:
- `random`: images decoded from uniformly random dVAE tokens (what an untrained decoder draws);
- `real`: the eval images themselves (the judge's ceiling on this pipeline's images);
- `recon`: the frozen dVAE's reconstructions of the eval images (the ceiling of any image the
  decoder can produce through this dVAE);
- `shuffled`: real images of other captions of the batch (a model that draws good scenes but ignores
  the text).
Hits are counted per reference and turned into rates by evaluate's reduction: `gen_match_rate`,
`gen_color_match_rate`, `gen_shape_match_rate`, and the same for `random_`, `real_`, `shuffled_`.
`dvae_recon_mse` is the frozen dVAE's reconstruction error on the eval images (argmax tokens).
A dVAE run's evaluation judges its own reconstructions the same way (`reconstruction_probe`:
`recon_match_rate`, `recon_color_match_rate`, `recon_shape_match_rate`), so a dVAE is known to be
good enough for stage 2 before a DALL-E is trained on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jobs.data.batch import IMAGE_MEAN, IMAGE_STD
from jobs.generative.scene_check import check

GENERATE_TOP_K = 32  # the CLI's defaults too (orchestrator/trained/generate.py)
GENERATE_TEMPERATURE = 1.0
PROBE_SEED = 4321
REFERENCES = ("gen", "random", "real", "recon", "shuffled")


def to_uint8(image_BCHW: Tensor) -> np.ndarray:
    """Model-scale images [B, C, H, W] -> uint8 RGB [B, H, W, 3] (the pipeline's normalisation undone)."""
    pixels = (image_BCHW.float() * IMAGE_STD + IMAGE_MEAN).clamp(0, 1) * 255
    return pixels.round().byte().permute(0, 2, 3, 1).cpu().numpy()


def caption_decoder(tokenizer_uri: str, storage: Any = None) -> Callable[[Tensor], list[str]]:
    """input_ids [B, T] -> caption strings, with the run's tokenizer (special tokens dropped)."""
    from jobs.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_uri, storage)
    return lambda ids_BT: tok.decode_batch(ids_BT.cpu().tolist(), skip_special_tokens=True)


def is_generative(model: Any) -> bool:
    return callable(getattr(getattr(model, "encoder", None), "generate", None))


def is_dvae(model: Any) -> bool:
    """A dVAE run's model (preset dvae): a discrete VAE and no decoder that generates."""
    encoder = getattr(model, "encoder", None)
    return getattr(encoder, "vae", None) is not None and not is_generative(model)


def probe_for(model: Any) -> Callable[..., int] | None:
    """The evaluation's judge of `model`'s images: generation_probe for a DALL-E, reconstruction_probe
    for a dVAE, None for other models. Both are called as probe(model, batch, captions, add, limit=,
    seed=) and return how many images of the batch they judged."""
    return generation_probe if is_generative(model) else reconstruction_probe if is_dvae(model) else None


def _judge(images: np.ndarray, captions: Sequence[str], prefix: str, add: Callable[[str, float], None]) -> None:
    """Hits of `images` against `captions`, and how many were judged (`<prefix>_samples`: the rates'
    denominator)."""
    verdicts = [check(im, cap) for im, cap in zip(images, captions, strict=True)]
    add(f"{prefix}_match_hits", float(sum(v.match for v in verdicts)))
    add(f"{prefix}_color_match_hits", float(sum(v.color_match for v in verdicts)))
    add(f"{prefix}_shape_match_hits", float(sum(v.shape_match for v in verdicts)))
    add(f"{prefix}_samples", float(len(verdicts)))


@torch.no_grad()
def generation_probe(model: Any, batch: dict[str, Tensor], captions: Callable[[Tensor], list[str]],
                     add: Callable[[str, float | Tensor], None], *, limit: int, seed: int) -> int:
    """Judge up to `limit` generated images for this batch's captions; returns how many it made."""
    encoder = model.encoder
    n = min(limit, batch["input_ids"].shape[0])
    if n <= 0:
        return 0
    ids, mask, real = batch["input_ids"][:n], batch["attention_mask"][:n], batch["image"][:n]
    texts = captions(ids)
    generator = torch.Generator().manual_seed(seed)
    codes_nN = encoder.generate(ids, mask, top_k=GENERATE_TOP_K, temperature=GENERATE_TEMPERATURE, generator=generator)
    random_nN = torch.randint(0, encoder.vae.cfg.codebook_size, tuple(codes_nN.shape), generator=generator)
    real_u8 = to_uint8(real)
    _judge(to_uint8(encoder.decode(codes_nN)), texts, "gen", add)
    _judge(to_uint8(encoder.decode(random_nN.to(codes_nN.device))), texts, "random", add)
    _judge(real_u8, texts, "real", add)
    _judge(np.roll(real_u8, 1, axis=0), texts, "shuffled", add)
    recon = encoder.decode(encoder.tokenize_image(real))
    _judge(to_uint8(recon), texts, "recon", add)
    add("gen_dvae_se", torch.nn.functional.mse_loss(recon.float(), real.float(), reduction="sum") / real[0].numel())
    return n


@torch.no_grad()
def reconstruction_probe(model: Any, batch: dict[str, Tensor], captions: Callable[[Tensor], list[str]],
                         add: Callable[[str, float | Tensor], None], *, limit: int, seed: int = 0) -> int:
    """A dVAE run: judge the argmax-token reconstructions of up to `limit` eval images against their
    captions (`recon_match_rate`: what any DALL-E trained on this dVAE can at best draw); returns
    how many it judged. (`seed`: generation_probe's call; nothing here is drawn.)"""
    vae = model.encoder.vae
    n = min(limit, batch["input_ids"].shape[0])
    if n <= 0:
        return 0
    real = batch["image"][:n].to(vae.codebook_Ke.dtype)
    _judge(to_uint8(vae.decode_codes(vae.codes(real))), captions(batch["input_ids"][:n]), "recon", add)
    return n


def reduce_probe(sums: dict[str, float], out: dict[str, float]) -> None:
    """Rates out of the probes' summed hits, each over the images its reference judged (evaluate's
    reduction calls it): every reference in a DALL-E run, the reconstructions alone in a dVAE run."""
    for prefix in REFERENCES:
        n = sums.get(f"{prefix}_samples", 0.0)
        if n:
            for what in ("match", "color_match", "shape_match"):
                out[f"{prefix}_{what}_rate"] = sums[f"{prefix}_{what}_hits"] / n
    for prefix in ("gen", "recon"):  # how many images the rates stand on
        if f"{prefix}_samples" in sums:
            out[f"{prefix}_samples"] = sums[f"{prefix}_samples"]
    if "gen_dvae_se" in sums:
        out["dvae_recon_mse"] = sums["gen_dvae_se"] / sums["gen_samples"]


__all__ = ["GENERATE_TEMPERATURE", "GENERATE_TOP_K", "caption_decoder", "generation_probe", "is_dvae",
           "is_generative", "probe_for", "reconstruction_probe", "reduce_probe", "to_uint8"]
