"""The dataset card: what a set of shards carries, written by `mmpt data prepare` / `data synth`.

`dataset.json` lies beside the shards or one folder up (where tokenizer.json lies):

    {"name": "coco", "layout": "coco",
     "fields": ["image_id", "boxes", "object_labels"],     what every sample's json carries (FIELDS)
     "object_vocab": "objects_vocab.txt",                   class id -> name(s), BUTD's file format
     "object_key": "name",                                  scene object field naming its class
     "scene_words": {"object": [...], "attribute": [...], "relation": [...]},   ERNIE-ViL's node words
     "grounded_words": ["dog", "traffic light", ...],       words a picture shows (the MLM probe)
     "captions_per_image": 5.0}

A run reads labels, scene-graph words and grounded words from here (or `data.object_vocab`), never
from the shapes world; what the card does not list, the data does not have.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from jobs import storage
from jobs.data.datasets.vocab import VOCAB_FILE, Vocabulary, read_vocab, write_vocab
from jobs.storage import StorageOptions

CARD_FILE = "dataset.json"
# What a sample's metadata (KEY.json / KEY.npz) can carry for the objectives:
#   image_id         which image the caption describes (COCO: 5 captions per image)
#   boxes            scene.objects[*].bbox: object boxes (region inputs compute features from them)
#   object_labels    scene.objects[*][object_key]: a class name of the object vocabulary
#   scene_graph      scene.objects[*].attributes and scene.relations: the caption's scene graph
#   region_features  KEY.npz (or json) precomputed detector features (jobs.data.regions)
#   region_labels    the detector's class per precomputed region
Field = Literal["image_id", "boxes", "object_labels", "scene_graph", "region_features", "region_labels"]
FIELDS: tuple[Field, ...] = ("image_id", "boxes", "object_labels", "scene_graph", "region_features", "region_labels")
NODE_TYPES = ("object", "attribute", "relation")


@dataclass(frozen=True)
class DatasetCard:
    name: str
    layout: str
    fields: tuple[str, ...] = ()
    object_vocab: str | None = None  # file name relative to the card (or a URI)
    object_key: str = "name"
    scene_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    grounded_words: tuple[str, ...] = ()
    captions_per_image: float = 1.0
    uri: str = ""  # where it was read from (not saved)
    classes: Vocabulary = ()  # the vocabulary, loaded (not saved in the card itself)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in ("uri", "classes")}
        return json.dumps(data, indent=1) + "\n"


def save_card(folder: str, card: DatasetCard, classes: Sequence[Sequence[str] | str] = (),
              options: StorageOptions | None = None) -> str:
    """Write `folder`/dataset.json (and objects_vocab.txt when there are classes); returns its URI."""
    if classes:
        write_vocab(storage.join(folder, VOCAB_FILE), classes, options)
        card = DatasetCard(**{**asdict(card), "object_vocab": VOCAB_FILE, "classes": ()})
    uri = storage.join(folder, CARD_FILE)
    storage.write_text(uri, card.to_json(), options)
    return uri


def parse_card(text: str, uri: str, options: StorageOptions | None = None) -> DatasetCard:
    try:
        raw = json.loads(text)
        unknown = sorted(set(raw) - {f for f in DatasetCard.__dataclass_fields__ if f not in ("uri", "classes")})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        bad = sorted(set(raw.get("fields", ())) - set(FIELDS))
        if bad:
            raise ValueError(f"fields {bad} are not among {list(FIELDS)}")
        card = DatasetCard(name=str(raw.get("name", "")), layout=str(raw.get("layout", "")),
                           fields=tuple(raw.get("fields", ())), object_vocab=raw.get("object_vocab"),
                           object_key=str(raw.get("object_key", "name")),
                           scene_words={k: tuple(v) for k, v in (raw.get("scene_words") or {}).items()},
                           grounded_words=tuple(raw.get("grounded_words", ())),
                           captions_per_image=float(raw.get("captions_per_image", 1.0)), uri=uri)
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{uri}: not a dataset card ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from None
    if card.object_vocab:
        vocab_uri = card.object_vocab if "://" in card.object_vocab or card.object_vocab.startswith("/") \
            else posixpath.join(posixpath.dirname(uri), card.object_vocab)
        card = DatasetCard(**{**asdict(card), "uri": uri, "classes": read_vocab(vocab_uri, options)})
    return card


def find_card(shards: Sequence[str], options: StorageOptions | None = None) -> DatasetCard | None:
    """The card beside the first shard or one folder up; else a plug-in's reading of the folder's
    manifest (datasets written before cards existed); None when neither is there."""
    from jobs.data.datasets import card_from_manifest

    folder = posixpath.dirname(shards[0])
    for candidate in (posixpath.join(folder, CARD_FILE), posixpath.join(posixpath.dirname(folder), CARD_FILE)):
        if storage.exists(candidate, options):
            return parse_card(storage.read_text(candidate, options), candidate, options)
    for candidate in (posixpath.join(folder, "manifest.json"), posixpath.join(posixpath.dirname(folder), "manifest.json")):
        if storage.exists(candidate, options):
            try:
                manifest = json.loads(storage.read_text(candidate, options))
            except json.JSONDecodeError:
                continue
            card = card_from_manifest(manifest, candidate)
            if card is not None:
                return card
    return None


def scene_words_of(words: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Node type -> sorted unique words, only the types ERNIE-ViL has."""
    return {k: tuple(sorted(set(words.get(k, ())))) for k in NODE_TYPES if words.get(k)}
