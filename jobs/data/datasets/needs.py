"""What the run's data provides, and what each objective and model block needs from it.

The driver calls `data_facts` once before anything starts: the dataset card (jobs.data.datasets.card)
plus a look at the first sample of each source's first shard (its KEY.json and KEY.npz), so shards
without a card (img2dataset output as it is) are described too. `data_problems` then names, one
line each, every objective or block whose input the data lacks: MRC on COCO captions without
instances, SGP without scene-graph words, precomputed regions without KEY.npz. A mixture of
sources provides only what every source provides (a batch from a source without labels would
train MRC on nothing, silently).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.bounded import TookTooLong, call_within
from jobs.data.datasets.card import DatasetCard, find_card
from jobs.data.datasets.vocab import VISUAL_GENOME_CLASSES, Vocabulary, name_index, read_vocab
from jobs.data.regions import FEATURE_KEYS, LABEL_KEYS, SOFT_LABEL_KEYS, precomputed_regions
from jobs.storage import StorageOptions

PROBE_BUDGET_S = 20.0  # the look into the first shard; a stalled read must not hold the run's start

# Objective name -> the data fields it trains on (card.FIELDS); "labels" = the class of each visual
# token: the detector's (region_labels) for precomputed regions, else the scene objects' classes.
OBJECTIVE_NEEDS: dict[str, tuple[str, ...]] = {
    "mrc": ("labels",),
    "moc": ("labels",),
    "mrc_kl": ("labels",),
    "sgp": ("scene_graph",),
}
_WHY = {
    "boxes": "object boxes (scene.objects[*].bbox in KEY.json)",
    "object_labels": "object classes (scene.objects[*] names in an object vocabulary: the dataset card's "
                     "objects_vocab.txt or data.object_vocab)",
    "scene_graph": "scene-graph words (the dataset card's scene_words, from the scene json's objects, "
                   "attributes and relations)",
    "region_features": "precomputed region features (KEY.npz or features/boxes in KEY.json)",
    "region_labels": "detector classes of the precomputed regions (labels / objects_id / soft_labels)",
}
_PROBE_SAMPLES = 8


@dataclass(frozen=True)
class DataFacts:
    fields: frozenset[str]
    classes: Vocabulary = ()  # object vocabulary (class id -> names)
    object_key: str = "name"
    scene_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    grounded_words: tuple[str, ...] = ()
    region_feature_size: int | None = None  # F seen in the first sample's features
    where: str = ""  # what was looked at, for messages


def _probe(shard: str, options: StorageOptions | None, object_key: str, names: Mapping[str, int]
           ) -> tuple[set[str], int | None]:
    """Fields of the first samples of a tar shard (Parquet: its columns)."""
    found: set[str] = set()
    feature_size: int | None = None
    if shard.endswith(".parquet"):
        import pyarrow.parquet as pq

        from jobs.storage import filesystem_for

        fs, path = filesystem_for(shard, options)
        with fs.open_input_file(path) as f:
            columns = set(pq.read_schema(f).names)
        found |= {"image_id"} & columns
        if columns & set(FEATURE_KEYS):
            found.add("region_features")
        if columns & {*LABEL_KEYS, *SOFT_LABEL_KEYS}:
            found.add("region_labels")
        return found, None
    from jobs.data.formats import iter_shard

    try:
        for n, sample in enumerate(iter_shard(shard, options)):
            if n == _PROBE_SAMPLES:
                break
            meta = sample.parts.get("json", b"").decode("utf-8", "replace")
            regions = precomputed_regions(meta, 1 << 16, sample.parts.get("npz"))
            if regions is not None:
                found.add("region_features")
                feature_size = regions[0].shape[1]
                if (regions[2] >= 0).any():
                    found.add("region_labels")
            try:
                info = json.loads(meta) if meta else {}
            except json.JSONDecodeError:
                continue
            if "image_id" in info:
                found.add("image_id")
            scene = info.get("scene") or {}
            objects = scene.get("objects") or []
            if any(o.get("bbox") for o in objects):
                found.add("boxes")
            if any(str(o.get(object_key, "")).lower() in names for o in objects):
                found.add("object_labels")
            if scene.get("relations") or any(o.get("attributes") for o in objects):
                found.add("scene_graph")
    except (OSError, ValueError, EOFError) as exc:  # unreadable shards are the reader's to report
        logging.getLogger(__name__).warning("could not look into %s: %s", shard, exc)
    return found, feature_size


def _source_facts(shards: Sequence[str], options: StorageOptions | None, vocab_uri: str | None) -> DataFacts:
    card: DatasetCard | None = find_card(shards, options)
    classes = read_vocab(vocab_uri, options) if vocab_uri else (card.classes if card else ())
    object_key = card.object_key if card else "name"
    try:
        probed, feature_size = call_within(lambda: _probe(shards[0], options, object_key, name_index(classes)),
                                           PROBE_BUDGET_S, "mmpt-data-probe")
    except TookTooLong:  # an endpoint that accepts and never answers: the stream's watchdog names it later
        logging.getLogger(__name__).warning("could not look into %s within %g s (no answer from storage); "
                                            "the data's fields come from its dataset card alone",
                                            shards[0], PROBE_BUDGET_S)
        probed, feature_size = set(), None
    fields = set(card.fields if card else ()) | probed
    if not classes:
        fields.discard("object_labels")  # names without a vocabulary give no class ids
    if not (card and any(card.scene_words.values())):
        fields.discard("scene_graph")  # SGP masks the node words the card lists
    where = f"dataset card {card.uri}" if card else f"no dataset card beside {shards[0]}"
    return DataFacts(fields=frozenset(fields), classes=classes, object_key=object_key,
                     scene_words=dict(card.scene_words) if card else {},
                     grounded_words=card.grounded_words if card else (), region_feature_size=feature_size,
                     where=where)


def data_facts(sources: Sequence[Sequence[str]], options: StorageOptions | None = None,
               object_vocab: str | None = None) -> DataFacts:
    """What all the training sources provide (their intersection; vocabularies must agree)."""
    facts = [_source_facts(shards, options, object_vocab) for shards in sources]
    first = facts[0]
    for other in facts[1:]:
        if other.classes and first.classes and other.classes != first.classes:
            raise ValueError(f"the sources' object vocabularies differ ({first.where}: {len(first.classes)} "
                             f"classes, {other.where}: {len(other.classes)}); set data.object_vocab")
    scene: dict[str, tuple[str, ...]] = {}
    for f in facts:
        for kind, words in f.scene_words.items():
            scene[kind] = tuple(dict.fromkeys((*scene.get(kind, ()), *words)))
    return DataFacts(fields=frozenset.intersection(*(f.fields for f in facts)),
                     classes=next((f.classes for f in facts if f.classes), ()), object_key=first.object_key,
                     scene_words=scene, grounded_words=tuple(dict.fromkeys(w for f in facts for w in f.grounded_words)),
                     region_feature_size=first.region_feature_size, where="; ".join(f.where for f in facts))


def object_classes(facts: DataFacts) -> int | None:
    """How many object classes the data's labels range over: its vocabulary, or Visual Genome's
    1600 (BUTD) for detector labels without one; None when the data has no labels."""
    if facts.classes:
        return len(facts.classes)
    return VISUAL_GENOME_CLASSES if "region_labels" in facts.fields else None


def _labels_field(blocks: Any) -> str:
    return "region_labels" if blocks.visual == "region" and blocks.region_source == "precomputed" else "object_labels"


def data_problems(objectives: Mapping[str, float], model: Any, facts: DataFacts) -> list[str]:
    """One line per objective or model block whose input the data lacks, naming the missing field."""
    from models.blocks import resolve
    from models.presets import PRESETS

    if model.preset not in PRESETS:
        return []  # reported by the config check
    blocks = resolve(model)
    missing = lambda need: need not in facts.fields  # noqa: E731
    tail = f"which the data lacks ({facts.where})"
    out: list[str] = []
    for name, weight in objectives.items():
        for need in OBJECTIVE_NEEDS.get(name, ()):
            need = _labels_field(blocks) if need == "labels" else need
            if missing(need):
                out.append(f"objectives.{name} = {weight}: needs {need}: {_WHY[need]}, {tail}")
    if blocks.visual == "region" and blocks.region_source == "precomputed":
        if missing("region_features"):
            out.append(f"model.region_source = 'precomputed': needs region_features: {_WHY['region_features']}, {tail}")
        elif facts.region_feature_size not in (None, blocks.region_feature_size):
            out.append(f"model.region_feature_size = {blocks.region_feature_size}: the shards' region features have "
                       f"{facts.region_feature_size} ({facts.where})")
    elif blocks.visual == "region" and missing("boxes"):
        out.append(f"model.visual_input = 'region' (region_source = {blocks.region_source!r}): needs boxes: "
                   f"{_WHY['boxes']}, {tail}; or use a patch preset (vilt) or region_source: precomputed")
    if blocks.object_tags and missing("object_labels"):
        out.append(f"model.object_tags = true (Oscar's object tags): needs object_labels: {_WHY['object_labels']}, {tail}")
    return out
