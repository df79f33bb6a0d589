"""What makes a Parquet shard unusable as a whole: a configured column missing or of the wrong type.

img2dataset's Parquet has the encoded image in a binary column and the caption in a string column
(`data.image_column`, `data.caption_column`). A shard that lacks one, or holds ints where the
caption should be, is not a bad sample but a bad shard: the reader counts it like an unreadable tar
("bad_schema", one entry), names the shard and the column, and the run goes on within the error
budget instead of dying inside a Ray Data task.
"""

from __future__ import annotations

from typing import Any


def schema_problem(schema: Any, image_column: str, caption_column: str) -> str | None:
    """Why a shard with this `pyarrow.Schema` cannot be read, or None."""
    import pyarrow as pa

    names = schema.names
    for column, setting in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if column not in names:
            return f"no column {column!r} (columns: {', '.join(names)}; set {setting})"
    kinds = ((image_column, "binary (encoded image bytes)", (pa.types.is_binary, pa.types.is_large_binary)),
             (caption_column, "string", (pa.types.is_string, pa.types.is_large_string)))
    for column, expected, checks in kinds:
        kind = schema.field(column).type
        if not (pa.types.is_null(kind) or any(check(kind) for check in checks)):
            return f"column {column!r} is {kind}, expected {expected}"
    return None
