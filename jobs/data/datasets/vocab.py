"""Object label vocabularies in the bottom-up-attention file format (`objects_vocab.txt`).

One class per line, line i = class id i; a line may list synonyms separated by commas, the first
being the class's name (BUTD's Visual Genome vocabulary: "man", "people,person", ...). Ids are
what the detector's `objects_id` / our `obj_labels` and `region_labels` hold.

Visual Genome's 1600 object classes (Anderson et al. 2018, "Bottom-Up and Top-Down Attention",
§3.1 / supplementary: 1600 objects and 400 attributes kept after cleaning VG's names) are what
BUTD features, and so ViLBERT, LXMERT, UNITER and Oscar, label regions with: the default class
count when the data carries detector labels but no vocabulary file. The names themselves are not
shipped here; point `data.object_vocab` at the detector's `objects_vocab.txt`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jobs.storage import StorageOptions, read_text, write_text

VISUAL_GENOME_CLASSES = 1600  # BUTD's Visual Genome object classes
VOCAB_FILE = "objects_vocab.txt"

Vocabulary = tuple[tuple[str, ...], ...]  # class id -> its names (first = canonical)


def parse_vocab(text: str, source: str = "vocabulary") -> Vocabulary:
    classes: list[tuple[str, ...]] = []
    for n, line in enumerate(text.splitlines(), 1):
        names = tuple(dict.fromkeys(w.strip().lower() for w in line.split(",") if w.strip()))
        if not names:
            raise ValueError(f"{source}: line {n} is empty (one class per line, synonyms comma-separated)")
        classes.append(names)
    if not classes:
        raise ValueError(f"{source}: no classes")
    return tuple(classes)


def format_vocab(classes: Iterable[Sequence[str] | str]) -> str:
    return "".join((c if isinstance(c, str) else ",".join(c)) + "\n" for c in classes)


def read_vocab(uri: str, options: StorageOptions | None = None) -> Vocabulary:
    return parse_vocab(read_text(uri, options), uri)


def write_vocab(uri: str, classes: Iterable[Sequence[str] | str], options: StorageOptions | None = None) -> None:
    write_text(uri, format_vocab(classes), options)


def name_index(vocab: Vocabulary) -> dict[str, int]:
    """Every name and synonym (lower-case) -> its class id; a name listed twice keeps its first class."""
    index: dict[str, int] = {}
    for i, names in enumerate(vocab):
        for name in names:
            index.setdefault(name, i)
    return index
