"""`mmpt data synth | prepare | inspect`: make shards, convert a user's images, look inside shards."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from orchestrator.cli.console import console, fail

data_app = typer.Typer(help="Make, convert and inspect image-text shards.", no_args_is_help=True)

EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")]


def _progress(total: int, label: str) -> Progress:
    progress = Progress(console=console, transient=True, disable=not console.is_terminal)
    progress.add_task(label, total=total)
    return progress


@data_app.command("synth")
def synth(
    out: Annotated[str, typer.Option("--out", help="folder or s3://bucket/prefix")],
    samples: Annotated[int, typer.Option(min=1, help="training samples")] = 4000,
    shards: Annotated[int, typer.Option(min=1, help="training shards")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="pixels (square)")] = 64,
    eval_samples: Annotated[int | None, typer.Option("--eval-samples", help="held-out samples")] = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Write a synthetic 'shapes world' dataset as WebDataset shards + tokenizer.json."""
    from jobs.data.synth import write_synthetic
    from jobs.storage import StorageOptions

    total = samples + (eval_samples if eval_samples is not None else max(64, samples // 10))
    with _progress(total, "writing shards") as progress:
        try:
            res = write_synthetic(out, samples=samples, shards=shards, seed=seed, image_size=image_size,
                                  eval_samples=eval_samples, options=StorageOptions(endpoint_url=endpoint_url),
                                  progress=lambda n: progress.update(0, completed=n))
        except (OSError, ValueError) as exc:
            fail([f"--out {out}: {exc}"])
    console.print(f"wrote {res.train_samples} train samples in {len(res.train_shards)} shards, "
                  f"{res.eval_samples} eval samples, tokenizer {res.tokenizer}", soft_wrap=True, highlight=False)


@data_app.command("prepare")
def prepare(
    out: Annotated[str, typer.Option("--out", help="folder or s3://bucket/prefix for the shards")],
    images: Annotated[str, typer.Option("--images", help="folder of images (img2dataset: its output folder)")] = "",
    captions: Annotated[str, typer.Option("--captions", help="folder: CSV / JSON lines; coco: captions_*.json; "
                                          "vg: region_descriptions.json; cc3m: the TSV")] = "",
    layout: Annotated[str, typer.Option("--layout", help="folder, coco, vg, cc3m or img2dataset")] = "folder",
    instances: Annotated[str, typer.Option("--instances", help="coco: instances_*.json (boxes, categories)")] = "",
    objects: Annotated[str, typer.Option("--objects", help="vg: objects.json or attributes.json")] = "",
    relationships: Annotated[str, typer.Option("--relationships", help="vg: relationships.json")] = "",
    eval_images: Annotated[int, typer.Option("--eval-images", min=0, help="hold out this many images "
                                             "(all their captions) into OUT/eval; the rest go to OUT/train")] = 0,
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", min=1, max=10000)] = 1000,
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=64)] = 8000,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Convert a dataset on disk (COCO, Visual Genome, CC3M, img2dataset, image folder) into
    WebDataset shards, a tokenizer and a dataset card (what its samples carry: labels, scene graphs)."""
    from jobs.data.datasets.layouts import Inputs
    from jobs.data.datasets.layouts import prepare as run_prepare
    from jobs.storage import StorageOptions

    inputs = Inputs(images=images, captions=captions, instances=instances, objects=objects,
                    relationships=relationships)
    try:
        with _progress(0, "writing shards") as progress:
            res = run_prepare(layout, inputs, out, samples_per_shard=samples_per_shard, vocab_size=vocab_size,
                              eval_images=eval_images, options=StorageOptions(endpoint_url=endpoint_url),
                              progress=lambda n: progress.update(0, completed=n))
    except (OSError, ValueError) as exc:
        fail([str(exc)])
    held = f", {len(res.eval_shards)} eval shards" if res.eval_shards else ""
    console.print(f"wrote {res.samples} samples of {res.images} images in {len(res.shards)} shards{held}, "
                  f"tokenizer {res.tokenizer}, card {res.card}", soft_wrap=True, highlight=False)
    if res.skipped:
        console.print(f"skipped {len(res.skipped)} rows:", highlight=False)
        for path, reason in res.skipped[:20]:
            console.print(f"  {path}: {reason}", highlight=False, soft_wrap=True)


def _histogram(title: str, counts: dict[str, int], order: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("bucket")
    table.add_column("samples", justify="right")
    table.add_column("")
    peak = max(counts.values(), default=1)
    for b in order:
        if counts.get(b):
            table.add_row(b, str(counts[b]), "█" * max(1, round(30 * counts[b] / peak)))
    return table


@data_app.command("inspect")
def inspect(
    uri: Annotated[str, typer.Argument(help="shards: folder, prefix, brace pattern (local or s3://)")],
    image_column: Annotated[str, typer.Option(help="Parquet image column")] = "jpg",
    caption_column: Annotated[str, typer.Option(help="Parquet caption column")] = "caption",
    endpoint_url: EndpointOpt = None,
) -> None:
    """Counts, image-size and caption-length histograms, and the bad samples of a set of shards."""
    from jobs.data.inspect import CAPTION_BUCKETS, IMAGE_BUCKETS, bucket, inspect_shards
    from jobs.data.reader import SHARD_SUFFIXES
    from jobs.storage import StorageOptions, expand_shards

    opts = StorageOptions(endpoint_url=endpoint_url)
    try:
        shards = expand_shards(uri, opts, suffixes=SHARD_SUFFIXES)
    except (OSError, ValueError) as exc:
        fail([f"{uri}: {exc}"])
    with _progress(len(shards), "reading shards") as progress:
        res = inspect_shards(shards, opts, image_column=image_column, caption_column=caption_column,
                             progress=lambda n: progress.update(0, completed=n))
    total = res.samples + len(res.bad_samples)
    console.print(f"{res.shards} shards, {total} samples: {res.samples} good, {len(res.bad_samples)} bad",
                  highlight=False)
    console.print(_histogram("longer image side (px)", res.image_sizes,
                             [bucket(e, IMAGE_BUCKETS) for e in IMAGE_BUCKETS] + [f"> {IMAGE_BUCKETS[-1]}"]))
    console.print(_histogram("caption length (words)", res.caption_words,
                             [bucket(e, CAPTION_BUCKETS) for e in CAPTION_BUCKETS] + [f"> {CAPTION_BUCKETS[-1]}"]))
    if res.bad_samples:
        table = Table(title="bad samples (skipped by training)", title_justify="left")
        for col in ("shard", "key", "reason"):
            table.add_column(col)
        for shard, key, reason in res.bad_samples[:50]:
            table.add_row(shard, key, reason)
        console.print(table)
        console.print("by reason: " + ", ".join(f"{r} {n}" for r, n in res.bad_by_reason.items()), highlight=False)
