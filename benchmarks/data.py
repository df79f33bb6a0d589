"""Input throughput: samples/s the Ray Data pipeline delivers to training workers, side by side with
a plain single-process reader (tarfile + PIL + the tokenizer) on the same shards, local and S3.

The pipeline is what training uses: one `RankStream` per worker (2 Ray actors standing in for the
2 training workers of the quickstart, each consuming its rank's stream as torch batches). The plain
reader does the same decode/resize/tokenize work in one process. Per-core figures divide by the
CPUs each used (the pipeline's Ray Data tasks get `--cpus`; the plain reader has one).

    .venv/bin/python -m benchmarks.data [--samples 3000] [--shards 8] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np


def _plain(shards: list[str], tokenizer: str, image_size: int, opts) -> tuple[int, float]:  # noqa: ANN001
    from jobs.data.formats import caption, image_bytes, iter_shard
    from jobs.data.reader import decode_image
    from jobs.data.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(tokenizer, opts)
    t0, n, texts = time.perf_counter(), 0, []
    for shard in shards:
        for s in iter_shard(shard, opts):
            decode_image(image_bytes(s), image_size)  # type: ignore[arg-type]
            texts.append(caption(s))
            n += 1
            if len(texts) == 64:
                encode(tok, texts, 32)
                texts = []
    if texts:
        encode(tok, texts, 32)
    return n, time.perf_counter() - t0


def _pipeline(shards: list[str], spec, world: int) -> tuple[int, float]:  # noqa: ANN001
    import ray

    @ray.remote(num_cpus=0)
    class Consumer:
        def consume(self, rank: int) -> int:
            import ray.data

            from jobs.data.stream import RankStream

            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False
            stream = RankStream(shards, spec, batch_size=32, rank=rank, world=world, seed=0)
            n, first = 0, None
            for b in stream.epoch():
                n += int(b["input_ids"].shape[0])
                first = first or (time.perf_counter(), n)
            return first[0], first[1], time.perf_counter(), n

    consumers = [Consumer.remote() for _ in range(world)]
    ray.get([c.__ray_ready__.remote() for c in consumers])
    t0 = time.perf_counter()
    out = ray.get([c.consume.remote(r) for r, c in enumerate(consumers)])
    # steady state: from the first batch each consumer got to its last one (start-up excluded)
    steady = sum(n - n0 for _, n0, _, n in out) / max(t1 - tf for tf, _, t1, _ in out)
    startup = max(tf for tf, _, _, _ in out) - t0
    return steady, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray Data may use")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    from jobs.data.pipeline import PipelineSpec
    from jobs.data.synth import write_synthetic
    from jobs.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = StorageOptions(endpoint_url=f"http://{host}:{port}")
    boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="bench-data")
    local = StorageOptions()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="mmpt-bench-data-") as tmp:
            sources = {"local": (tmp, local), "s3": ("s3://bench-data/shapes", s3)}
            print(f"{args.samples} samples in {args.shards} shards, image 64 px -> {args.image_size} px, "
                  f"pipeline: 2 consumers, Ray Data on {args.cpus} CPUs; plain: 1 process")
            for name, (root, opts) in sources.items():
                res = write_synthetic(root, samples=args.samples, shards=args.shards, seed=0, image_size=64,
                                      eval_samples=16, options=opts)
                spec = PipelineSpec(tokenizer_uri=res.tokenizer, image_size=args.image_size, max_text_len=32,
                                    max_objects=3, storage=opts)
                plain, pipe, starts = [], [], []
                for _ in range(args.repeats):  # alternate, so drift hits both alike
                    n, t = _plain(res.train_shards, res.tokenizer, args.image_size, opts)
                    plain.append(n / t)
                    rate, startup = _pipeline(res.train_shards, spec, world=2)
                    pipe.append(rate)
                    starts.append(startup)
                p, q = float(np.median(plain)), float(np.median(pipe))
                print(f"{name:>5}: plain reader {p:7.0f} samples/s ({p:.0f}/core) | Ray Data pipeline, steady "
                      f"state {q:7.0f} samples/s ({q / args.cpus:.0f}/core) | per-core ratio {q / args.cpus / p:.2f} "
                      f"(total {q / p:.2f}) | pipeline start-up {float(np.median(starts)):.1f} s")
    finally:
        ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
