"""How a run uses its data: the checks before it starts and the data-given settings it runs with.

`plan_use` is called by the driver (orchestrator.run.data_plan.plan_data) once the shards are found:
it returns the problems (one line each: an objective or block the data cannot feed), the
PipelineSpec fields the data decides (object vocabulary, precomputed feature size), the number
of object classes the labels range over (model.object_classes when left unset), the scene-graph
words (SGP) and the grounded words (the MLM grounding probe in jobs.evaluate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.data.datasets.needs import DataFacts, data_facts, data_problems, object_classes
from jobs.data.datasets.vocab import name_index
from jobs.data.regions import feature_size_read
from jobs.storage import StorageOptions

_LABEL_USERS = ("mrc", "moc", "mrc_kl")


@dataclass
class DataUse:
    facts: DataFacts
    problems: list[str]
    pipeline: dict[str, Any] = field(default_factory=dict)
    object_classes: int | None = None  # what model.object_classes resolves to; None = leave it
    notes: list[str] = field(default_factory=list)  # said once before the run (metrics left out)


def plan_use(cfg: Any, sources: Sequence[Sequence[str]], options: StorageOptions | None = None) -> DataUse:
    """`cfg` is a jobs.config.RunConfig whose shards were expanded into `sources`."""
    try:
        facts = data_facts(sources, options, cfg.data.object_vocab)
    except (OSError, ValueError) as exc:
        return DataUse(facts=DataFacts(fields=frozenset()), problems=[f"data.object_vocab = {cfg.data.object_vocab!r}: {exc}"
                                                                      if cfg.data.object_vocab else f"data.train: {exc}"])
    objectives = cfg.active_objectives
    problems = data_problems(objectives, cfg.model, facts)
    n = object_classes(facts)
    from models.blocks import resolve
    from models.presets import PRESETS

    tags = cfg.model.preset in PRESETS and resolve(cfg.model).object_tags
    uses_labels = any(o in objectives for o in _LABEL_USERS) or tags
    resolved: int | None = None
    if n is not None and uses_labels:
        if "object_classes" not in cfg.model.model_fields_set:
            resolved = n
        elif cfg.model.object_classes < n:
            problems.append(f"model.object_classes = {cfg.model.object_classes}: the data's labels range over {n} "
                            f"classes ({facts.where}); raise it, or leave it unset to take the data's")
    notes = []
    if "mlm" in objectives and not facts.grounded_words:
        notes.append(f"eval: no mlm_grounded_acc: the data names no grounded words ({facts.where})")
    names = name_index(facts.classes)
    pipeline = {"region_feature_size": feature_size_read(cfg.model),
                "object_index": tuple(sorted(names.items(), key=lambda kv: kv[1])), "object_key": facts.object_key}
    return DataUse(facts=facts, problems=problems, pipeline=pipeline, object_classes=resolved, notes=notes)
