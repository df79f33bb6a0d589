"""`mmpt export RUN_DIR --format hf|safetensors`: the latest checkpoint's weights, for others to load.

    safetensors  OUT/model.safetensors (every parameter of the model, all experts, fp32, mmpt's names)
                 + OUT/config.yaml (the run's resolved config: `build_pretrainer` + `load_state_dict`)
    hf           OUT/text/ (BertModel) and OUT/vision/ (ViTModel), Hugging Face model folders with the
                 run's tokenizer.json in text/: transformers' `from_pretrained` or another run's
                 `model.init` loads them (jobs/pretrained/export.py says what maps exactly)

OUT defaults to RUN_DIR/export/. Run directories on local disk (copy an s3:// one down first).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Literal

import typer

from orchestrator.config import ConfigError
from orchestrator.run.files import CONFIG, TOKENIZER, latest_checkpoint, run_config, run_tokenizer

Format = Literal["hf", "safetensors"]


def export(run_dir: str | Path, fmt: Format, out: str | Path | None = None) -> dict[str, Path]:
    """Write the export; returns {what: folder}. ConfigError for a directory that cannot be exported."""
    from jobs.pretrained.checkpoint import save_folder
    from jobs.pretrained.export import bert_folder, consolidate, vit_folder

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, str(run_dir))
    checkpoint = latest_checkpoint(run_dir)
    state = consolidate(str(checkpoint), cfg.deepspeed.zero_stage)
    target = Path(out) if out is not None else run_dir / "export"
    meta = {"mmpt.run": cfg.name, "mmpt.config_hash": cfg.config_hash(), "mmpt.checkpoint": checkpoint.name}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        target.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(target / "model.safetensors"), metadata=meta)
        shutil.copy(run_dir / CONFIG, target / CONFIG)
        return {"model": target}
    written: dict[str, Path] = {}
    notes: list[str] = []
    for name, built in (("text", bert_folder(state, cfg)), ("vision", vit_folder(state, cfg))):
        if built is None:
            continue
        config, tensors, found = built
        save_folder(str(target / name), config, tensors, metadata=meta)
        notes += [f"{name}: {n}" for n in found]
        written[name] = target / name
    if not written:
        raise ConfigError([f"{run_dir}: model.preset={cfg.model.preset!r} has neither a text tower nor patch input to export"])
    tok = run_tokenizer(run_dir, cfg)
    if "text" in written and tok is not None:
        shutil.copy(tok, written["text"] / TOKENIZER)
    (target / "NOTES.txt").write_text("\n".join(notes) + "\n" if notes else "every tensor maps one to one\n")
    return written


def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (runs/<name>) with a checkpoint")],
    fmt: Annotated[str, typer.Option("--format", help="hf (BERT/ViT folders) or safetensors (the whole model)")] = "safetensors",
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default RUN_DIR/export)")] = None,
) -> None:
    """Export a run's latest checkpoint as Hugging Face folders or one safetensors file."""
    from orchestrator.cli.console import console, fail

    if fmt not in ("hf", "safetensors"):
        fail([f"--format = {fmt!r}: allowed: hf, safetensors"])
    try:
        written = export(run_dir, fmt, out)  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(exc.problems)
    for name, folder in written.items():
        console.print(f"{name}: {folder}", highlight=False, soft_wrap=True)
