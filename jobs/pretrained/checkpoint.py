"""Hugging Face model folders on local disk or object storage: `config.json` and the weights.

Weights are read from `model.safetensors`, a sharded `model.safetensors.index.json`, or a legacy
`pytorch_model.bin` (torch.load with weights_only, so a pickle cannot run code). For a plan only the
tensor names and shapes are needed: a safetensors file's JSON header gives them without reading
the tensors (the first 8 bytes are the header's length), which for s3:// is two small range reads.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import torch

from jobs import storage

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used (one line: what is missing or wrong)."""


def read_config(folder: str, opts: storage.StorageOptions | None = None) -> dict[str, Any]:
    uri = storage.join(folder, "config.json")
    if not storage.exists(uri, opts):
        raise CheckpointError(f"no config.json in {folder} (expected a Hugging Face model folder, as "
                              "save_pretrained writes it)")
    try:
        config = json.loads(storage.read_text(uri, opts))
    except ValueError as exc:
        raise CheckpointError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{uri}: expected a JSON object")
    return config


def _weight_files(folder: str, opts: storage.StorageOptions | None) -> list[str]:
    index = storage.join(folder, SAFETENSORS_INDEX)
    if storage.exists(index, opts):
        shards = sorted(set(json.loads(storage.read_text(index, opts))["weight_map"].values()))
        return [storage.join(folder, s) for s in shards]
    for name in (SAFETENSORS, PYTORCH_BIN):
        if storage.exists(storage.join(folder, name), opts):
            return [storage.join(folder, name)]
    raise CheckpointError(f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}")


def _safetensors_header(uri: str, opts: storage.StorageOptions | None) -> dict[str, Any]:
    fs, path = storage.filesystem_for(uri, opts)
    with fs.open_input_file(path) as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def tensor_shapes(folder: str, opts: storage.StorageOptions | None = None) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the checkpoint (safetensors: from the headers alone)."""
    out: dict[str, tuple[int, ...]] = {}
    for uri in _weight_files(folder, opts):
        if uri.endswith(".safetensors"):
            out |= {k: tuple(v["shape"]) for k, v in _safetensors_header(uri, opts).items()}
        else:
            out |= {k: tuple(v.shape) for k, v in _load_bin(uri, opts).items()}
    return out


def _load_bin(uri: str, opts: storage.StorageOptions | None) -> dict[str, torch.Tensor]:
    state = torch.load(io.BytesIO(storage.read_bytes(uri, opts)), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_tensors(folder: str, opts: storage.StorageOptions | None = None,
                 names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors on CPU (only `names`, when given)."""
    from safetensors.torch import load as load_safetensors

    out: dict[str, torch.Tensor] = {}
    for uri in _weight_files(folder, opts):
        if uri.endswith(".safetensors"):
            if names is not None and not (names & set(_safetensors_header(uri, opts))):
                continue  # a shard holding nothing we need is never downloaded
            tensors = load_safetensors(storage.read_bytes(uri, opts))
        else:
            tensors = _load_bin(uri, opts)
        out |= {k: v for k, v in tensors.items() if names is None or k in names}
    return out


def save_folder(folder: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                opts: storage.StorageOptions | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write a Hugging Face model folder: config.json + model.safetensors (contiguous, unshared copies)."""
    from safetensors.torch import save

    blob = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                metadata={"format": "pt", **(metadata or {})})
    storage.write_text(storage.join(folder, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n", opts)
    storage.write_bytes(storage.join(folder, SAFETENSORS), blob, opts)


