"""Read tracked runs back with the trackers' own readers, for the tests.

MLflow: `MlflowClient` on the store; TensorBoard: tensorboard's `EventAccumulator`; W&B: the
offline run's transaction log (`run-<id>.wandb`), whose records are wandb's own protobuf
`Record` messages framed in LevelDB's log format (32 KiB blocks of [crc32 u32, length u16, type u8]
chunks after a 7-byte `:W&B` header); wandb ships no reader for it any more, so the framing is
unpacked here and every record is parsed by wandb's protobuf classes.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

_BLOCK, _HEADER = 32768, 7


def _wandb_chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", data[:8]
    pos, out, partial = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:  # FULL
            out.append(chunk)
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            out.append(partial + chunk)
    return out


def wandb_run(run_file: Path) -> dict[str, Any]:
    """{"run": RunRecord fields, "config": {...}, "history": {key: [(step, value)]}, "summary": {...},
    "files": [paths]} of one offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"run": {}, "config": {}, "history": defaultdict(list), "summary": {}, "files": []}
    for raw in _wandb_chunks(run_file.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"id": r.run_id, "project": r.project, "group": r.run_group, "job_type": r.job_type,
                          "name": r.display_name}
            out["config"] |= {u.key: json.loads(u.value_json) for u in r.config.update}
        elif kind == "config":
            out["config"] |= {u.key: json.loads(u.value_json) for u in rec.config.update}
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            step = rec.history.step.num
            for key, value in items.items():
                if not key.startswith("_"):
                    out["history"][key].append((step, value))
        elif kind == "summary":
            out["summary"] |= {"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in rec.summary.update}
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def wandb_runs(root: Path) -> list[dict[str, Any]]:
    """Every offline run under `root` (a run dir's wandb/ or a sweep's runs/)."""
    return [wandb_run(p) for p in sorted(root.rglob("offline-run-*/run-*.wandb"))]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files directly in `log_dir`, with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(log_dir: Path) -> dict[str, str]:
    """text summaries (tensorboardX writes them as tensors of the text plugin): tag -> text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        event = acc.Tensors(tag)[-1]
        out[tag.split("/")[0]] = b"".join(event.tensor_proto.string_val).decode()
    return out


def tensorboard_images(log_dir: Path) -> dict[str, tuple[int, int]]:
    """image tag -> (width, height)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: (acc.Images(tag)[-1].width, acc.Images(tag)[-1].height) for tag in acc.Tags()["images"]}
