"""The GPU check: one script, one GPU, a few minutes (`bash benchmarks/gpu_check.sh`). Prints, side by side:

1. bf16 throughput and model-FLOPs utilisation of a ~300M dense ViLT (BERT-large shape: 24 layers,
   hidden 1024, 16 heads; 224 px in 16 px patches + 40 text tokens) and its MoE variant (8 experts in
   every other layer, top-1), each through the run's own DeepSpeed engine (`jobs.engine.build_engine`,
   ZeRO-2) and the run's own step code (`jobs.trainer.Trainer.train_step`), on in-memory batches;
   and the dense model again with the old attention (a boolean mask on every call, which rules out
   FlashAttention): the ratio is what the fused kernel buys.
       MFU = model FLOP/s / peak dense bf16 FLOP/s of the device
       model FLOPs per token = 6 N_active + 12 L h s  (PaLM, Chowdhery et al. 2022, App. B: weight
         matmuls forward and backward, plus attention scores and values); N_active leaves out the
         embedding lookups and counts one expert per MoE layer (top-1); tokens = passes x b x s.
2. Which SDPA kernels the attention calls are eligible for (unpadded, padded, old mask).
3. Peak GPU memory of each model against `mmpt plan`'s estimate for the same config.
4. A short real training loop on NCCL, world size 1: shapes-world shards made here and read by the
   pipeline's own code without Ray (jobs/data/local.py), MLM + ITM + MoE, held-out evaluation,
   a checkpoint saved and restored into a fresh engine: the loss must be finite, every restored
   tensor equal to the saved one, and the restored engine's next loss equal to the original's.

Where torch sees no GPU the same script runs on the CPU (gloo, small sizes) and prints samples/s. A
machine whose GPUs this torch cannot use fails with the one-line reason (`mmpt doctor` explains).
Runs where only PyTorch is installed: DeepSpeed, pydantic and their few dependencies can be carried
as wheels (benchmarks/gpu_wheels.sh); Ray is not needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets, by name substring.
PEAK_BF16: dict[str, float] = {"H100 PCIe": 756e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
                               "L40S": 362e12, "A10": 125e12, "L4": 121e12}
MFU_GOAL = 0.40  # the goal for the dense preset on an H100/H200 (torchtitan reports 33-39 %)


def peak_flops(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def _config(*, gpu: bool, moe: bool, batch_size: int, big: bool) -> Any:  # noqa: ANN401 - RunConfig
    from jobs.config import RunConfig

    model = ({"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "patch_size": 16} if big else
             {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "patch_size": 16})
    return RunConfig.model_validate({
        "name": "gpu-check-moe" if moe else "gpu-check",
        "model": {"preset": "vilt", "mlp_ratio": 4.0, "dropout": 0.0, **model},
        "moe": {"num_experts": 8 if moe else 0, "ep_size": 1, "layers": "every_other"},
        "objectives": {"mlm": 1.0, "itm": 1.0},
        "data": {"image_size": 224 if big else 64, "max_text_len": 40},
        "train": {"batch_size": batch_size, "precision": "bf16" if gpu else "fp32", "warmup_steps": 0},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": gpu},
    })


def _random_batches(cfg: Any, vocab: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Host batches with no padding (every caption fills the context): the FlashAttention case."""
    b, T, size = cfg.train.batch_size, cfg.data.max_text_len, cfg.data.image_size
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        batch = {"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen),
                 "input_ids": torch.randint(5, vocab, (b, T), generator=gen),
                 "attention_mask": torch.ones(b, T, dtype=torch.long)}
        out.append({k: v.pin_memory() for k, v in batch.items()} if torch.cuda.is_available() else batch)
    return out


@contextmanager
def old_attention() -> Any:
    """The attention before the fast path: a boolean mask on every call (all-True where nothing is
    padded, causal AND real keys for causal text)."""
    from models.encoders import layers

    real = layers._sdpa

    def legacy(q, k, v, allow, dropout):  # noqa: ANN001, ANN202
        mask = allow.mask
        if mask is None:
            mask = torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
            if allow.causal:
                mask = mask & layers.causal_mask(q.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    layers._sdpa = legacy
    try:
        yield
    finally:
        layers._sdpa = real


def _build(cfg: Any, vocab: int) -> tuple[Any, Any]:
    from jobs.engine import build_engine
    from models import build_pretrainer
    from models.config import ImageSpec, TextSpec

    text = TextSpec(vocab_size=vocab, max_len=cfg.data.max_text_len)
    image = ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects)
    torch.manual_seed(cfg.train.seed)
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, text, image)
    return model, build_engine(cfg, model)


