"""`mmpt generate RUN_DIR "caption" --samples N`: text-to-image with a trained DALL-E run.

Loads the run's latest checkpoint (its frozen dVAE travels inside it), samples N images for the
caption (top-k and temperature; `--seed` fixes them), optionally reranks them by a CLIP run's
image-text similarity (`--clip RUN_DIR`, DALL-E §2.5: the paper keeps the best of 512 by CLIP), and
writes a PNG grid, best first, plus a JSON file with each sample's CLIP score and whether the
shapes-world judge (jobs/generative/scene_check.py) finds the caption's colours and shapes in it.
Run directories on local disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.config import ConfigError

GRID_COLUMNS = 8
GRID_SCALE = 2  # pixels per image pixel in the grid: shapes-world images are small


@dataclass
class LoadedRun:
    cfg: Any  # RunConfig
    model: Any  # Pretrainer, eval mode, weights of the latest checkpoint
    tokenizer: Any
    text: Any  # TextSpec


def load_run(run_dir: Path, preset: str | None = None) -> LoadedRun:
    """A run's model with its latest checkpoint's weights; ConfigError for a directory that has none."""
    from jobs.data.synth import SCENE_GRAPH_WORDS
    from jobs.data.tokenizer import load_tokenizer, text_spec
    from jobs.pretrained.export import consolidate
    from models import build_pretrainer
    from models.config import ImageSpec
    from orchestrator.run.files import latest_checkpoint, run_config, run_tokenizer

    cfg = run_config(run_dir, str(run_dir))
    if preset is not None and cfg.model.preset != preset:
        raise ConfigError([f"{run_dir}: a run of preset {cfg.model.preset!r}; allowed: a run of preset {preset}"])
    tok_path = run_tokenizer(run_dir, cfg)
    if tok_path is None:
        raise ConfigError([f"{run_dir}: the run's tokenizer.json was not found (data.tokenizer or beside its shards)"])
    tok = load_tokenizer(str(tok_path))
    # the TextSpec the run's workers built (same tokenizer, same scene words): same vocabulary and ids
    text = text_spec(tok, cfg.data.max_text_len, scene_words=SCENE_GRAPH_WORDS)
    image = ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects)
    # one process holds every expert: the consolidated checkpoint has all E, whatever ep_size trained them
    moe = cfg.moe.model_copy(update={"ep_size": 1}) if cfg.moe.enabled else cfg.moe
    model = build_pretrainer(cfg.model, moe, cfg.active_objectives, text, image)
    state = consolidate(str(latest_checkpoint(run_dir)), cfg.deepspeed.zero_stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError([f"{run_dir}: checkpoint does not fit the run's config (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})"])
    return LoadedRun(cfg=cfg, model=model.eval(), tokenizer=tok, text=text)


def _encode(run: LoadedRun, captions: list[str]) -> tuple[Any, Any]:
    import torch

    from jobs.data.tokenizer import encode

    ids, mask = encode(run.tokenizer, captions, run.cfg.data.max_text_len, pad_id=run.text.pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def clip_scores(clip: LoadedRun, images_BCHW: Any, caption: str) -> list[float]:
    """Cosine similarity of each image to the caption under a CLIP run's joint embeddings."""
    import torch
    import torch.nn.functional as F

    from models.encoders.base import CONTRASTIVE

    size = clip.cfg.data.image_size
    if images_BCHW.shape[-1] != size:
        images_BCHW = F.interpolate(images_BCHW, size=(size, size), mode="bicubic", align_corners=False)
    ids, mask = _encode(clip, [caption])
    B = images_BCHW.shape[0]
    with torch.no_grad():
        out = clip.model.encoder({"image": images_BCHW, "input_ids": ids.expand(B, -1),
                                  "attention_mask": mask.expand(B, -1)}, want=CONTRASTIVE)
    return (out["image_embed"].float() * out["text_embed"].float()).sum(-1).tolist()


