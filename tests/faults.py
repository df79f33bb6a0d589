"""Fault injection from the test side: nothing of it is in the product's API.

The integration session's Ray starts every worker process with `install` (Ray's
`worker_process_setup_hook`), which wraps `jobs.checkpoint.stage`. A test arms a fault by writing
it to the file named by $MMPT_TEST_FAULTS (`arm`, a context manager that disarms it after); the
wrapper reads that file at every checkpoint a worker stages, so an armed fault reaches the
workers of the run the test starts and no other.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "MMPT_TEST_FAULTS"
HOOK = "tests.faults.install"


@dataclass(frozen=True)
class CrashWhileWriting:
    """Rank `rank` dies halfway through writing its part of checkpoint `step`: a torn file, as a
    power cut or an OOM kill would leave. Fires once (the `marker` file records that it did), so
    the restarted group gets past that step."""

    step: int
    rank: int
    marker: str

    def due(self, step: int, rank: int) -> bool:
        return (step, rank) == (self.step, self.rank) and not os.path.exists(self.marker)

    def fire(self, path: str) -> None:
        Path(self.marker).write_text(f"crashed writing {path}")
        whole = Path(path).read_bytes()
        with open(path, "wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
        os._exit(1)


@contextmanager
def arm(fault: CrashWhileWriting) -> Iterator[None]:
    """Arm `fault` for the workers started inside the block."""
    path = Path(os.environ[ENV])
    path.write_text(json.dumps({"crash_while_writing": asdict(fault)}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _armed() -> CrashWhileWriting | None:
    try:
        spec = json.loads(Path(os.environ[ENV]).read_text())
    except (KeyError, FileNotFoundError):
        return None
    return CrashWhileWriting(**spec["crash_while_writing"])


def _wrap(checkpoint: Any) -> None:
    original = checkpoint.stage

    def stage(engine: Any, state: Any, rank: int, data_position: dict[str, Any]) -> str:
        folder = original(engine, state, rank, data_position)
        crash = _armed()
        if crash is not None and crash.due(state.step, rank):
            crash.fire(str(checkpoint.rank_path(folder, rank)))
        return folder

    checkpoint.stage = stage


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps jobs.checkpoint when a worker imports it: the hook itself imports nothing (a Ray Data
    task's process never pays for torch)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "jobs.checkpoint":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module: Any) -> None:
            exec_module(module)
            _wrap(module)

        spec.loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Ray worker setup hook: the armed fault, if any, applies to the checkpoints this process stages."""
    if "jobs.checkpoint" in sys.modules:
        _wrap(sys.modules["jobs.checkpoint"])
    else:
        sys.meta_path.insert(0, _PatchOnImport())
