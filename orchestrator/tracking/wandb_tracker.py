"""Weights & Biases, with wandb's own client: one W&B run per mmpt run.

`config` is the resolved config (nested, as W&B shows it), history every report's scalars at its
step, the summary the run's final figures, and the MoE heatmap and run report are saved as run
files. A sweep's trials share `group` (the sweep's name) and `job_type: trial`, which is how W&B
groups runs in its UI. `mode: offline` writes `runs/<name>/wandb/offline-run-*` for `wandb sync`.
The driver's own stdout/stderr are not captured (`console: off`): they already go to logs/ray.log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.config import WandbTracking
from orchestrator.tracking.base import TrackedRun, summary_scalars


class WandbTracker:
    name = "wandb"

    def __init__(self, section: WandbTracking, run: TrackedRun) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                  save_code=False)
        self._run = wandb.init(
            project=section.project, entity=section.entity, mode=section.mode, dir=str(run.local_dir),
            name=run.name, id=run.resumed_ids.get(self.name), resume="allow", group=run.group,
            job_type="trial" if run.group else "run", config=run.config,
            tags=[f"config:{run.config_hash}"], notes=run.run_dir, settings=settings, reinit="create_new")
        self._files = run.local_dir

    @property
    def run_id(self) -> str:
        return str(self._run.id)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool) -> None:
        self._run.summary.update({f"final/{k}": v for k, v in summary_scalars(summary).items()})
        for path in artifacts:
            self._run.save(str(path), base_path=str(path.parent), policy="now")
        self._run.finish(exit_code=1 if failed else 0)