def save_grid(images_u8: Any, path: Path, columns: int = GRID_COLUMNS, scale: int = GRID_SCALE) -> Path:
    """uint8 [B, H, W, 3] images as one PNG grid, row-major, 2 px light gaps."""
    from PIL import Image

    B, H, W, _ = images_u8.shape
    cols = min(columns, B)
    rows = -(-B // cols)
    gap = 2
    grid = Image.new("RGB", (cols * (W * scale + gap) + gap, rows * (H * scale + gap) + gap), (255, 255, 255))
    for i in range(B):
        tile = Image.fromarray(images_u8[i], "RGB").resize((W * scale, H * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (gap + (i % cols) * (W * scale + gap), gap + (i // cols) * (H * scale + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def generate(run_dir: Path, caption: str, samples: int, *, top_k: int, temperature: float, seed: int,
             clip_dir: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Sample, judge, rerank and write the grid; returns what was written and each sample's figures."""
    import torch

    from jobs.generative.probe import to_uint8
    from jobs.generative.scene_check import caption_objects, check

    if samples < 1:
        raise ConfigError([f"--samples = {samples}: allowed: >= 1"])
    if temperature <= 0:
        raise ConfigError([f"--temperature = {temperature}: allowed: > 0"])
    run = load_run(run_dir, preset="dalle")
    clip = load_run(clip_dir, preset="clip") if clip_dir is not None else None
    ids, mask = _encode(run, [caption])
    generator = torch.Generator().manual_seed(seed)
    codes = run.model.encoder.generate(ids.expand(samples, -1), mask.expand(samples, -1), top_k=top_k,
                                       temperature=temperature, generator=generator)
    images = run.model.encoder.decode(codes).float()
    scores = clip_scores(clip, images, caption) if clip is not None else [None] * samples
    order = sorted(range(samples), key=lambda i: -scores[i]) if clip is not None else list(range(samples))
    pixels = to_uint8(images)[order]
    verdicts = [check(pixels[j], caption) for j in range(samples)]
    slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:60] or "caption"
    grid = out or run_dir / "generated" / f"{slug}_seed{seed}.png"
    save_grid(pixels, grid)
    result = {
        "caption": caption, "objects": sorted(map(list, caption_objects(caption))), "seed": seed, "top_k": top_k,
        "temperature": temperature, "clip": str(clip_dir) if clip_dir else None, "grid": str(grid),
        "match_rate": sum(v.match for v in verdicts) / samples,
        "samples": [{"rank": r, "sample": order[r], "clip_score": scores[order[r]], "match": v.match,
                     "color_match": v.color_match, "shape_match": v.shape_match} for r, v in enumerate(verdicts)],
    }
    grid.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def generate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a DALL-E run directory (runs/<name>) with a checkpoint")],
    caption: Annotated[str, typer.Argument(help='the text, e.g. "a small red circle left of a large blue square"')],
    samples: Annotated[int, typer.Option("--samples", "-n", help="images to sample")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="sample among the k most likely codes; 0 = all")] = 32,
    temperature: Annotated[float, typer.Option(help="softmax temperature of the image-token logits")] = 1.0,
    seed: Annotated[int, typer.Option(help="the samples are a function of the seed")] = 0,
    clip: Annotated[Path | None, typer.Option("--clip", help="a CLIP run directory: rerank by its scores")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="PNG path (default RUN_DIR/generated/<caption>_seed<S>.png)")] = None,
) -> None:
    """Generate images for a caption with a DALL-E run; writes a PNG grid (best first with --clip)."""
    from orchestrator.cli.console import console, fail

    try:
        result = generate(run_dir, caption, samples, top_k=top_k, temperature=temperature, seed=seed,
                          clip_dir=clip, out=out)
    except ConfigError as exc:
        fail(exc.problems)
    ranked = " (ranked by CLIP)" if clip else ""
    console.print(f"{samples} samples{ranked}: {result['match_rate']:.0%} show the caption's colours and shapes",
                  highlight=False)
    console.print(f"grid: {result['grid']}", highlight=False, soft_wrap=True)


__all__ = ["clip_scores", "generate", "generate_cmd", "load_run", "save_grid"]
