"""URIs to pyarrow filesystems: local folders and S3 (AWS or any S3-compatible endpoint).

Every byte mmpt reads or writes (shards, tokenizer, manifests, checkpoints) goes through
`filesystem_for`, so a run moves between a laptop folder and a bucket by changing a URI only.
Credentials are never handled here: pyarrow's S3 client resolves them through the standard AWS
chain (env vars, ~/.aws, instance metadata), which is also what Ray workers inherit.
"""

from __future__ import annotations

import functools
import itertools
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pyarrow import fs as pafs

_S3 = "s3://"
_FILE = "file://"
# Large Ray Data reads hit S3 throttling (SlowDown / 503); a few more retries than pyarrow's
# default of 3 keep a long run from dying on one transient error.
_S3_MAX_ATTEMPTS = 6
_S3_CONNECT_TIMEOUT_S = 10.0
_S3_REQUEST_TIMEOUT_S = 60.0  # per request: a 256 MB shard at a slow 5 MB/s still fits


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives. Unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = None  # http://127.0.0.1:5000; default AWS_ENDPOINT_URL_S3 / _URL
    region: str | None = None  # default AWS_REGION / AWS_DEFAULT_REGION, else us-east-1

    @classmethod
    def of(cls, section: Any) -> StorageOptions:
        """The options of a run config's `storage` section: the validated object (`cfg.storage`) or
        its stored dict form (a registry record's resolved config); the one way they are built."""
        if isinstance(section, Mapping):
            return cls(endpoint_url=section.get("endpoint_url"), region=section.get("region"))
        return cls(endpoint_url=section.endpoint_url, region=section.region)

    def resolved(self) -> StorageOptions:
        """The options with env defaults filled in (read at call time, so tests can patch env)."""
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        region = (
            self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        return StorageOptions(endpoint_url=endpoint, region=region)


def is_remote(uri: str) -> bool:
    """Whether `uri` names object storage (s3://) rather than a local path."""
    return uri.startswith(_S3)


def _local_path(uri: str) -> str:
    if uri.startswith(_FILE):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def _s3_path(uri: str) -> str:
    path = uri[len(_S3) :].strip("/")
    if not path:
        raise ValueError(f"{uri!r} names no bucket; expected s3://bucket/key")
    return path


def endpoint_problem(endpoint_url: str) -> str | None:
    """Why `endpoint_url` cannot be an S3 endpoint, or None (S3 speaks HTTP; host[:port] means https)."""
    parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    if parsed.scheme not in ("http", "https"):
        return f"an S3 endpoint must use http:// or https://, not {parsed.scheme}://"
    if not parsed.hostname:
        return "names no host; expected e.g. http://127.0.0.1:9000"
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "has a port that is not a number"
    return None


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint_url: str | None, region: str) -> pafs.S3FileSystem:
    # pyarrow wants the endpoint as "host:port" plus a separate scheme (see S3Options in
    # arrow/filesystem/s3fs.h); boto3 and the AWS env var use a full URL, so split it here.
    kwargs: dict[str, object] = {}
    if endpoint_url:
        if problem := endpoint_problem(endpoint_url):
            raise ValueError(f"S3 endpoint {endpoint_url!r}: {problem}")
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(
        region=region,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_MAX_ATTEMPTS),
        # An endpoint that accepts connections and never answers must fail a request, not hang it:
        # the AWS SDK's own defaults leave a silent socket waiting for minutes.
        connect_timeout=_S3_CONNECT_TIMEOUT_S, request_timeout=_S3_REQUEST_TIMEOUT_S,
        **kwargs,
    )


