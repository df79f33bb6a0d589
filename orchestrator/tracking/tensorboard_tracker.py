"""TensorBoard: event files in `runs/<name>/tensorboard/`, written by tensorboardX (the writer Ray
Tune's TBXLoggerCallback uses, already a dependency of ray[tune]).

Scalars are every report's series under their metric names (`loss/total`, `eval/i2t_r1`, ...), the
resolved config and the summary are text, the MoE heatmap is an image, and the summary's figures
with the config's scalar settings are an HParams entry, so `tensorboard --logdir sweeps/<name>/runs`
compares a sweep's trials side by side. For an s3:// run directory the files are written locally
(.mmpt/runs/<name>/tensorboard) and copied up when the run ends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs import storage
from orchestrator.tracking.base import TrackedRun, flat, summary_scalars

_HPARAM_TYPES = (int, float, str, bool)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run: TrackedRun) -> None:
        from tensorboardX import SummaryWriter

        self._run = run
        self.log_dir = run.local_dir / "tensorboard"
        self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=10)
        # Markdown: indented lines render as code, keeping the YAML's layout.
        self._writer.add_text("config", "\n".join("    " + ln for ln in run.config_yaml.splitlines()), 0)

    @property
    def run_id(self) -> str:
        return str(self.log_dir)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool) -> None:
        step = int(summary.get("steps") or 0)
        if summary:
            self._writer.add_text("summary", "    " + json.dumps(summary, indent=1, default=float).replace("\n", "\n    "), step)
        for path in artifacts:
            if path.suffix == ".png":
                import numpy as np
                from PIL import Image

                with Image.open(path) as img:
                    self._writer.add_image(path.stem, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        final = summary_scalars(summary)
        if final and not failed:
            hparams = {k: v for k, v in flat(self._run.config).items() if isinstance(v, _HPARAM_TYPES)}
            self._writer.add_hparams(hparams, {f"final/{k}": v for k, v in final.items()}, name="hparams",
                                     global_step=step)
        self._writer.close()
        if storage.is_remote(self._run.run_dir):
            for path in self.log_dir.rglob("*"):
                if path.is_file():
                    rel = path.relative_to(self._run.local_dir).as_posix()
                    storage.write_bytes(storage.join(self._run.run_dir, rel), path.read_bytes())