def throughput(cfg: Any, vocab: int, steps: int, warmup: int, old: bool = False) -> dict[str, Any]:
    """samples/s, model TFLOP/s, MFU and peak memory vs plan for one config, through Trainer.train_step."""
    from jobs.trainer import Trainer
    from orchestrator.run.memory_plan import count_model, estimate

    size = count_model(cfg, vocab)
    model, engine = _build(cfg, vocab)
    trainer = Trainer(cfg, engine, visual_tokens=model.num_visual_tokens)
    trainer.memory = {}  # no model-state census here: peak memory is measured below
    batches = _random_batches(cfg, vocab)
    gpu = engine.device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with old_attention() if old else _nothing():
        for i in range(warmup):
            trainer.train_step([batches[i % len(batches)]])
        _sync(gpu)
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.train_step([batches[i % len(batches)]])
        _sync(gpu)
        elapsed = time.perf_counter() - t0
        loss = trainer.report()["loss/total"]
    b, s, L, h = cfg.train.batch_size, size.seq_len, cfg.model.num_layers, cfg.model.hidden_size
    embed = sum(p.numel() for n, p in model.named_parameters() if n.endswith("word.weight") or ".position_" in n)
    active = size.dense - embed + (size.expert // cfg.moe.num_experts if cfg.moe.enabled else 0)
    flops_token = 6 * active + 12 * L * h * s
    samples_s = b * steps / elapsed
    out = {"samples_s": samples_s, "tflops": flops_token * size.views * s * samples_s / 1e12, "loss": loss,
           "params": size.dense + size.expert, "active": active, "b": b, "s": s, "views": size.views}
    if gpu:
        peak = peak_flops(torch.cuda.get_device_name())
        out["mfu"] = out["tflops"] * 1e12 / peak if peak else None
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["plan_gib"] = estimate(cfg, size, gpus=1, stage=cfg.deepspeed.zero_stage, ep=1).total / 2**30
    del engine, model, trainer
    if gpu:
        torch.cuda.empty_cache()
    return out


@contextmanager
def _nothing() -> Any:
    yield


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def attention_kernels(cfg: Any, vocab: int) -> list[str]:
    """Which fused SDPA kernels the model's attention calls may use (CUDA only)."""
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    from models.encoders import layers

    model, engine = _build(cfg, vocab)
    seen: dict[str, tuple[bool, bool]] = {}
    real = F.scaled_dot_product_attention

    def spy(label: str):  # noqa: ANN202
        def call(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):  # noqa: ANN001, ANN202
            if label not in seen:
                p = SDPAParams(q, k, v, attn_mask, dropout_p, is_causal, False)
                seen[label] = (can_use_flash_attention(p, False), can_use_efficient_attention(p, False))
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        return call

    from jobs.data.batch import to_model_batch

    full = to_model_batch(_random_batches(cfg, vocab, 1)[0], engine.device, torch.bfloat16)
    padded = dict(full, attention_mask=full["attention_mask"].clone())
    padded["attention_mask"][:, cfg.data.max_text_len // 2:] = 0
    padded.pop("text_full")
    with torch.no_grad():
        for label, batch, old in (("unpadded", full, False), ("padded", padded, False), ("old mask", full, True)):
            layers.F.scaled_dot_product_attention = spy(label)
            try:
                with old_attention() if old else _nothing():
                    engine(batch)
            finally:
                layers.F.scaled_dot_product_attention = real
    del engine, model
    torch.cuda.empty_cache()
    return [f"{label:9s} flash: {'yes' if f else 'no '}  mem-efficient: {'yes' if m else 'no'}"
            for label, (f, m) in seen.items()]


def training_loop(gpu: bool, steps: int, workdir: str) -> list[str]:
    """A short run of the real step, eval and checkpoint code; raises AssertionError on a failure."""
    from jobs import checkpoint as ckpt
    from jobs.config import RunConfig
    from jobs.data.local import local_batches
    from jobs.data.pipeline import PipelineSpec
    from jobs.data.synth import write_synthetic
    from jobs.data.tokenizer import load_tokenizer, text_spec
    from jobs.evaluate import evaluate, grounded_token_ids
    from jobs.storage import StorageOptions
    from jobs.trainer import Trainer

    data = write_synthetic(os.path.join(workdir, "shapes"), samples=2048, shards=4, seed=0, image_size=64,
                           eval_samples=256)
    cfg = RunConfig.model_validate({
        "name": "gpu-check-loop",
        "model": {"preset": "vilt", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "patch_size": 8,
                  "mlp_ratio": 2.0, "dropout": 0.0},
        "moe": {"num_experts": 4, "ep_size": 1, "gate": "switch", "layers": "every_other"},
        "objectives": {"mlm": 1.0, "itm": 1.0},
        "data": {"image_size": 64, "max_text_len": 32},
        "train": {"steps": steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5,
                  "precision": "bf16" if gpu else "fp32"},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": gpu},
    })
    spec = PipelineSpec(tokenizer_uri=data.tokenizer, image_size=64, max_text_len=32, max_objects=cfg.data.max_objects,
                        storage=StorageOptions())
    from models import build_pretrainer
    from models.config import ImageSpec

    text = text_spec(load_tokenizer(data.tokenizer), 32)
    image = ImageSpec(size=64, max_objects=cfg.data.max_objects)

    def fresh() -> tuple[Any, Any]:
        from jobs.engine import build_engine

        torch.manual_seed(cfg.train.seed)
        model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, text, image)
        return model, build_engine(cfg, model)

    model, engine = fresh()
    trainer = Trainer(cfg, engine, visual_tokens=model.num_visual_tokens)

    def batches(epoch: int = 0):  # noqa: ANN202
        while True:
            yield from local_batches(data.train_shards, spec, 32, seed=0, epoch=epoch, pin_memory=gpu)
            epoch += 1

    stream = batches()
    first = last = None
    t0 = time.perf_counter()
    while trainer.state.step < steps:
        trainer.train_step([next(stream)])
        if trainer.state.step in (1, steps) or trainer.state.step % 20 == 0:
            loss = trainer.report()["loss/total"]
            first = loss if first is None else first
            last = loss
    train_s = time.perf_counter() - t0
    assert last is not None and torch.isfinite(torch.tensor(last)), f"loss is not finite: {last}"
    from jobs.data.datasets.shapes import card  # the synthetic data's own dataset card: its grounded words

    grounded = grounded_token_ids(data.tokenizer, card().grounded_words)
    ev = evaluate(engine.module, local_batches(data.eval_shards, spec, 16, seed=None, pin_memory=gpu),
                  device=engine.device, dtype=trainer.dtype, grounded_ids=grounded)
    lines = [f"{steps} steps in {train_s:.1f} s ({steps * 32 / train_s:.0f} samples/s): loss {first:.3f} -> "
             f"{last:.3f}; eval on {ev['samples']:.0f} held-out samples: ITM acc {ev['itm_acc']:.3f}, "
             f"i2t R@1 {ev['i2t_r1']:.3f} (chance {ev['chance_r1']:.3f}), MLM acc {ev['mlm_token_acc']:.3f}"]

    saved_dir = os.path.join(workdir, "checkpoint")
    with ckpt.staged(engine, trainer.state, 0, {"epoch": 0, "unit": 0, "offset": 0}) as folder:
        shutil.copytree(folder, saved_dir)
    probe = next(stream)
    torch.manual_seed(123)
    with torch.no_grad():
        expected = float(engine(_device_batch(probe, trainer))["loss"])
    reference = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    del engine, trainer, model

    model2, engine2 = fresh()
    with torch.no_grad():  # make sure the restore, not the same seed, is what makes them equal
        for p in engine2.module.parameters():
            p.add_(1.0)
    ckpt.restore(engine2, saved_dir, ckpt.read(saved_dir, 0, 1))
    restored = engine2.module.state_dict()
    same = [k for k, v in reference.items() if torch.equal(v, restored[k])]
    assert len(same) == len(reference), f"restored tensors differ: {sorted(set(reference) - set(same))[:5]}"
    torch.manual_seed(123)
    trainer2 = Trainer(cfg, engine2, visual_tokens=model2.num_visual_tokens)
    with torch.no_grad():
        got = float(engine2(_device_batch(probe, trainer2))["loss"])
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), f"restored loss {got} != {expected}"
    lines.append(f"checkpoint: saved and restored into a fresh engine: {len(same)}/{len(reference)} tensors "
                 f"equal; next-batch loss {got:.5f} (original {expected:.5f})")
    return lines


