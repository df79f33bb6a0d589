"""The layouts `mmpt data prepare --layout NAME` converts, as a registry of readers.

Each reader takes the user's inputs (`Inputs`) and returns (samples, label vocabulary or None);
`prepare` hands them to jobs.data.datasets.write.write_dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.data.datasets.write import PrepareResult, Sample, write_dataset
from jobs.storage import StorageOptions


@dataclass(frozen=True)
class Inputs:
    images: str = ""  # image folder (img2dataset: its output folder)
    captions: str = ""  # the captions file of the layout
    instances: str = ""  # COCO instances JSON
    objects: str = ""  # Visual Genome objects.json / attributes.json
    relationships: str = ""  # Visual Genome relationships.json


Reader = Callable[[Inputs], tuple[Iterator[Sample], list[str] | None]]


@dataclass(frozen=True)
class Layout:
    read: Reader
    needs: tuple[str, ...]  # Inputs fields that must be given
    doc: str


def _folder(i: Inputs) -> tuple[Iterator[Sample], None]:
    from jobs.data.prepare import read_captions

    return (Sample(caption=text, image_id=image, image=image) for image, text in read_captions(i.captions)), None


def _coco(i: Inputs) -> tuple[Iterator[Sample], list[str] | None]:
    from jobs.data.datasets import coco

    return coco.read(i.captions, i.instances or None)


def _vg(i: Inputs) -> tuple[Iterator[Sample], None]:
    from jobs.data.datasets import vg

    return vg.read(i.images, i.captions, i.objects or None, i.relationships or None)


def _cc3m(i: Inputs) -> tuple[Iterator[Sample], None]:
    from jobs.data.datasets import cc3m

    return cc3m.read(i.images, i.captions)


def _img2dataset(i: Inputs) -> tuple[Iterator[Sample], None]:
    from jobs.data.datasets import img2dataset

    return img2dataset.read(i.images)


LAYOUTS: dict[str, Layout] = {
    "folder": Layout(_folder, ("images", "captions"), "image folder + CSV / JSON-lines (image, caption) rows"),
    "coco": Layout(_coco, ("images", "captions"), "COCO captions JSON (+ --instances: boxes, 80 categories)"),
    "vg": Layout(_vg, ("images", "captions"), "Visual Genome region_descriptions.json (+ --objects, "
                 "--relationships: scene graphs)"),
    "cc3m": Layout(_cc3m, ("images", "captions"), "Conceptual Captions TSV (caption<TAB>url) + downloaded images"),
    "img2dataset": Layout(_img2dataset, ("images",), "img2dataset output folder (webdataset, parquet or files)"),
}
_FLAGS = {"images": "--images", "captions": "--captions"}


def prepare(layout: str, inputs: Inputs, out: str, *, samples_per_shard: int = 1000, vocab_size: int = 8000,
            eval_images: int = 0, options: StorageOptions | None = None,
            progress: Callable[[int], None] | None = None) -> PrepareResult:
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout}: allowed: {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    missing = [_FLAGS[n] for n in spec.needs if not getattr(inputs, n)]
    if missing:
        raise ValueError(f"--layout {layout} needs {' and '.join(missing)}")
    if inputs.images and layout != "img2dataset" and not Path(inputs.images).is_dir():
        raise ValueError(f"--images {inputs.images}: not a folder")
    samples, classes = spec.read(inputs)
    return write_dataset(samples, out, name=Path(inputs.captions or inputs.images).stem or layout, layout=layout,
                         images=inputs.images if layout != "img2dataset" else "", classes=classes,
                         samples_per_shard=samples_per_shard, vocab_size=vocab_size, eval_images=eval_images,
                         options=options, progress=progress)
