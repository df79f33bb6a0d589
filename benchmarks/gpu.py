"""bf16 throughput, model-FLOPs utilisation and peak memory on one GPU, dense and MoE, at ZeRO-2.

A few minutes on one GPU: a ~300M-parameter ViLT (BERT-large shape: 24 layers, hidden 1024, 16
heads, 224px images in 16px patches + 40 text tokens) and its MoE variant (8 experts in every
other layer, top-1), each through the run's own DeepSpeed engine (`jobs.engine.build_engine`, world
size 1, NCCL) on random in-memory batches, so the figure is the model's, not the data pipeline's.

    MFU = model FLOP/s / peak dense bf16 FLOP/s of the device
    model FLOPs per token = 6 * N_active + 12 * L * h * s   (PaLM, Chowdhery et al. 2022, App. B:
        matmul weights fwd+bwd, plus attention scores and values); N_active excludes the embedding
        lookups and counts one expert per MoE layer (top-1); tokens = encoder passes x b x s.
Peak memory is torch.cuda.max_memory_allocated against `mmpt plan`'s estimate for the same config.
With no GPU visible it prints one line and exits 0 (checked before torch is imported).

    .venv/bin/python benchmarks/gpu.py [--steps 30] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

# `python benchmarks/gpu.py` puts benchmarks/ first on sys.path, where a sibling script named like a
# package (benchmarks/models.py) would shadow it: import the repository's packages, never siblings.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets, by name substring.
PEAK_BF16: dict[str, float] = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                               "L4": 121e12}


def _no_gpu() -> str | None:
    """Why there is no GPU to use, or None. Device nodes first: importing torch costs seconds."""
    if not any(os.path.exists(node) for node in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")):
        return "gpu benchmark skipped: no GPU visible (no /dev/nvidia0 or /dev/kfd device node)"
    import torch

    if not torch.cuda.is_available():
        return "gpu benchmark skipped: no GPU visible (torch.cuda.is_available() is False)"
    return None


def _peak(name: str) -> float | None:
    for key, flops in PEAK_BF16.items():
        if key in name:
            return flops
    return None


def _config(moe: bool, batch_size: int):  # noqa: ANN202 - RunConfig
    from jobs.config import RunConfig

    return RunConfig.model_validate({
        "name": "gpu-moe" if moe else "gpu-dense",
        "model": {"preset": "vilt", "hidden_size": 1024, "num_layers": 24, "num_heads": 16, "mlp_ratio": 4.0,
                  "patch_size": 16, "dropout": 0.0},
        "moe": {"num_experts": 8 if moe else 0, "ep_size": 1, "layers": "every_other"},
        "data": {"image_size": 224, "max_text_len": 40},
        "train": {"batch_size": batch_size, "precision": "bf16", "warmup_steps": 0},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": True},
    })


def _steps(engine: Any, batches: list[dict[str, Any]], n: int) -> None:
    for i in range(n):
        out = engine(batches[i % len(batches)])
        engine.backward(out["loss"])
        engine.step()


def _bench(moe: bool, steps: int, warmup: int, batch_size: int, vocab: int) -> str:
    import torch

    from jobs.data.batch import to_model_batch
    from jobs.engine import build_engine
    from models import build_pretrainer
    from models.config import ImageSpec, TextSpec
    from orchestrator.plan import GiB, count_model, estimate

    cfg = _config(moe, batch_size)
    text = TextSpec(vocab_size=vocab, max_len=cfg.data.max_text_len)
    image = ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects)
    size = count_model(cfg, vocab)
    torch.manual_seed(0)
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, text, image)
    # lookup tables, not matmuls: word and position embeddings
    embed = sum(p.numel() for name, p in model.named_parameters() if name.endswith("word.weight") or ".position_" in name)
    engine = build_engine(cfg, model)
    device = engine.device
    torch.cuda.reset_peak_memory_stats()
    b, T, s = batch_size, cfg.data.max_text_len, size.seq_len
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (b, 3, image.size, image.size), dtype=torch.uint8, generator=gen),
                "input_ids": torch.randint(5, vocab, (b, T), generator=gen),
                "attention_mask": torch.ones(b, T, dtype=torch.long)} for _ in range(4)]
    batches = [to_model_batch(x, device, torch.bfloat16) for x in batches]

    _steps(engine, batches, warmup)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _steps(engine, batches, steps)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    samples_s = b * steps / elapsed
    tokens_s = size.views * b * s * samples_s / b  # every encoder pass (objective view) is model work
    active = size.dense - embed + (size.expert // cfg.moe.num_experts if moe else 0)
    flops_per_token = 6 * active + 12 * cfg.model.num_layers * cfg.model.hidden_size * s
    peak = _peak(torch.cuda.get_device_name())
    mfu = f"{100 * flops_per_token * tokens_s / peak:.1f} %" if peak else "n/a (device not in PEAK_BF16)"
    measured = torch.cuda.max_memory_allocated()
    planned = estimate(cfg, size, gpus=1, stage=2, ep=1).total
    del engine, model, batches
    torch.cuda.empty_cache()
    name = f"MoE x{cfg.moe.num_experts}" if moe else "dense"
    return (f"{name:8s} {(size.dense + size.expert) / 1e6:.0f}M params ({active / 1e6:.0f}M active, non-embedding), "
            f"bf16 ZeRO-2, b={b} s={s} x{size.views} passes: {samples_s:.1f} samples/s, "
            f"{flops_per_token * tokens_s / 1e12:.0f} TFLOP/s, MFU {mfu}; peak memory {measured / GiB:.2f} GiB, "
            f"plan {planned / GiB:.2f} GiB (measured/plan {measured / planned:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels)")
    ap.add_argument("--batch-size", type=int, default=32, help="micro-batch")
    ap.add_argument("--vocab-size", type=int, default=8000, help="text vocabulary (data.vocab_size's default)")
    ap.add_argument("--only", choices=["dense", "moe"], default=None)
    args = ap.parse_args()
    skip = _no_gpu()
    if skip:
        print(skip)
        sys.exit(0)

    import torch
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    try:
        for moe in (False, True):
            if args.only in (None, "moe" if moe else "dense"):
                print(_bench(moe, args.steps, args.warmup, args.batch_size, args.vocab_size), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
