"""Where a batch's rows go: part files that appear whole, under names made from their keys (a retried write
replaces its own file), rows written twice dropped, and the batch file merged in input order, each line once."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from serve.batch import output
from serve.batch.output import PartsSink, done_keys, drop_duplicates, merge_lines, parts, remove_temporaries


def block(keys: list[int], tag: str = "") -> pa.Table:
    """Output rows of a batch file, with the statistics columns the finishing operator adds."""
    return pa.table(
        {
            "key": pa.array(keys, pa.int64()),
            "line": [f"line {k}{tag}" for k in keys],
            "_ok": [k % 5 != 0 for k in keys],
            "_prompt_tokens": [70] * len(keys),
            "_completion_tokens": [k for k in keys],
            "_sent": [100.0 + k for k in keys],
            "_done": [101.0 + k for k in keys],
        }
    )


def test_a_part_is_sorted_stripped_of_statistics_and_named_by_its_keys(tmp_path):
    sink = PartsSink(str(tmp_path), "key", rows_per_file=10)
    sink.on_write_start()
    stats = sink.write([block([7, 3]), block([]), block([11])], None)
    (path,) = parts(str(tmp_path))
    written = pq.read_table(path)
    assert written.column_names == ["key", "line"] and written.column("key").to_pylist() == [3, 7, 11]
    assert stats.name == path.rsplit("/", 1)[1] == output.part_name(written.column("key"))
    assert (stats.rows, stats.answered, stats.completion_tokens) == (3, 3, 21)
    assert (stats.first_at, stats.last_at) == (103.0, 112.0)
    again = sink.write([block([11, 7, 3], tag=" again")], None)  # a retried task: the same rows
    assert again.name == stats.name and parts(str(tmp_path)) == [path]
    assert pq.read_table(path).column("line").to_pylist() == ["line 3 again", "line 7 again", "line 11 again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [stats.name]  # no temporary file left


def test_rows_written_twice_are_dropped_and_the_lines_merged_in_order(tmp_path, monkeypatch):
    sink = PartsSink(str(tmp_path), "key", rows_per_file=1)
    for keys in ([5, 1], [9, 2], [2, 30], [4, 8], [8, 7], [6, 3]):
        sink.write([block(keys)], None)
    (tmp_path / ".tmp-left-by-a-killed-write").write_bytes(b"half")
    assert remove_temporaries(str(tmp_path)) == 1
    assert sorted(done_keys(str(tmp_path), "key", pa.int64()).to_pylist()) == [1, 2, 2, 3, 4, 5, 6, 7, 8, 8, 9, 30]
    monkeypatch.setattr(output, "MERGE_FAN_IN", 2)  # merged in rounds
    lines = tmp_path / "out.jsonl"
    assert merge_lines(str(tmp_path), str(lines)) == 10
    assert lines.read_text().splitlines() == [f"line {k}" for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 30)]
    assert not list(tmp_path.glob(".merge-*"))
    assert drop_duplicates(str(tmp_path), "key") == 2
    keys = done_keys(str(tmp_path), "key", pa.int64()).to_pylist()
    assert sorted(keys) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 30]
    assert drop_duplicates(str(tmp_path), "key") == 0
