"""Where a batch's inputs come from: a requests file read in byte ranges, and the list of images to caption.

:class:`RequestLines` is a Ray Data datasource over a JSONL file (a local path, or any URI pyarrow's filesystems
open: ``s3://``, ``gs://`` ...). It splits the file into byte ranges, one read task each, that stream their lines
in blocks of a few hundred, so that no task holds more than a block of a file of any size. A line belongs to the
range its first byte falls in, and its byte offset is its key: stable across runs, so that a rerun skips the lines
done before. :func:`image_table` lists a folder or a glob, or reads a table, into the images' keys and
references; :func:`read_image` reads one image's bytes, wherever it lies.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from serve.errors import InvalidImage, PayloadTooLarge

CHUNK_BYTES = 64 * 2**20
"""Bytes of the requests file each read task reads."""
BLOCK_ROWS = 256
"""Lines a read task hands on at a time (at most ``BLOCK_BYTES`` of them)."""
BLOCK_BYTES = 16 * 2**20
READ_BYTES = 2**20

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
"""Files a folder or a glob contributes; other files are left out."""
TABLE_SUFFIXES = (".parquet", ".jsonl")
OPTIONS = {"task": pa.string(), "text": pa.string(), "region": pa.list_(pa.float64())}
"""A table's optional columns that set a row's own task, text or region (beside ``image``, and ``id``)."""

LINES = pa.schema([("key", pa.int64()), ("line", pa.large_binary()), ("size", pa.int64())])
"""A block of request lines: each line's byte offset, its bytes (null when over the limit) and its size."""


class SourceError(ValueError):
    """An input that cannot be read at all (no such file, a table without an ``image`` column)."""


@functools.cache
def _filesystem(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0] if root else pafs.LocalFileSystem()


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or a URI, and the path within it (one filesystem per bucket and process)."""
    if "://" not in location:
        return _filesystem(""), os.path.abspath(location)
    parts = urlsplit(location)
    if parts.scheme == "file":
        return _filesystem(""), parts.path
    return _filesystem(f"{parts.scheme}://{parts.netloc}"), f"{parts.netloc}{parts.path}"


def _uri(location: str, path: str) -> str:
    """``path`` (as the filesystem of ``location`` names it) as a location of the same kind."""
    return path if "://" not in location or location.startswith("file://") else f"{urlsplit(location).scheme}://{path}"


class RequestLines(Datasource):
    """The lines of a JSONL file, read in byte ranges of ``chunk_bytes``; blank lines and the lines whose offsets
    are in ``done`` are left out. A line over ``max_line_bytes`` comes with its size but without its bytes."""

    def __init__(self, location: str, done: np.ndarray, max_line_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__()
        self.location, self.done = location, np.sort(done)
        self.max_line_bytes, self.chunk_bytes = max_line_bytes, chunk_bytes
        fs, path = filesystem(location)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise SourceError(f"{location}: no such file")
        self.size = info.size

    def estimate_inmemory_data_size(self) -> int:
        return self.size

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for start in range(0, max(self.size, 1), self.chunk_bytes):
            end = min(start + self.chunk_bytes, self.size)
            done = self.done[np.searchsorted(self.done, start) : np.searchsorted(self.done, end)]
            read = functools.partial(_read_range, self.location, start, end, done, self.max_line_bytes)
            metadata = BlockMetadata(num_rows=None, size_bytes=end - start, exec_stats=None, input_files=None)
            tasks.append(ReadTask(read, metadata, LINES, per_task_row_limit))
        return tasks


def _read_range(location: str, start: int, end: int, done: np.ndarray, max_line: int) -> Iterator[pa.Table]:
    skip = set(done.tolist())
    fs, path = filesystem(location)
    rows: list[tuple[int, bytes | None, int]] = []
    held = 0
    with fs.open_input_file(path) as stream:
        for offset, line, size in lines_in(stream, start, end, max_line):
            if offset in skip or (line is not None and not line.strip()):
                continue
            rows.append((offset, line, size))
            held += size
            if len(rows) >= BLOCK_ROWS or held >= BLOCK_BYTES:
                yield pa.Table.from_pylist([dict(zip(LINES.names, row)) for row in rows], schema=LINES)
                rows, held = [], 0
    if rows:
        yield pa.Table.from_pylist([dict(zip(LINES.names, row)) for row in rows], schema=LINES)


class _Lines:
    """A file's lines from a byte offset on, read ``READ_BYTES`` at a time."""

    def __init__(self, stream, offset: int) -> None:
        stream.seek(offset)
        self.stream, self.offset = stream, offset
        self.buffer, self.at, self.eof = b"", 0, False

    def next(self, max_line: int) -> tuple[int, bytes | None, int] | None:
        """The next line: its offset, its bytes without the newline (None when longer than ``max_line``), its size;
        None at the end of the file."""
        begins, dropped, searched = self.offset, 0, self.at
        while True:
            newline = self.buffer.find(b"\n", searched)
            held = (newline if newline >= 0 else len(self.buffer)) - self.at
            if newline >= 0 or self.eof:
                size, ends = dropped + held, int(newline >= 0)
                if size == 0 and not ends:
                    return None
                line = self.buffer[self.at : self.at + held] if dropped == 0 and size <= max_line else None
                self.at += held + ends
                self.offset += size + ends
                return begins, line, size
            if held > max_line:  # too long to keep: count it, keep none of it
                dropped += held
                self.buffer, self.at = b"", 0
            data = self.stream.read(READ_BYTES)
            self.eof = not data
            self.buffer = self.buffer[self.at :] + data
            searched, self.at = len(self.buffer) - len(data), 0


