"""Input throughput per CPU-second: the Ray Data pipeline that feeds training workers, side by side
with a plain single-process reader (tarfile + PIL + the tokenizer) on the same shards, local and S3.

The pipeline is what training uses: one `RankStream` per worker (2 Ray actors standing in for the
2 training workers of the quickstart, each consuming its rank's stream as torch batches). The plain
reader does the same decode/resize/tokenize work in one process: what a skilled user writes without
Ray Data.

Fair accounting: each side is charged the CPU-seconds of every process that worked for it. The
pipeline: this driver, Ray's GCS and raylet, the consumer actors and every Ray Data task (sampled
with benchmarks/cputime.py over the process tree, in the consumers' steady window: first batch to
last). The plain reader: its own process time. The two alternate, the first side changing every
repeat, so drift and warm caches hit both alike. Figure: samples per CPU-second of the pipeline /
the plain reader's (goal >= 1.0); the wall-clock rates and the pipeline's start-up are printed too.
The sampler's own CPU (a psutil scan of the tree every 0.25 s, in this driver) is charged to the
pipeline: a small bias against it. The S3 server (moto) runs in this process, so both sides pay it.

    .venv/bin/python -m benchmarks.data [--samples 3000] [--shards 8] [--cpus 2] [--repeats 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/data.py`: the repository's packages, not siblings
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cputime import TreeCPU  # noqa: E402 - after the path fix


@dataclass
class Side:
    samples: int
    wall_s: float
    cpu_s: float
    startup_s: float = 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.samples / max(self.cpu_s, 1e-9)

    @property
    def rate(self) -> float:
        return self.samples / max(self.wall_s, 1e-9)


def _plain(shards: list[str], tokenizer: str, image_size: int, opts) -> Side:  # noqa: ANN001
    """What a skilled user writes: each shard fetched whole in one read (what an S3 client does best:
    one GET, not a stream of small ranges), then the tar parsed, decoded and tokenized in-process."""
    import io

    from jobs import storage
    from jobs.data.formats import caption, image_bytes, iter_tar_samples
    from jobs.data.reader import decode_image
    from jobs.data.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(tokenizer, opts)
    t0, c0, n, texts = time.perf_counter(), time.process_time(), 0, []
    for shard in shards:
        for s in iter_tar_samples(io.BytesIO(storage.read_bytes(shard, opts)), shard):
            decode_image(image_bytes(s), image_size)  # type: ignore[arg-type]
            texts.append(caption(s))
            n += 1
            if len(texts) == 64:
                encode(tok, texts, 32)
                texts = []
    if texts:
        encode(tok, texts, 32)
    return Side(n, time.perf_counter() - t0, time.process_time() - c0)


def _pipeline(shards: list[str], spec, world: int, meter: TreeCPU) -> Side:  # noqa: ANN001
    import ray

    @ray.remote(num_cpus=0)
    class Consumer:
        def consume(self, rank: int) -> tuple[float, int, float, int]:
            import ray.data

            from jobs.data.stream import RankStream

            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False
            stream = RankStream(shards, spec, batch_size=32, rank=rank, world=world, seed=0)
            n, first = 0, None
            for b in stream.epoch():
                n += int(b["input_ids"].shape[0])
                first = first or (time.time(), n)
            return first[0], first[1], time.time(), n

    consumers = [Consumer.remote() for _ in range(world)]
    ray.get([c.__ray_ready__.remote() for c in consumers])
    t0 = time.time()
    out = ray.get([c.consume.remote(r) for r, c in enumerate(consumers)])
    for c in consumers:
        ray.kill(c)
    # steady state: from the first batch any consumer got to the last one (start-up excluded); the
    # samples are those after each consumer's first batch
    start, stop = min(tf for tf, _, _, _ in out), max(t1 for _, _, t1, _ in out)
    samples = sum(n - n0 for _, n0, _, n in out)
    return Side(samples, stop - start, meter.between(start, stop), startup_s=max(tf for tf, *_ in out) - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray Data may use")
    ap.add_argument("--repeats", type=int, default=4)
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
    meter = TreeCPU(interval=0.25).__enter__()  # this driver and every process Ray starts under it
    try:
        with tempfile.TemporaryDirectory(prefix="mmpt-bench-data-") as tmp:
            sources = {"local": (tmp, local), "s3": ("s3://bench-data/shapes", s3)}
            print(f"{args.samples} samples in {args.shards} shards, image 64 px -> {args.image_size} px, "
                  f"pipeline: 2 consumers, Ray Data on {args.cpus} CPUs; plain: 1 process; "
                  f"{args.repeats} alternating pairs, medians")
            for name, (root, opts) in sources.items():
                res = write_synthetic(root, samples=args.samples, shards=args.shards, seed=0, image_size=64,
                                      eval_samples=16, options=opts)
                spec = PipelineSpec(tokenizer_uri=res.tokenizer, image_size=args.image_size, max_text_len=32,
                                    max_objects=3, storage=opts)
                plain: list[Side] = []
                pipe: list[Side] = []
                for i in range(args.repeats):  # alternate which side goes first
                    for side in (("plain", "pipe") if i % 2 == 0 else ("pipe", "plain")):
                        if side == "plain":
                            plain.append(_plain(res.train_shards, res.tokenizer, args.image_size, opts))
                        else:
                            pipe.append(_pipeline(res.train_shards, spec, 2, meter))
                ratios = [q.per_cpu_s / p.per_cpu_s for p, q in zip(plain, pipe, strict=True)]
                p, q = (float(np.median([x.per_cpu_s for x in xs])) for xs in (plain, pipe))
                print(f"{name:>5}: plain reader {p:6.0f} samples/CPU-s ({np.median([x.rate for x in plain]):5.0f}/s) | "
                      f"Ray Data pipeline {q:6.0f} samples/CPU-s ({np.median([x.rate for x in pipe]):5.0f}/s, "
                      f"{np.median([x.cpu_s / x.wall_s for x in pipe]):.2f} CPUs busy) | "
                      f"pipeline/plain per CPU-s {float(np.median(ratios)):.2f} "
                      f"(pairs {', '.join(f'{r:.2f}' for r in ratios)}) | pipeline start-up "
                      f"{float(np.median([x.startup_s for x in pipe])):.1f} s")
    finally:
        meter.__exit__()
        ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
