"""Forward+backward speed and parameter counts of every architecture preset, side by side.

All presets at one size (default: the quickstart model, hidden 128, 4 layers, 48 px images, batch
32) on shapes-world batches (real scenes: 1-3 objects with boxes and classes; captions of realistic
lengths with random token ids). Two figures per preset, measured in alternating rounds so every
preset sees the same machine state, in CPU time of the one thread doing the work (other processes
on a shared machine do not count), best round reported with the median beside it:

1. encoder: forward + backward of the encoder alone, every output built and reached (loss = sum of
   mean squares of the outputs): the architecture's cost. The single-stream families' optional
   contrastive outputs (their unimodal passes for itc) are left out: only CLIP's are its architecture.
2. pretrain: one Pretrainer forward + backward with the preset's default objectives (one encoder
   pass per objective view): what a training step costs.

P is the number of visual tokens per sample (36 patches of 8 px; 1 + 3 regions; Pixel-BERT keeps
half of its 36 grid cells in training). "vs vilt" compares pretrain steps. No Ray.

    .venv/bin/python benchmarks/models.py [--hidden 128] [--layers 4] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Run as a script, this file's folder comes first on sys.path, where `models` would be this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from jobs.data.synth import SHAPES, make_sample  # noqa: E402
from models import OBJECTIVES, PRESETS, build_pretrainer, count_parameters  # noqa: E402
from models.blocks import resolve  # noqa: E402
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec  # noqa: E402
from models.encoders.base import CONTRASTIVE  # noqa: E402
from models.families import FAMILIES  # noqa: E402
from models.weights import init_weights  # noqa: E402

FLOAT_OUTPUTS = ("text_hidden", "image_hidden", "pooled", "text_embed", "image_embed", "logit_scale")


def shapes_batch(n: int, size: int, text: TextSpec, max_objects: int = 3, seed: int = 0) -> dict[str, Tensor]:
    rng = random.Random(seed)
    images, boxes, labels, lengths = [], [], [], []
    for _ in range(n):
        img, caption, scene = make_sample(rng, size)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
        objs = scene["objects"][:max_objects]
        b = torch.zeros(max_objects, 4)
        lab = torch.full((max_objects,), -1, dtype=torch.long)
        for i, o in enumerate(objs):
            b[i] = torch.tensor(o["bbox"], dtype=torch.float32) / size
            lab[i] = SHAPES.index(o["shape"])
        boxes.append(b)
        labels.append(lab)
        lengths.append(min(text.max_len, len(caption.split()) + 2))
    ids = torch.randint(5, text.vocab_size, (n, text.max_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(n, text.max_len, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, 0], ids[i, length - 1], ids[i, length:] = text.cls_id, text.sep_id, text.pad_id
        mask[i, :length] = 1
    return {"image": (torch.stack(images) / 255.0 - 0.5) / 0.5, "input_ids": ids, "attention_mask": mask,
            "obj_boxes": torch.stack(boxes), "obj_labels": torch.stack(labels)}


def encoder_step(cfg: ModelConfig, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 batch: dict[str, Tensor]) -> tuple[Callable[[], None], int]:
    blocks = resolve(cfg)
    cls = FAMILIES[blocks.family].encoder_class()
    needs = cls.CAN_PROVIDE if blocks.family == "dual" else cls.CAN_PROVIDE - CONTRASTIVE
    encoder = cls(cfg, blocks, moe, text, image, needs)
    init_weights(encoder)
    encoder.train()

    def step() -> None:
        out = encoder(batch)
        loss = sum(out[k].float().pow(2).mean() for k in FLOAT_OUTPUTS if out.get(k) is not None)
        (loss + out["moe_aux"]).backward()
        encoder.zero_grad(set_to_none=True)

    return step, count_parameters(encoder)


def pretrain_step(cfg: ModelConfig, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                  batch: dict[str, Tensor]) -> tuple[Callable[[], None], int]:
    model = build_pretrainer(cfg, moe, None, text, image).train()

    def step() -> None:
        model(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)

    return step, count_parameters(model)


def measure(steps: dict[str, Callable[[], None]], rounds: int, reps: int) -> dict[str, list[float]]:
    """CPU seconds per step of the calling thread, per round, presets alternating within a round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up: allocator, kernels, first-call overheads
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.thread_time()
            for _ in range(reps):
                step()
            times[name].append((time.thread_time() - t0) / reps)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", type=float, default=2.0)
    ap.add_argument("--image", type=int, default=48)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="steps per preset per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = TextSpec(vocab_size=args.vocab, max_len=args.text_len)
    image = ImageSpec(size=args.image)
    batch = shapes_batch(args.batch, args.image, text)
    moe = MoEConfig()
    enc_steps, pre_steps, enc_params, pre_params, tokens = {}, {}, {}, {}, {}
    for name in PRESETS:
        if PRESETS[name].family in ("dvae", "dalle"):  # no text/image encoder outputs to time
            continue
        cfg = ModelConfig(preset=name, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          mlp_ratio=args.mlp_ratio, dropout=0.0)
        enc_steps[name], enc_params[name] = encoder_step(cfg, moe, text, image, batch)
        pre_steps[name], pre_params[name] = pretrain_step(cfg, moe, text, image, batch)
        tokens[name] = build_pretrainer(cfg, moe, None, text, image).num_visual_tokens
    t0 = time.perf_counter()
    enc = measure(enc_steps, args.rounds, args.reps)
    pre = measure(pre_steps, args.rounds, args.reps)
    print(f"presets at hidden {args.hidden}, {args.layers} layers, {args.heads} heads, mlp x{args.mlp_ratio}, "
          f"{args.image} px images, {args.text_len} tokens, vocab {args.vocab}, batch {args.batch}; "
          f"1 thread, CPU time, best of {args.rounds} rounds x {args.reps} steps (median in brackets); "
          f"measured in {time.perf_counter() - t0:.0f} s wall")
    head = (f"{'preset':<12} {'family':<18} {'visual':<7} {'P':>3} {'enc params':>10} {'enc f+b samples/s':>18} "
            f"{'params':>9} {'step samples/s':>15} {'vs vilt':>7}  objectives (one encoder pass per view)")
    print(head)
    print("-" * len(head))
    best_pre_vilt = args.batch / min(pre["vilt"])
    for name, preset in PRESETS.items():
        if name not in enc:
            continue
        e, p = enc[name], pre[name]
        enc_sps = f"{args.batch / min(e):.0f} ({args.batch / statistics.median(e):.0f})"
        pre_sps = f"{args.batch / min(p):.0f} ({args.batch / statistics.median(p):.0f})"
        objectives = "+".join(preset.default_objectives(OBJECTIVES))
        print(f"{name:<12} {FAMILIES[preset.family].title:<18} {preset.visual_inputs[0]:<7} {tokens[name]:>3} "
              f"{enc_params[name]:>10,} {enc_sps:>18} {pre_params[name]:>9,} {pre_sps:>15} "
              f"{args.batch / min(p) / best_pre_vilt:>6.2f}x  {objectives}")


if __name__ == "__main__":
    main()
