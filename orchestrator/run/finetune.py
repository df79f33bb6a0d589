"""`mmpt finetune CONFIG --from RUN_DIR [--labels N]`: fine-tune a pretrained run's encoder on a task.

A fine-tuning run is a run (orchestrator/run/runner.py) whose config has a `finetune:` section: the same
run directory, metrics, checkpoints, resume and report; the workers run jobs/transfer/finetune_loop.py
instead of the pretraining loop. `--from`, `--labels`, `--task` and `--scratch` are shorthands for
`--set finetune.from_run=...` etc., so a Tune trial or a submitted job sets the same keys.

The architecture is the pretrained run's: `resolve` copies its `model`, `moe`, `objectives` (which
decide the parts the encoder has), image size, text length, scene objects and tokenizer into the
fine-tuning config, and names its latest checkpoint; `write_init` consolidates that checkpoint's
encoder weights into the run directory, where every worker reads them. `init: scratch` builds the
same architecture from a fresh init (the baseline the pretrained one is measured against).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.config import RunConfig
from orchestrator.cli.console import SetOpt
from orchestrator.config import ConfigError, apply_overrides, load_config, validate
from orchestrator.run.files import CONFIG, run_config

_COPIED = ("model", "moe", "objectives")
_COPIED_DATA = ("image_size", "max_text_len", "max_objects")


def resolve(cfg: RunConfig) -> RunConfig:
    """The fine-tuning config with the pretrained run's architecture and checkpoint (unchanged without from_run)."""
    from orchestrator.run.files import latest_checkpoint, run_tokenizer

    ft = cfg.finetune
    if ft is None or ft.from_run is None:
        return cfg
    run_dir = Path(ft.from_run)
    pre = run_config(run_dir, f"finetune.from_run = {ft.from_run!r}")
    if pre.finetune is not None:
        raise ConfigError([f"finetune.from_run = {ft.from_run!r}: a fine-tuning run; give a pretraining run"])
    raw = cfg.to_dict()
    pre_raw = pre.to_dict()
    for key in _COPIED:
        raw[key] = pre_raw[key]
    for key in _COPIED_DATA:
        raw["data"][key] = pre_raw["data"][key]
    tokenizer = run_tokenizer(run_dir, pre)
    if tokenizer is None:
        raise ConfigError([f"finetune.from_run = {ft.from_run!r}: the run's tokenizer.json was not found"])
    # absolute: the workers run in Ray's working directories, not the driver's
    raw["data"]["tokenizer"] = str(tokenizer.absolute())
    raw["finetune"]["from_run"] = str(run_dir.absolute())
    raw["finetune"]["checkpoint"] = str(latest_checkpoint(run_dir).absolute()) if ft.init == "pretrained" else None
    return validate(raw)


def write_init(cfg: RunConfig, run_uri: str, options: Any) -> None:
    """The pretrained encoder's weights (consolidated from DeepSpeed's files) into the run directory."""
    import torch

    from jobs import storage
    from jobs.pretrained.export import consolidate
    from jobs.transfer.finetune_loop import INIT_FILE

    ft = cfg.finetune
    if ft is None or ft.init != "pretrained" or ft.checkpoint is None:
        return
    pre = load_config(Path(ft.from_run or "", CONFIG))
    state = consolidate(ft.checkpoint, pre.deepspeed.zero_stage)
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    buf = io.BytesIO()
    torch.save(encoder, buf)
    storage.write_bytes(storage.join(run_uri, INIT_FILE), buf.getvalue(), options)


def finetune_cmd(
    config: Annotated[Path, typer.Argument(help="fine-tuning config YAML (e.g. jobs/configs/finetune/vqa.yaml)")],
    from_: Annotated[Path | None, typer.Option("--from", help="pretrained run directory (runs/<name>)")] = None,
    labels: Annotated[int | None, typer.Option(help="use only N labelled training examples")] = None,
    task: Annotated[str | None, typer.Option(help="shape | color | count | vqa | retrieval | a user task")] = None,
    scratch: Annotated[bool, typer.Option("--scratch", help="same architecture, fresh init (the baseline)")] = False,
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting one")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="delete runs/<name>/ first instead of resuming it")] = False,
) -> None:
    """Fine-tune (or linear-probe) a pretrained encoder on a labelled task; test figures in the summary."""
    from orchestrator.cli.console import console, fail
    from orchestrator.config import load_raw
    from orchestrator.run.runner import RunFailed
    from orchestrator.run.runner import run as run_job

    shorthands = {"finetune.from_run": str(from_) if from_ else None, "finetune.labels": labels,
                  "finetune.task": task, "finetune.init": "scratch" if scratch else None}
    try:
        raw = load_raw(config)
        if not isinstance(raw.get("finetune"), dict):
            raise ConfigError([f"{config}: no finetune: section (see jobs/configs/finetune/)"])
        raw = apply_overrides(raw, {k: v for k, v in shorthands.items() if v is not None})
        cfg = validate(apply_overrides(raw, set_ or []))
        run_job(cfg, address=address, console=console, fresh=fresh)
    except ConfigError as exc:
        fail(exc.problems)
    except RunFailed as exc:
        fail([str(exc)], code=1)


__all__ = ["finetune_cmd", "load_config", "resolve", "write_init"]
