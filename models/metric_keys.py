"""The names of the metrics a run reports: one place that builds and parses them, for the code
that writes them (models/moe/stats.py, jobs/trainer.py, jobs/train_loop.py) and the driver side that
reads them back (summary, reports, the controller's exporter, sweep metric checks), so renaming a
metric is one edit. It lives in models/, the lowest layer that writes a key, and imports nothing
heavy: the CLI and the controller read keys without importing torch.

A key is `<group>/<name>`: `loss/<objective>` (and `loss/total`), `train/<objective metric>`,
`eval/<metric>`, `memory/<part>_bytes`, `data/...`, and MoE's `moe/layer<i>/<stat>` and
`moe/dropped`. Keys without a group (`step`, `samples_per_s`,
...) are the throughput figures in THROUGHPUT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

LOSS, TRAIN, EVAL, MEMORY, DATA, MOE = "loss/", "train/", "eval/", "memory/", "data/", "moe/"
TOTAL_LOSS = LOSS + "total"
MOE_DROPPED = MOE + "dropped"
MEMORY_TOTAL = MEMORY + "total_bytes"
EVAL_LOSS = EVAL + "loss"
CHANCE_R1 = EVAL + "chance_r1"
RETRIEVAL_R1 = (EVAL + "i2t_r1", EVAL + "t2i_r1")
DOWNSTREAM = (EVAL + "zs_", EVAL + "probe_")  # zero-shot and linear-probe transfer metrics
THROUGHPUT = ("samples_per_s", "tokens_per_s", "step_time_s", "data_wait_share")

_MOE_LAYER = re.compile(rf"^{re.escape(MOE)}layer(\d+)/(.+)$")


def key(group: str, name: str) -> str:
    """`group` is one of the prefixes above (with its slash): key(LOSS, "itc") == "loss/itc"."""
    return f"{group}{name}"


def keyed(group: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """{name: v} -> {group/name: v}: the inverse of `strip`."""
    return {group + k: v for k, v in values.items()}


def strip(group: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's keys of `group`, without the prefix: strip(LOSS, {"loss/itc": 1}) == {"itc": 1}."""
    return {k[len(group):]: v for k, v in record.items() if k.startswith(group)}


def has(group: str, record: Mapping[str, Any]) -> bool:
    return any(k.startswith(group) for k in record)


def last_of(group: str, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`strip(group, r)` of the last record that has the group (eval runs every few steps only)."""
    return next((strip(group, r) for r in reversed(list(records)) if has(group, r)), {})


def first_of(group: str, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`strip(group, r)` of the first record that has the group (memory is reported once)."""
    return next((strip(group, r) for r in records if has(group, r)), {})


def moe_layer_key(index: int, name: str) -> str:
    """moe_layer_key(3, "load") == "moe/layer3/load": an MoE layer's statistic (models/moe/stats.py)."""
    return f"{MOE}layer{index}/{name}"


def moe_layer(name: str) -> tuple[int, str] | None:
    """"moe/layer3/load" -> (3, "load"); None for any other key."""
    m = _MOE_LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


__all__ = ["CHANCE_R1", "DATA", "DOWNSTREAM", "EVAL", "EVAL_LOSS", "LOSS", "MEMORY", "MEMORY_TOTAL", "MOE",
           "MOE_DROPPED", "RETRIEVAL_R1", "THROUGHPUT", "TOTAL_LOSS", "TRAIN", "first_of", "has", "key", "keyed",
           "last_of", "moe_layer", "moe_layer_key", "strip"]
