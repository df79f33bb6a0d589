"""`mmpt data inspect`: what a set of shards holds, and what in it is bad.

Uses the training reader (`jobs.data.reader`), so what it calls bad is exactly what a run would
skip; images are fully decoded to find corrupt ones, at their original size.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.data.reader import ReadSpec, read_shard
from jobs.storage import StorageOptions

IMAGE_BUCKETS = (64, 128, 256, 512, 1024)
CAPTION_BUCKETS = (5, 10, 20, 40)


def bucket(value: int, edges: tuple[int, ...]) -> str:
    for edge in edges:
        if value <= edge:
            return f"<= {edge}"
    return f"> {edges[-1]}"


@dataclass
class InspectResult:
    shards: int = 0
    samples: int = 0
    bad_samples: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason)
    image_sizes: Counter[str] = field(default_factory=Counter)  # bucket of the longer side (px)
    caption_words: Counter[str] = field(default_factory=Counter)

    @property
    def bad_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, _, reason in self.bad_samples))


def inspect_shards(shards: list[str], options: StorageOptions | None = None, *, image_column: str = "jpg",
                   caption_column: str = "caption", progress: Callable[[int], None] | None = None) -> InspectResult:
    from PIL import Image

    spec = ReadSpec(image_size=1, storage=options or StorageOptions(), image_column=image_column,
                    caption_column=caption_column)
    result = InspectResult(shards=len(shards))
    for i, shard in enumerate(shards):
        raws, report = read_shard(shard, spec)
        result.bad_samples += [(shard, key, reason) for key, reason in report.bad.items()]
        for raw in raws:
            try:
                with Image.open(io.BytesIO(raw.image)) as im:  # type: ignore[arg-type]
                    im.load()
                    size = max(im.size)
            except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
                result.bad_samples.append((shard, raw.key, "corrupt_image"))
                continue
            result.samples += 1
            result.image_sizes[bucket(size, IMAGE_BUCKETS)] += 1
            result.caption_words[bucket(len(raw.caption.split()), CAPTION_BUCKETS)] += 1  # type: ignore[union-attr]
        if progress is not None:
            progress(i + 1)
    return result
