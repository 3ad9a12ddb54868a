"""The bench workload: reproducible from its seed, within its mixes, from every image source."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from bench.workload import WorkloadConfig, build_workload, parse_mix
from serve.app.client import chat_request
from serve.app.shipped import PHOTOS
from serve.kosmos2.images import prepare_image
from tests.helpers import LIMITS, encode, photo


def small(**kwargs) -> WorkloadConfig:
    return WorkloadConfig(**{"resolutions": {"96x64": 1, "64x96": 1}, "pool_size": 24, **kwargs})


def test_the_same_seed_gives_the_same_workload_and_another_seed_another():
    first, again, other = build_workload(small()), build_workload(small()), build_workload(small(seed=1))
    assert first == again
    assert [i.image for i in first] == [i.image for i in again]
    assert [(i.task, i.text, i.image) for i in first] != [(i.task, i.text, i.image) for i in other]


def test_items_follow_the_mixes():
    pool = build_workload(small(formats={"png": 1, "jpeg": 1}, tasks={"vqa": 1, "ground": 1}, max_tokens=9))
    assert [i.index for i in pool] == list(range(24))
    assert {(i.width, i.height) for i in pool} == {(96, 64), (64, 96)}
    assert {i.task for i in pool} == {"vqa", "ground"}
    assert all(i.text and i.max_tokens == 9 for i in pool)
    formats = Counter(Image.open(io.BytesIO(i.image)).format for i in pool)
    assert set(formats) == {"PNG", "JPEG"}
    for item in pool:
        with Image.open(io.BytesIO(item.image)) as image:
            assert image.size == (item.width, item.height)
            assert item.image_name.endswith(image.format.lower())


def test_a_zero_weight_is_never_drawn():
    pool = build_workload(small(tasks={"caption": 1, "vqa": 0}, pool_size=40))
    assert {i.task for i in pool} == {"caption"} and all(i.text is None for i in pool)


def test_items_make_valid_service_requests():
    for item in build_workload(small(pool_size=8)):
        prepared = prepare_image(item.image, LIMITS)
        assert (prepared.width, prepared.height) == (item.width, item.height)
        body = chat_request(item.image, **item.request_fields())
        assert body["task"] == item.task and body["max_tokens"] == item.max_tokens and body["temperature"] == 0.0


def test_ignore_eos_is_sent_only_when_asked():
    [plain] = build_workload(small(pool_size=1))
    [forced] = build_workload(small(pool_size=1, ignore_eos=True))
    assert "ignore_eos" not in chat_request(plain.image, **plain.request_fields())
    assert chat_request(forced.image, **forced.request_fields())["ignore_eos"] is True


def test_sample_photographs_resized_to_the_buckets():
    pool = build_workload(small(source="photos", pool_size=10, formats={"jpeg": 1}))
    assert all(i.image_name.removesuffix(".jpeg") in PHOTOS for i in pool)
    assert len({i.image_name for i in pool}) > 1
    assert all(Image.open(io.BytesIO(i.image)).size == (i.width, i.height) for i in pool)


def test_a_folder_is_sent_as_it_is(tmp_path):
    files = {"a.png": encode(photo(50, 40), "PNG"), "b.jpg": encode(photo(30, 60, seed=2), "JPEG")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an image")
    pool = build_workload(WorkloadConfig(source=str(tmp_path), pool_size=12))
    assert {i.image_name for i in pool} == set(files)
    for item in pool:
        assert item.image == files[item.image_name]
        assert (item.width, item.height) == ((50, 40) if item.image_name == "a.png" else (30, 60))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": {"translate": 1}}, "unknown task"),
        ({"formats": {"tiff": 1}}, "unknown image format"),
        ({"resolutions": {"big": 1}}, "WIDTHxHEIGHT"),
        ({"tasks": {"caption": -1}}, "non-negative"),
        ({"max_tokens": 0}, "at least 1"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="neither synthetic"):
        build_workload(WorkloadConfig(source=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="no image files"):
        build_workload(WorkloadConfig(source=str(tmp_path)))


def test_parse_mix():
    assert parse_mix("640x480:0.5,1280x720:0.3,1920x1080:0.2") == {"640x480": 0.5, "1280x720": 0.3, "1920x1080": 0.2}
    with pytest.raises(ValueError, match="empty choice"):
        parse_mix("caption:1,,vqa")
