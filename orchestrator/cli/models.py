"""`mmpt models list|show`: the architecture presets, their blocks, objectives and sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.console import SetOpt, console, fail
from orchestrator.config import ConfigError, load_config

models_app = typer.Typer(help="Architecture presets (model.preset).", no_args_is_help=True)

# The model fields that size a network; the block fields are each preset's own.
_SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "dropout", "patch_size", "object_classes")

ConfigArg = Annotated[Path | None, typer.Option("--config", help="take sizes from this run config (default: defaults)")]


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


@models_app.command("list")
def list_presets(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Every preset: family, visual input, default objectives, parameters at the config's size."""
    from models import OBJECTIVES, PRESETS, build_pretrainer, count_parameters
    from models.config import ImageSpec, ModelConfig, TextSpec
    from models.families import FAMILIES

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(exc.problems)
    text = TextSpec(vocab_size=cfg.data.vocab_size, max_len=cfg.data.max_text_len)
    image = ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects)
    sizes = {f: getattr(cfg.model, f) for f in _SIZE_FIELDS}
    table = Table(title=f"presets at hidden {sizes['hidden_size']}, {sizes['num_layers']} layers, vocab "
                        f"{text.vocab_size}, {image.size}px images", caption="parameters: with the default "
                  "objectives' heads (encoder alone); objectives in brackets are the paper's, not built yet")
    table.add_column("preset", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("visual input", no_wrap=True)
    table.add_column("default objectives")
    table.add_column("parameters", justify="right", no_wrap=True)
    for name, preset in PRESETS.items():
        model_cfg = ModelConfig(preset=name, **sizes)
        defaults = preset.default_objectives(OBJECTIVES)
        pending = preset.pending_objectives(OBJECTIVES)
        objectives = ", ".join(defaults) + (f" [dim]({', '.join(pending)})[/dim]" if pending else "")
        model = build_pretrainer(model_cfg, cfg.moe, defaults, text, image)
        total, encoder = count_parameters(model), count_parameters(model.encoder)
        visual = "/".join(preset.visual_inputs) + (" + tags" if preset.object_tags else "")
        table.add_row(name, FAMILIES[preset.family].title, visual, objectives, f"{_human(total)} ({_human(encoder)})")
    console.print(table)


@models_app.command("show")
def show(name: Annotated[str, typer.Argument(help="preset name")]) -> None:
    """One preset: its paper, what we substitute, its blocks and objectives."""
    from models import OBJECTIVES, PRESETS
    from models.blocks import resolve
    from models.config import ModelConfig

    if name not in PRESETS:
        fail([f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"])
    preset = PRESETS[name]
    blocks = resolve(ModelConfig(preset=name))
    console.print(f"[bold]{name}[/bold]: {preset.doc}", soft_wrap=True, highlight=False)
    console.print(f"blocks at the default size: {blocks}", soft_wrap=True, highlight=False)
    console.print(f"paper objectives: {dict(preset.objectives)}; available now: "
                  f"{preset.default_objectives(OBJECTIVES)}", soft_wrap=True, highlight=False)