def lines_in(stream, start: int, end: int, max_line: int) -> Iterator[tuple[int, bytes | None, int]]:
    """The lines that begin in ``[start, end)`` of a seekable binary stream (see ``_Lines.next``)."""
    lines = _Lines(stream, max(start - 1, 0))
    if start > 0:
        lines.next(0)  # the line in progress at start - 1 belongs to the range before (or ends right there)
    while lines.offset < end and (found := lines.next(max_line)) is not None:
        yield found


def image_table(source: str) -> pa.Table:
    """The images of a folder, a glob or a table: columns ``key``, ``image`` (a path or URI) and the table's own
    ``task``, ``text`` and ``region`` (null for a listing). Keys are paths relative to the folder or the glob's
    fixed part, or a table's ``id`` (else its ``image``); they must be unique."""
    table = _read_table(source) if source.lower().endswith(TABLE_SUFFIXES) else _listing(source)
    keys = table.column("key")
    if len(keys) != len(keys.unique()):
        counts = keys.value_counts().to_pylist()
        twice = next(entry["values"] for entry in counts if entry["counts"] > 1)
        raise SourceError(f"{source}: the key {twice!r} appears more than once; give each row a unique id")
    return table


def _listing(source: str) -> pa.Table:
    pattern = source if "://" in source else os.path.abspath(source)
    wild = next((i for i, c in enumerate(pattern) if c in "*?["), None)
    base = pattern if wild is None else pattern[: pattern.rfind("/", 0, wild) + 1]
    fs, root = filesystem(base)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"{source}: no such folder")
    images = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        location = _uri(base, entry.path)
        wanted = wild is None or fnmatch.fnmatchcase(location, pattern)
        if entry.type == pafs.FileType.File and entry.path.lower().endswith(IMAGE_SUFFIXES) and wanted:
            images.append((entry.path[len(root.rstrip("/")) + 1 :], location))
    images.sort()
    options = {name: pa.nulls(len(images), kind) for name, kind in OPTIONS.items()}
    keys, locations = [k for k, _ in images], [location for _, location in images]
    return pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(locations, pa.string()), **options})


def _read_table(source: str) -> pa.Table:
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = filesystem(source)
    try:
        with fs.open_input_file(path) as stream:
            table = pq.read_table(stream) if path.lower().endswith(".parquet") else pajson.read_json(stream)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{source}: cannot be read as a table ({exc})") from None
    if "image" not in table.column_names:
        raise SourceError(f"{source}: the table needs an image column (a path or URI a row)")
    images = table.column("image").cast(pa.string()).to_pylist()
    if "://" not in source:  # a local table's relative paths are relative to its folder
        folder = Path(path).parent
        images = [i if i is None or "://" in i or os.path.isabs(i) else str(folder / i) for i in images]
    options = {
        name: table.column(name).cast(kind) if name in table.column_names else pa.nulls(len(table), kind)
        for name, kind in OPTIONS.items()
    }
    ids = table.column("id").cast(pa.string()).to_pylist() if "id" in table.column_names else [None] * len(table)
    keys = [key or image or f"row-{n}" for n, (key, image) in enumerate(zip(ids, images))]
    return pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.string()), **options})


def read_image(location: str, max_bytes: int) -> bytes:
    """The bytes of the image at a path or URI; raises ``InvalidImage`` (cannot be read) or ``PayloadTooLarge``."""
    try:
        fs, path = filesystem(location)
        with fs.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InvalidImage(f"the image {location} cannot be read ({exc})", param="image") from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image {location} is over the limit of {max_bytes} bytes", param="image")
    return data
