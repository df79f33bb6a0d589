"""Decode work per rank against the number of ranks when there are fewer shards than ranks: the old
stride reading (every rank reads and decodes every shard, then keeps every W-th sample) against
units (each rank fetches and decodes only its own (shard, start, stop) units), side by side in one run.

Both sides run the body of a pipeline read task in this process (no Ray: what is measured is the
task's work, not Ray's): the old one is kept here as `_old_stride_batches` (jobs/data/pipeline.py's
`_shard_batches` before units), the new one is `jobs.data.pipeline._unit_batches` over
`jobs.data.units.rank_units`. For each W every rank's part is read once per side, the side that goes
first alternating with W; CPU-seconds are of every process of this benchmark's tree
(benchmarks/cputime.py; it starts none). Printed: per-rank CPU-seconds (mean over ranks), samples per
rank, and the total over ranks, for each side, and old/new.

    flock /tmp/mmpt_heavy.lock .venv/bin/python -m benchmarks.units [--samples 2048] [--shards 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.cputime import tree_cpu_seconds
from jobs.data.pipeline import PipelineSpec, _columns, _unit_batches, unit_item
from jobs.data.reader import iter_rows
from jobs.storage import StorageOptions


def _old_stride_batches(shards: list[str], spec: PipelineSpec, seed: int, epoch: int, rank: int,
                        world: int) -> Iterator[dict[str, np.ndarray]]:
    """The read task before units, with fewer shards than ranks: each shard read whole, every
    sample decoded (reader.iter_rows), and every world-th one kept."""
    for shard in shards:
        rows: list[dict[str, Any]] = []
        for row in iter_rows(shard, spec.read, seed=zlib.crc32(f"{seed}:{epoch}:{shard}".encode()), start=0):
            if row["offset"] % world != rank:
                continue
            row["unit_pos"] = 0
            rows.append(row)
            if len(rows) == 256:
                yield _columns(rows, spec)
                rows = []
        if rows:
            yield _columns(rows, spec)


def _old_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def _new_batches(shards: list[str], spec: PipelineSpec, seed: int, epoch: int, rank: int,
                 world: int, unit_samples: int) -> Iterator[dict[str, np.ndarray]]:
    from jobs.data.index import shard_index
    from jobs.data.units import rank_units

    units = rank_units(shards, lambda s: shard_index(s, spec.storage).samples, epoch, rank, world, seed, unit_samples)
    items = [unit_item(u, shard_index(u.shard, spec.storage), i) for i, u in enumerate(units)]
    cols = {k: np.array([it[k] for it in items], dtype=object if k in ("shard", "truncated") else np.int64)
            for k in items[0]}
    yield from _unit_batches(cols, spec, seed, epoch, ledger=None)


def _measure(batches: Iterator[dict[str, np.ndarray]]) -> tuple[float, int]:
    me = psutil.Process()
    before = tree_cpu_seconds(me)
    rows = sum(len(b["input_ids"]) for b in batches)
    return tree_cpu_seconds(me) - before, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048, help="samples in all")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--unit-samples", type=int, default=512)
    args = ap.parse_args()

    from jobs.data.synth import write_synthetic

    with tempfile.TemporaryDirectory(prefix="mmpt-units-") as tmp:
        res = write_synthetic(tmp, samples=args.samples, shards=args.shards, seed=1, image_size=args.image_size,
                              eval_samples=64)
        shards = sorted(str(p) for p in (Path(tmp) / "train").glob("*.tar"))
        spec = PipelineSpec(tokenizer_uri=str(Path(tmp) / "tokenizer.json"), image_size=args.image_size,
                            max_text_len=32, max_objects=3, storage=StorageOptions())
        del res
        _measure(_new_batches(shards, spec, 0, 0, 0, 1, args.unit_samples))  # warm: imports, tokenizer, caches
        print(f"decode work per rank: {args.samples} samples in {len(shards)} shards, {args.image_size}px, "
              f"units of {args.unit_samples}; CPU-seconds of this process tree (no Ray on either side)")
        for n, world in enumerate(int(w) for w in args.worlds.split(",")):
            got: dict[str, list[tuple[float, int]]] = {"old": [], "new": []}
            order = ["old", "new"] if n % 2 == 0 else ["new", "old"]
            for side in order:
                for rank in range(world):
                    it = (_old_stride_batches(_old_order(shards, 0, 0), spec, 0, 0, rank, world) if side == "old"
                          else _new_batches(shards, spec, 0, 0, rank, world, args.unit_samples))
                    got[side].append(_measure(it))
            line = [f"W={world} ({order[0]} first):"]
            for side in ("old", "new"):
                cpu = [c for c, _ in got[side]]
                rows = [r for _, r in got[side]]
                line.append(f"{side} {np.mean(cpu):.3f} CPU-s/rank for {np.mean(rows):.0f} samples/rank "
                            f"(all ranks {sum(cpu):.3f} CPU-s, {sum(rows)} samples);")
            ratio = np.mean([c for c, _ in got["old"]]) / max(np.mean([c for c, _ in got["new"]]), 1e-9)
            print(" ".join(line) + f" old/new per rank {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
