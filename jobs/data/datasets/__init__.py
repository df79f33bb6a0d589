"""Datasets as plug-ins: what each layout on disk carries (its card) and how it becomes shards.

    shapes       the synthetic shapes world (`mmpt data synth`): boxes, classes, scene graphs
    folder       an image folder + CSV / JSON-lines captions
    coco         COCO captions JSON (+ instances JSON: boxes and the 80 categories) + image folder
    vg           Visual Genome region descriptions (+ objects / attributes / relationships JSON)
    cc3m         a Conceptual Captions style TSV (caption, url) + the downloaded images
    img2dataset  img2dataset output as it is (webdataset tars, parquet, or files folders)

Each converter (`LAYOUTS`) reads its layout and hands `jobs.data.datasets.write.write_dataset`
samples; the writer makes the shards, tokenizer.json, objects_vocab.txt and dataset.json.
"""

from __future__ import annotations

from typing import Any

from jobs.data.datasets import shapes
from jobs.data.datasets.card import DatasetCard


def card_from_manifest(manifest: dict[str, Any], uri: str) -> DatasetCard | None:
    """A plug-in's card for a folder that has a manifest but no dataset.json (older datasets)."""
    return shapes.from_manifest(manifest, uri)
