"""A run's data, resolved on the driver before any Ray process starts: the shard lists of every
source, the tokenizer (beside the shards, from a pretrained text encoder, or trained here on a
sample of the captions), and what the data carries (labels, scene and grounded words) for the
objectives that need it. Every problem is a ConfigError naming the field."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from jobs import storage
from jobs.config import RunConfig
from jobs.data.tokenizer import load_tokenizer, text_spec
from orchestrator.config import ConfigError
from orchestrator.run.files import TOKENIZER, RunFiles, tokenizer_candidates


@dataclass
class DataPlan:
    train: list[list[str]]  # shards of each source (one source unless data.train is a mixture)
    weights: list[float]
    eval: list[str]
    tokenizer: str
    text: dict[str, int]
    pipeline: dict[str, Any] = field(default_factory=dict)  # PipelineSpec fields the data decides
    grounded_words: tuple[str, ...] = ()  # the dataset's object names: the MLM grounding probe



def _shards(field_name: str, spec: str | list[str], opts: storage.StorageOptions) -> list[str]:
    from jobs.data.reader import SHARD_SUFFIXES
    from orchestrator.run.preflight import storage_error

    try:
        return storage.expand_shards(spec, opts, suffixes=SHARD_SUFFIXES)
    except (ValueError, OSError) as exc:
        hint = " (make some with: mmpt data synth --out data/shapes)" if "shapes" in str(spec) else ""
        raise ConfigError([f"{field_name} = {spec!r}: {storage_error(exc)}{hint}"]) from None


def _find_tokenizer(cfg: RunConfig, train: list[str], files: RunFiles) -> str | None:
    opts = files.opts
    if cfg.data.tokenizer:
        if not storage.exists(cfg.data.tokenizer, opts):
            raise ConfigError([f"data.tokenizer = {cfg.data.tokenizer!r}: file not found"])
        return cfg.data.tokenizer
    for candidate in tokenizer_candidates(cfg, posixpath.dirname(train[0]), files.uri):
        if storage.exists(candidate, opts):
            return candidate
    return None


def _train_tokenizer(cfg: RunConfig, train: list[str], files: RunFiles, console: Console) -> str:
    """Shards without a tokenizer: train one on a sample of their captions, kept in the run dir."""
    from jobs.data.reader import ReadSpec, read_shard
    from jobs.data.tokenizer import save_tokenizer, train_tokenizer

    captions: list[str] = []
    spec = ReadSpec(image_size=cfg.data.image_size, storage=files.opts, image_column=cfg.data.image_column,
                    caption_column=cfg.data.caption_column)
    for shard in train:
        raws, _ = read_shard(shard, spec)
        captions += [r.caption for r in raws if r.caption]
        if len(captions) >= cfg.data.tokenizer_sample:
            break
    if not captions:
        raise ConfigError([f"data.train = {cfg.data.train!r}: no captions to train a tokenizer on"])
    uri = files.path(TOKENIZER)
    save_tokenizer(train_tokenizer(captions[: cfg.data.tokenizer_sample], vocab_size=cfg.data.vocab_size),
                   uri, files.opts)
    console.print(f"no tokenizer beside the shards: trained one on {min(len(captions), cfg.data.tokenizer_sample)} "
                  f"captions -> {uri}", highlight=False, soft_wrap=True)
    return uri


def plan_data(cfg: RunConfig, files: RunFiles, console: Console | None = None) -> DataPlan:
    """Resolve shard lists and the tokenizer, or raise ConfigError naming the field."""
    opts = files.opts
    sources = cfg.data.sources()
    train = [_shards("data.train" if len(sources) == 1 else f"data.train.{i}.shards", src.shards, opts)
             for i, src in enumerate(sources)]
    evals = _shards("data.eval", cfg.data.eval, opts) if cfg.data.eval else []
    flat = [s for shards in train for s in shards]
    tok_uri = _find_tokenizer(cfg, flat, files) or _train_tokenizer(cfg, flat, files, console or Console())
    from dataclasses import asdict

    from jobs.data.datasets.use import plan_use
    from models import OBJECTIVES  # torch import: only once the shards and tokenizer are found

    # What the data carries (its dataset card + a look at the first samples) decides labels, scene
    # words and grounded words; an objective it cannot feed is refused here, one line each.
    use = plan_use(cfg, train, opts)
    if use.problems:
        raise ConfigError(use.problems)
    if use.object_classes is not None:
        cfg.model.object_classes = use.object_classes  # left unset: the data's class count
    for note in use.notes:
        (console or Console()).print(note, highlight=False, soft_wrap=True)
    try:
        # Scene-graph words: the dataset's node vocabulary, as the tokenizer spells it (sgp).
        spec = text_spec(load_tokenizer(tok_uri, opts), cfg.data.max_text_len, scene_words=use.facts.scene_words)
    except (ValueError, OSError) as exc:
        raise ConfigError([f"data.tokenizer = {tok_uri!r}: {exc}"]) from None
    # What an objective needs from the tokenizer (word pieces, scene words) is checked here, not
    # when the workers build the model.
    problems = [f"objectives.{name} = {weight}: {problem} (data.tokenizer = {tok_uri!r})"
                for name, weight in cfg.active_objectives.items() if name in OBJECTIVES
                for problem in OBJECTIVES[name].text_problems(spec)]
    if problems:
        raise ConfigError(problems)
    text = asdict(spec)  # every TextSpec field: the workers rebuild it with TextSpec(**text)
    return DataPlan(train=train, weights=[src.weight for src in sources], eval=evals, tokenizer=tok_uri, text=text,
                    pipeline=use.pipeline, grounded_words=use.facts.grounded_words)
