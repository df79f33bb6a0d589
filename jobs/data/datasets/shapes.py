"""The shapes world (jobs.data.synth) as a dataset plug-in: its card says what its scenes carry.

Its captions are generated from the scene graph, so the vocabularies are known without a parser:
object classes = the shapes (scene objects name them in `shape`), attribute words = colours and
sizes, relation words = the spatial relations, grounded words = all of them.
"""

from __future__ import annotations

from typing import Any

from jobs.data.datasets.card import DatasetCard

NAME = "shapes"


def card() -> DatasetCard:
    from jobs.data.synth import GROUNDED_WORDS, SCENE_GRAPH_WORDS, SHAPES

    return DatasetCard(name=NAME, layout=NAME, fields=("boxes", "object_labels", "scene_graph"),
                       object_key="shape", scene_words={k: tuple(v) for k, v in SCENE_GRAPH_WORDS.items()},
                       grounded_words=tuple(GROUNDED_WORDS), classes=tuple((s,) for s in SHAPES))


def classes() -> tuple[str, ...]:
    from jobs.data.synth import SHAPES

    return tuple(SHAPES)


def from_manifest(manifest: dict[str, Any], uri: str) -> DatasetCard | None:
    """A shapes-world folder written before dataset cards: its manifest lists the shapes."""
    vocab = manifest.get("vocabularies") or {}
    if tuple(vocab.get("shapes", ())) != classes():
        return None
    c = card()
    return DatasetCard(**{**c.__dict__, "uri": uri})