def _device_batch(raw: dict[str, torch.Tensor], trainer: Any) -> dict[str, torch.Tensor]:
    from jobs.data.batch import to_model_batch

    return to_model_batch(raw, trainer.device, trainer.dtype)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every group and op build at INFO: keep this script's output to its figures."""
    import contextlib
    import io
    import logging

    from models.deepspeed_import import import_deepspeed

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import_deepspeed()  # creates its logger, says which accelerator it found (MLflow hidden: 2-3 s less)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _init_process_group(gpu: bool) -> str:
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(0)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group(backend, rank=0, world_size=1)
    return backend


def _fmt(name: str, r: dict[str, Any]) -> str:
    line = (f"{name:26s} {r['params'] / 1e6:5.0f}M params ({r['active'] / 1e6:.0f}M active), b={r['b']} s={r['s']} "
            f"x{r['views']} passes: {r['samples_s']:8.1f} samples/s")
    if "mfu" in r:  # a GPU: model FLOP/s and utilisation
        line += f", {r['tflops']:7.1f} TFLOP/s"
    if r.get("mfu") is not None:
        line += f", MFU {100 * r['mfu']:.1f} %"
    if "peak_gib" in r:
        line += f"; peak {r['peak_gib']:.2f} GiB vs plan {r['plan_gib']:.2f} GiB ({r['peak_gib'] / r['plan_gib']:.2f})"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (GPU 20, CPU 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 3)")
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch (GPU 32, CPU 8)")
    ap.add_argument("--loop-steps", type=int, default=None, help="training-loop steps (GPU 200, CPU 30)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--skip", choices=["throughput", "kernels", "loop"], action="append", default=[])
    args = ap.parse_args()

    from orchestrator.doctor.probes import gpu_problem

    problem = gpu_problem()
    if problem:  # never a silent CPU fallback on a GPU machine
        print(f"gpu check FAILED: {problem}", flush=True)
        sys.exit(1)
    gpu = torch.cuda.is_available()
    steps = args.steps or (20 if gpu else 10)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    batch = args.batch_size or (32 if gpu else 8)
    started = time.perf_counter()
    _quiet_deepspeed()
    backend = _init_process_group(gpu)
    where = (f"{torch.cuda.get_device_name()} (compute {'.'.join(map(str, torch.cuda.get_device_capability()))})"
             if gpu else f"CPU ({os.cpu_count()} cores; no GPU visible: small sizes, fp32)")
    print(f"device: {where}; torch {torch.__version__}; backend {backend}, world size 1", flush=True)
    ok = True
    try:
        if "throughput" not in args.skip:
            print("[1] throughput" + (" (bf16, ZeRO-2)" if gpu else " (fp32, ZeRO-2)"), flush=True)
            dense = throughput(_config(gpu=gpu, moe=False, batch_size=batch, big=gpu), args.vocab_size, steps, warmup)
            print("  " + _fmt("dense", dense), flush=True)
            moe = throughput(_config(gpu=gpu, moe=True, batch_size=batch, big=gpu), args.vocab_size, steps, warmup)
            print("  " + _fmt("MoE x8 (top-1)", moe), flush=True)
            old = throughput(_config(gpu=gpu, moe=False, batch_size=batch, big=gpu), args.vocab_size, steps, warmup,
                             old=True)
            print("  " + _fmt("dense, old boolean masks", old), flush=True)
            print(f"  fused attention vs old boolean masks: {dense['samples_s'] / old['samples_s']:.2f}x samples/s; "
                  f"MoE vs dense: {moe['samples_s'] / dense['samples_s']:.2f}x", flush=True)
            if gpu and dense.get("mfu") is not None:
                verdict = "meets" if dense["mfu"] >= MFU_GOAL else "BELOW"
                print(f"  dense MFU {100 * dense['mfu']:.1f} % {verdict} the {100 * MFU_GOAL:.0f} % goal", flush=True)
        if "kernels" not in args.skip:
            if gpu:
                print("[2] SDPA kernels the attention may use (dense model):", flush=True)
                for line in attention_kernels(_config(gpu=gpu, moe=False, batch_size=batch, big=gpu), args.vocab_size):
                    print("  " + line, flush=True)
            else:
                print("[2] SDPA kernels: n/a on the CPU", flush=True)
        if "loop" not in args.skip:
            print("[3] training loop (real step, eval and checkpoint code; no Ray)", flush=True)
            with tempfile.TemporaryDirectory(prefix="mmpt-gpu-check-") as workdir:
                try:
                    for line in training_loop(gpu, args.loop_steps or (200 if gpu else 30), workdir):
                        print("  " + line, flush=True)
                except AssertionError as exc:
                    ok = False
                    print(f"  FAILED: {exc}", flush=True)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    print(f"gpu check {'passed' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
