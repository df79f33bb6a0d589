"""Downstream tasks: what a labelled example's label is, and the texts that name each class.

Classification tasks (zero-shot and the linear probe) map a sample's metadata to one class index.
The shapes world's are read from the scene json the shards carry (jobs/data/synth.py):

    shape   the shape of the scene's first object (the one its caption names first)   4 classes
    color   the colour of that object                                                 6 classes
    count   how many objects the scene holds                                          3 classes

A user task reads a field of the sample's json (`label_field`), or the sub-folder of a labelled
image folder, against the class names it lists (jobs/transfer/config.py).

VQA (answer classification, VQA v2's framing: Antol et al. 2015; Goyal et al. 2017): questions are
generated from the scene graph, so every answer is true of the pixels:

    color      "what color is the circle"                              -> red ...   (the shape is unique in the scene)
    count      "how many objects"                                      -> one, two, three
    relation   "where is the red circle relative to the blue square"   -> left of, right of, above, below
    yes/no     "is there a green triangle"                             -> yes / no (half each, deterministic)

Prompts for zero-shot classification follow CLIP's templates where the class names are words the
captions use; the shapes world's tokenizer only knows caption words, so its prompts are caption-like
("a small {}"), and the count classes are described by example captions of 1, 2 and 3 objects.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.data.synth import COLORS, RELATIONS, SHAPES, SIZES, describe
from jobs.transfer.config import CLIP_TEMPLATES
from jobs.transfer.config import SHAPES_TASKS as SHAPES_TASK_NAMES

COUNT_WORDS = ("one", "two", "three")
ANSWERS: tuple[str, ...] = (*COLORS, *COUNT_WORDS, *RELATIONS, "yes", "no")
QUESTION_TYPES = ("color", "count", "relation", "yesno")


@dataclass(frozen=True)
class ClassTask:
    """A classification task: class names, K prompts per class, and meta -> class index (None: no label)."""

    name: str
    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    label: Callable[[dict[str, Any]], int | None]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.classes) or len({len(p) for p in self.prompts}) != 1:
            raise ValueError(f"task {self.name!r}: every class needs the same number of prompts")


def fill(templates: Sequence[str], classes: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """CLIP-style prompts: every template filled with every class name."""
    return tuple(tuple(t.format(c) for t in templates) for c in classes)


def _objects(meta: dict[str, Any]) -> list[dict[str, Any]]:
    return list((meta.get("scene") or {}).get("objects") or [])


def _first(attr: str, names: Sequence[str]) -> Callable[[dict[str, Any]], int | None]:
    index = {n: i for i, n in enumerate(names)}

    def label(meta: dict[str, Any]) -> int | None:
        objs = _objects(meta)
        return index.get(objs[0].get(attr, "")) if objs else None

    return label


def _count(meta: dict[str, Any]) -> int | None:
    n = len(_objects(meta))
    return n - 1 if 1 <= n <= len(COUNT_WORDS) else None


def _example_captions(count: int, k: int, seed: int = 7) -> tuple[str, ...]:
    """k captions of made-up scenes with `count` objects (what 'one/two/three objects' looks like in words)."""
    rng = random.Random(seed * 10 + count)
    out = []
    for _ in range(k):
        kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
        objects = [{"color": c, "shape": s, "size": rng.choice(SIZES)} for c, s in kinds]
        pairs = [(0, 1), (2, rng.randint(0, 1))][: count - 1]
        relations = [{"subject": i, "relation": rng.choice(RELATIONS), "object": j} for i, j in pairs]
        out.append(describe({"objects": objects, "relations": relations}))
    return tuple(out)


SHAPES_TASKS: dict[str, ClassTask] = {  # keys: SHAPES_TASK_NAMES
    "shape": ClassTask("shape", SHAPES, fill(("a {}", "a small {}", "a large {}", "the {}"), SHAPES),
                       _first("shape", SHAPES)),
    "color": ClassTask("color", COLORS, fill([f"a {{}} {s}" for s in SHAPES], COLORS), _first("color", COLORS)),
    "count": ClassTask("count", COUNT_WORDS, tuple(_example_captions(n, 8) for n in (1, 2, 3)), _count),
}


def user_task(name: str, field: str, classes: Sequence[str], templates: Sequence[str]) -> ClassTask:
    """A task over a json field (or an image folder's sub-folder, kept as `label`): class names or indices."""
    index = {c: i for i, c in enumerate(classes)}

    def label(meta: dict[str, Any]) -> int | None:
        value = meta.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value if 0 <= value < len(classes) else None
        return index.get(str(value)) if value is not None else None

    return ClassTask(name, tuple(classes), fill(templates, classes), label)


# -- VQA ----------------------------------------------------------------------------------------

def _rng(key: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{key}".encode()))


def questions(meta: dict[str, Any], key: str, seed: int = 0) -> list[tuple[str, str, int]]:
    """(question type, question, answer index) for one scene: one question of each type that applies.

    Deterministic in (key, seed): the same image gets the same questions in every run."""
    objs = _objects(meta)
    if not objs:
        return []
    rng = _rng(key, seed)
    out: list[tuple[str, str, int]] = []
    shapes = [o["shape"] for o in objs]
    unique = [o for o in objs if shapes.count(o["shape"]) == 1]
    if unique:
        o = rng.choice(unique)
        out.append(("color", f"what color is the {o['shape']}", ANSWERS.index(o["color"])))
    if len(objs) <= len(COUNT_WORDS):
        out.append(("count", "how many objects", ANSWERS.index(COUNT_WORDS[len(objs) - 1])))
    relations = (meta.get("scene") or {}).get("relations") or []
    if relations:
        r = rng.choice(relations)
        s, t = objs[r["subject"]], objs[r["object"]]
        out.append(("relation", f"where is the {s['color']} {s['shape']} relative to the {t['color']} {t['shape']}",
                    ANSWERS.index(r["relation"])))
    present = {(o["color"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
        out.append(("yesno", f"is there a {c} {s}", ANSWERS.index("yes")))
    else:
        c, s = rng.choice(sorted({(c, s) for c in COLORS for s in SHAPES} - present))
        out.append(("yesno", f"is there a {c} {s}", ANSWERS.index("no")))
    return out


assert tuple(SHAPES_TASKS) == SHAPES_TASK_NAMES
__all__ = ["ANSWERS", "CLIP_TEMPLATES", "SHAPES_TASKS", "ClassTask", "fill", "questions", "user_task"]
