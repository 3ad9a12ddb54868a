"""Where a batch's inputs come from: a requests file's lines by byte range (each line once, whatever the ranges),
and the images of a folder, a glob or a table, each with a unique key."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.batch import sources
from serve.batch.sources import RequestLines, SourceError, image_table, lines_in, read_image
from serve.errors import InvalidImage, PayloadTooLarge


def expected_lines(data: bytes, max_line: int) -> list[tuple[int, bytes | None, int]]:
    found, offset = [], 0
    pieces = data.split(b"\n")
    for index, piece in enumerate(pieces):
        if index == len(pieces) - 1 and not piece:
            break  # the file ends with a newline
        found.append((offset, piece if len(piece) <= max_line else None, len(piece)))
        offset += len(piece) + 1
    return found


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"x")), max_size=12),
    final_newline=st.booleans(),
    chunk=st.integers(1, 50),
    max_line=st.integers(0, 30),
    read_bytes=st.integers(1, 9),
)
def test_byte_ranges_yield_each_line_once(lines, final_newline, chunk, max_line, read_bytes):
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    found = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "READ_BYTES", read_bytes)  # lines across many reads
        for start in range(0, max(len(data), 1), chunk):
            found += lines_in(io.BytesIO(data), start, min(start + chunk, len(data)), max_line)
    assert found == expected_lines(data, max_line)


def test_read_tasks_skip_blank_and_done_lines(tmp_path):
    path = tmp_path / "requests.jsonl"
    lines = [b'{"a": 1}', b"", b"   ", b'{"b": 2}', b"x" * 100, b'{"c": 3}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])
    source = RequestLines(str(path), done=np.array([offsets[3]]), max_line_bytes=50, chunk_bytes=7)
    tasks = source.get_read_tasks(parallelism=1)
    assert len(tasks) == -(-path.stat().st_size // 7)
    rows = pa.concat_tables([block for task in tasks for block in task()]).to_pylist()
    assert rows == [
        {"key": int(offsets[0]), "line": b'{"a": 1}', "size": 8},
        {"key": int(offsets[4]), "line": None, "size": 100},
        {"key": int(offsets[5]), "line": b'{"c": 3}', "size": 8},
    ]


def test_missing_requests_file_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        RequestLines(str(tmp_path / "absent.jsonl"), np.array([], np.int64), 100)


def test_a_folder_lists_its_images_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt", "sub/d.json"):
        (tmp_path / name).write_bytes(b"x")
    table = image_table(str(tmp_path))
    assert table.column("key").to_pylist() == ["a.PNG", "b.jpg", "sub/c.webp"]
    assert table.column("image").to_pylist() == [str(tmp_path / k) for k in ("a.PNG", "b.jpg", "sub/c.webp")]
    assert table.column("task").null_count == 3
    glob = image_table(str(tmp_path / "s*" / "*.webp"))
    assert glob.column("key").to_pylist() == ["sub/c.webp"]
    with pytest.raises(SourceError, match="no such folder"):
        image_table(str(tmp_path / "absent"))


def test_a_table_gives_ids_and_each_rows_own_request(tmp_path):
    rows = [
        {"id": "q1", "image": "photos/a.jpg", "task": "vqa", "text": "what?"},
        {"id": None, "image": "/abs/b.jpg", "task": None, "text": None},
        {"id": None, "image": None, "task": "caption", "text": None},
    ]
    (tmp_path / "table.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    table = image_table(str(tmp_path / "table.jsonl")).to_pylist()
    assert [row["key"] for row in table] == ["q1", "/abs/b.jpg", "row-2"]
    assert table[0]["image"] == str(tmp_path / "photos/a.jpg")  # relative to the table's folder
    assert (table[0]["task"], table[0]["text"], table[0]["region"]) == ("vqa", "what?", None)
    pq.write_table(pa.table({"image": ["a.jpg", "a.jpg"]}), tmp_path / "twice.parquet")
    with pytest.raises(SourceError, match=r"a\.jpg' appears more than once; give each row a unique id"):
        image_table(str(tmp_path / "twice.parquet"))
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "no-image.parquet")
    with pytest.raises(SourceError, match="needs an image column"):
        image_table(str(tmp_path / "no-image.parquet"))


def test_reading_an_image_names_what_went_wrong(tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 2000)
    assert read_image(str(tmp_path / "big.png"), 2000) == b"x" * 2000
    with pytest.raises(PayloadTooLarge, match="over the limit of 1999 bytes"):
        read_image(str(tmp_path / "big.png"), 1999)
    with pytest.raises(InvalidImage, match="cannot be read"):
        read_image(str(tmp_path / "absent.png"), 2000)
