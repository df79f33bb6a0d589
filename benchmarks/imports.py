"""What DeepSpeed's first import costs every process that trains (each Ray Train worker, every run)
and every `mmpt plan / export / doctor`: `import deepspeed` (the old way, MLflow installed) against
`models.deepspeed_import.import_deepspeed()` (MLflow hidden from DeepSpeed's autotuner), each in a
fresh interpreter after `import torch`, alternating which goes first; medians of the child's CPU
seconds (user + system) and wall seconds for the DeepSpeed import alone.

    .venv/bin/python -m benchmarks.imports [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, time
import torch
c0, t0 = os.times(), time.perf_counter()
{stmt}
c1, t1 = os.times(), time.perf_counter()
print(json.dumps({{"cpu": (c1.user + c1.system) - (c0.user + c0.system), "wall": t1 - t0,
                  "mlflow": "mlflow" in sys.modules}}))
"""
SIDES = {"import deepspeed": "import deepspeed",
         "import_deepspeed()": "from models.deepspeed_import import import_deepspeed; import_deepspeed()"}


def _one(stmt: str) -> dict[str, float]:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD.format(stmt=stmt)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    got: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    names = list(SIDES)
    for r in range(args.rounds):
        for side in names if r % 2 == 0 else names[::-1]:
            got[side].append(_one(SIDES[side]))
    for side, rows in got.items():
        print(f"{side:20s} CPU {statistics.median(x['cpu'] for x in rows):.2f} s, wall "
              f"{statistics.median(x['wall'] for x in rows):.2f} s (median of {len(rows)}); MLflow imported: "
              f"{rows[-1]['mlflow']}")
    old = statistics.median(x["cpu"] for x in got["import deepspeed"])
    new = statistics.median(x["cpu"] for x in got["import_deepspeed()"])
    print(f"DeepSpeed's first import, CPU-seconds: import_deepspeed() / import deepspeed = {new / old:.2f}")


if __name__ == "__main__":
    main()
