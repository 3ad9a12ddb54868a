"""Where a batch's rows go: Parquet part files written whole or not at all, and what a rerun reads back from them.

:class:`PartsSink` is Ray Data's datasink for the last operator. Each write task sorts its rows by key and
writes one file: first under a temporary name (``.tmp-*``, which no reader lists), then renamed to a name made
from its keys (``part-<digest>.parquet``). A file is thus either absent or complete, and a write task that Ray
retries with the same rows replaces its own file rather than adding a second. Rows that a retry upstream groups
differently could still reach two files; :func:`drop_duplicates` removes them once the run ends, and the batch
file's output is merged from the parts by key (:func:`merge_lines`), keeping each line once.

A rerun lists the parts (:func:`done_keys`) and skips their keys.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from serve.batch.sources import filesystem

MERGE_FAN_IN = 128
"""Part files merged at once (a merge holds a batch of rows of each, and one open file each)."""


@dataclass(frozen=True)
class PartStats:
    """What one write task wrote: its file, rows, answers, tokens, and the span from the engine taking its first
    answer's request to giving its last answer (for the run's images a second)."""

    name: str | None = None
    rows: int = 0
    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_at: float | None = None
    last_at: float | None = None


class PartsSink(Datasink[PartStats]):
    """Writes each task's rows to one part file in ``folder``, sorted by ``key``, without the ``_``-named columns
    (the run's statistics, returned to the driver instead). ``written``: every task's stats, once done."""

    def __init__(self, folder: str, key: str, rows_per_file: int) -> None:
        self.folder, self.key, self.rows_per_file = folder, key, rows_per_file
        self.written: list[PartStats] = []

    @property
    def supports_distributed_writes(self) -> bool:
        """A local folder is the driver's: write there; a bucket takes writes from any node."""
        return "://" in self.folder

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        fs, root = filesystem(self.folder)
        fs.create_dir(root, recursive=True)

    def write(self, blocks: Iterable[Block], ctx) -> PartStats:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        table = pa.concat_tables([t for t in tables if t.num_rows])
        if table.num_rows == 0:
            return PartStats()
        table = table.sort_by(self.key)
        answered = table.filter(table.column("_ok"))
        stats = {
            "rows": table.num_rows,
            "answered": answered.num_rows,
            "prompt_tokens": pc.sum(answered.column("_prompt_tokens")).as_py() or 0,
            "completion_tokens": pc.sum(answered.column("_completion_tokens")).as_py() or 0,
            "first_at": pc.min(answered.column("_sent")).as_py(),
            "last_at": pc.max(answered.column("_done")).as_py(),
        }
        table = table.drop_columns([name for name in table.column_names if name.startswith("_")])
        name = part_name(table.column(self.key))
        write_atomically(table, self.folder, name)
        return PartStats(name=name, **stats)

    def on_write_complete(self, write_result: WriteResult[PartStats]) -> None:
        self.written = [stats for stats in write_result.write_returns if stats.rows]


def part_name(keys: pa.ChunkedArray) -> str:
    """The file name of a part: a digest of its keys, so that the same rows get the same name.

    >>> part_name(pa.chunked_array([[3, 17]]))
    'part-914932e01953ec53b0f99c27.parquet'
    """
    digest = hashlib.blake2b("\n".join(map(str, keys.to_pylist())).encode(), digest_size=12)
    return f"part-{digest.hexdigest()}.parquet"


def write_atomically(table: pa.Table, folder: str, name: str) -> None:
    """``table`` as ``folder/name``, which appears complete or not at all."""
    fs, root = filesystem(folder)
    temporary = f"{root}/.tmp-{uuid.uuid4().hex}"
    pq.write_table(table, temporary, filesystem=fs)
    fs.move(temporary, f"{root}/{name}")


def parts(folder: str) -> list[str]:
    """The complete part files in ``folder`` (paths in its filesystem), in name order; none if it is absent."""
    fs, root = filesystem(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(root))
    return sorted(f.path for f in found if f.base_name.startswith("part-") and f.base_name.endswith(".parquet"))


def remove_temporaries(folder: str) -> int:
    """Delete the temporary files that interrupted writes left; returns how many."""
    fs, root = filesystem(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return 0
    left = [f.path for f in fs.get_file_info(pafs.FileSelector(root)) if f.base_name.startswith((".tmp-", ".merge-"))]
    for path in left:
        fs.delete_file(path)
    return len(left)


def done_keys(folder: str, key: str, kind: pa.DataType) -> pa.Array:
    """Every key (of type ``kind``) the parts in ``folder`` hold."""
    fs, _ = filesystem(folder)
    columns = [pq.read_table(path, columns=[key], filesystem=fs).column(key) for path in parts(folder)]
    return pa.chunked_array(columns, kind).combine_chunks()


def drop_duplicates(folder: str, key: str) -> int:
    """Rewrite the parts that repeat a key of an earlier part (in name order) without those rows; returns how many
    rows were dropped."""
    fs, _ = filesystem(folder)
    seen: set = set()
    dropped = 0
    for path in parts(folder):
        keys = pq.read_table(path, columns=[key], filesystem=fs).column(key).to_pylist()
        again = [k in seen for k in keys]
        seen.update(keys)
        if any(again):
            table = pq.read_table(path, filesystem=fs).filter(pa.array([not a for a in again]))
            write_atomically(table, folder, path.rsplit("/", 1)[1])
            dropped += sum(again)
    return dropped


def merge_lines(folder: str, output: str) -> int:
    """The ``line`` column of the parts in ``folder``, in key order, each key once, as the text file ``output``
    (written whole, then renamed); returns the lines written."""
    fs, root = filesystem(folder)
    paths = parts(folder)
    while len(paths) > MERGE_FAN_IN:  # merge in rounds, so that a merge keeps few files open
        merged = []
        for start in range(0, len(paths), MERGE_FAN_IN):
            merged.append(f"{root}/.merge-{uuid.uuid4().hex}")
            _write_rows(fs, merged[-1], _merged(fs, paths[start : start + MERGE_FAN_IN]))
            _delete_merges(fs, paths[start : start + MERGE_FAN_IN])
        paths = merged
    out_fs, out_path = filesystem(output)
    temporary = f"{out_path}.tmp-{uuid.uuid4().hex}"
    written = 0
    with out_fs.open_output_stream(temporary) as stream:
        for _, line in _merged(fs, paths):
            stream.write(line.encode() + b"\n")
            written += 1
    out_fs.move(temporary, out_path)
    _delete_merges(fs, paths)
    return written


def _delete_merges(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Delete the merge rounds' own files among ``paths`` (never a part)."""
    for path in paths:
        if path.rsplit("/", 1)[1].startswith(".merge-"):
            fs.delete_file(path)


def _merged(fs: pafs.FileSystem, paths: list[str]) -> Iterator[tuple[int, str]]:
    """The (key, line) rows of ``paths``, each sorted by key, merged in key order with each key once."""
    last = None
    for key, line in heapq.merge(*(_rows(fs, path) for path in paths)):
        if key != last:
            yield key, line
            last = key


def _write_rows(fs: pafs.FileSystem, path: str, rows: Iterator[tuple[int, str]], batch_rows: int = 1024) -> None:
    schema = pa.schema([("key", pa.int64()), ("line", pa.string())])
    with fs.open_output_stream(path) as stream, pq.ParquetWriter(stream, schema) as writer:
        while batch := list(itertools.islice(rows, batch_rows)):
            writer.write_table(pa.Table.from_pylist([{"key": k, "line": v} for k, v in batch], schema=schema))


def _rows(fs: pafs.FileSystem, path: str) -> Iterator[tuple[int, str]]:
    with fs.open_input_file(path) as stream:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=256, columns=["key", "line"]):
            yield from zip(batch.column("key").to_pylist(), batch.column("line").to_pylist())