def filesystem_for(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a URI.

    "s3://bucket/key" -> (S3FileSystem, "bucket/key"); anything else -> (LocalFileSystem,
    absolute path). S3 clients are cached per (endpoint, region) because each one starts
    connection pools and credential providers.
    """
    if is_remote(uri):
        opts = (options or StorageOptions()).resolved()
        assert opts.region is not None
        return _s3_filesystem(opts.endpoint_url, opts.region), _s3_path(uri)
    return pafs.LocalFileSystem(), _local_path(uri)


def _to_uri(uri: str, path: str) -> str:
    """Render a filesystem path back in the scheme `uri` was given in."""
    return f"{_S3}{path}" if is_remote(uri) else path


def _normalize(uri: str) -> str:
    """Canonical form without I/O: s3://b/k/ -> s3://b/k; a local path -> its absolute path."""
    return f"{_S3}{_s3_path(uri)}" if is_remote(uri) else _local_path(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with "/" (never os.sep: S3 keys always use "/")."""
    out = uri
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        if not out or out.endswith("://"):
            out = f"{out}{part}"
        else:
            out = f"{out.rstrip('/')}/{part}"
    return out


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole object. compression=None: a ".gz" name must not be silently inflated."""
    filesystem, path = filesystem_for(uri, options)
    with filesystem.open_input_stream(path, compression=None) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write (replace) an object; local parent folders are created, S3 needs none."""
    filesystem, path = filesystem_for(uri, options)
    if not is_remote(uri):
        filesystem.create_dir(posixpath.dirname(path) or "/", recursive=True)
    with filesystem.open_output_stream(path, compression=None) as f:
        f.write(data)


def read_text(uri: str, options: StorageOptions | None = None) -> str:
    return read_bytes(uri, options).decode("utf-8")


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether a file or folder (on S3: any key under the prefix) exists."""
    filesystem, path = filesystem_for(uri, options)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _brace_alternatives(body: str) -> list[str]:
    """Alternatives of one brace body: a,b -> [a, b]; 0008..0010 -> [0008, 0009, 0010] (padding kept)."""
    match = _RANGE.match(body)
    if match is None:
        return body.split(",")
    first, last = match.group(1), match.group(2)
    lo, hi = int(first), int(last)
    # Pad like bash / webdataset's braceexpand: when either end is written with a leading zero.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if hi >= lo else -1
    return [str(i).zfill(width) for i in range(lo, hi + step, step)]


def expand_braces(pattern: str) -> list[str]:
    """Expand every (non-nested) {a,b} / {N..M} group; several groups give their product."""
    pieces = _BRACE.split(pattern)  # literal, body, literal, body, ..., literal
    literals, bodies = pieces[0::2], pieces[1::2]
    choices = [_brace_alternatives(b) for b in bodies]
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(lit + alt for lit, alt in zip(literals, (*combo, ""), strict=True)))
    return out


def _list_files(filesystem: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder or "/", allow_not_found=True, recursive=False)
    return [i for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File]


def _expand_one(spec: str, options: StorageOptions | None, suffixes: tuple[str, ...]) -> list[str]:
    if "{" in spec:
        # An explicit list of names: returned as written, not stat'ed (thousands of HEADs on S3
        # would cost more than the read that fails on a missing one).
        return [_normalize(u) for u in expand_braces(spec)]
    filesystem, path = filesystem_for(spec, options)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [_to_uri(spec, path)]
    if info.type == pafs.FileType.Directory:
        files = _list_files(filesystem, path)
    elif spec.endswith("/"):
        files = []  # a folder that does not exist: no prefix semantics for "x/"
    else:
        # A key prefix: files in the prefix's folder whose name starts with the rest
        # (not recursive, matching the flat layout of img2dataset / WebDataset outputs).
        folder, stem = posixpath.split(path)
        files = [i for i in _list_files(filesystem, folder) if i.base_name.startswith(stem)]
    names = sorted(i.path for i in files if i.path.endswith(suffixes))
    return [_to_uri(spec, p) for p in names]


def expand_shards(
    spec: str | Sequence[str],
    options: StorageOptions | None = None,
    suffixes: tuple[str, ...] = (".tar",),
) -> list[str]:
    """Turn a shard spec into a list of shard URIs, in the scheme it was given in.

    Forms: a folder (its files with a matching suffix, sorted); a brace pattern
    ("s3://b/cc3m/{00000..00331}.tar": all expanded names, not checked for existence); a key
    prefix ("s3://b/cc3m/part-"); a single file; or a list of any of these (concatenated in order).
    Brace patterns and single files are returned whatever their suffix (the caller named them).
    Each item must match at least one shard, else ValueError naming that item.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError("no shards match [] (an empty list of shard specs)")
    out: list[str] = []
    for item in specs:
        found = _expand_one(item, options, suffixes)
        if not found:
            # Per item, not per list: one mistyped entry in a list is a mistake worth stopping for.
            raise ValueError(
                f"no shards match {item!r} (looked for {suffixes} files in that folder, "
                "under that key prefix, or named by that pattern)"
            )
        out.extend(found)
    return out
