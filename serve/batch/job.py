"""One batch run on Ray Data: what is left to do, the operators that do it, and the output made whole.

The operators, as the service splits its work (docs/batch.md):

    read      the requests file in byte ranges (``RequestLines``), or the list of images     CPU tasks
    prepare   parse and check, read and resize the image (``stages.prepare_*``)              CPU tasks
    generate  ``EngineWorker``: an actor pool, one engine per GPU (one on the CPU without)    actors
    finish    decode the tokens, the entities, the output row (``stages.finish_*``)          CPU tasks
    write     ``PartsSink``: each task's rows to one part file, whole or not at all           write tasks

Ray Data's streaming executor runs them together, each with the Preprocessor's resources (CPU operators) or the
Generator's (the engines), and holds back the reads when the blocks in flight reach its memory budget: a run holds
a bounded number of blocks whatever the input's size. There is no scheduler of our own; Ray Data retries a task
whose worker dies and restarts an actor whose process does.

A run's state lives beside its output: for a batch file ``OUTPUT.batch/`` (``manifest.json``, ``parts/`` while
it runs, ``summary.json``), for images the output folder itself (its part files) and ``OUTPUT/_batch/``. A rerun
with the same output reads the keys its parts hold and skips them; a run that ends merges a batch file's parts
into ``OUTPUT`` in input order.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from serve.app.builder import generator_resources
from serve.app.config import ServiceConfig
from serve.batch import stages
from serve.batch.engine_worker import EngineWorker
from serve.batch.output import PartsSink, done_keys, drop_duplicates, merge_lines, remove_temporaries
from serve.batch.sources import RequestLines, filesystem, image_table
from serve.batch.summary import batch_summary
from serve.batch.usage import TreeUsage

log = logging.getLogger(__name__)

IMAGE_BLOCK_ROWS = 64
"""Images a block of the image list holds (a prepare task's work)."""
ENGINE_CALLS = 4
"""Blocks an engine actor works on at once, each ``max_batch_size / 2`` requests: two engines' worth of requests in
flight, so that the engine admits the next block's requests as the others finish."""


class BatchError(ValueError):
    """A run that cannot start: its output holds another run's state, or its input cannot be read."""


@dataclass(frozen=True)
class BatchJob:
    """What to run: the requests file (``images`` false) or the images (a folder, glob or table), where to, and for
    images the request fields each gets (task, text, max_tokens ...). ``engines``: the engine actors (default one
    per GPU of the cluster, else one)."""

    source: str
    output: str
    images: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    rows_per_file: int = 1000
    engines: int | None = None

    @property
    def state(self) -> str:
        return f"{self.output.rstrip('/')}/_batch" if self.images else f"{self.output}.batch"

    @property
    def parts(self) -> str:
        return self.output.rstrip("/") if self.images else f"{self.state}/parts"

    @property
    def key(self) -> str:
        return "id" if self.images else "key"

    def manifest(self, config: ServiceConfig) -> dict[str, Any]:
        """What a rerun must share with this run to resume it: the input (a requests file's size and time too,
        since its keys are byte offsets), the options and the model."""
        found: dict[str, Any] = {"source": self.source, "images": self.images, "options": self.options}
        found["model"] = config.model.source
        if not self.images:
            fs, path = filesystem(self.source)
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise BatchError(f"{self.source}: no such file")
            found["size"], found["mtime_ns"] = info.size, info.mtime_ns
        return found


def run(job: BatchJob, config: ServiceConfig, worker: type = EngineWorker, progress: bool = True) -> dict[str, Any]:
    """Run ``job`` (resuming what an earlier run with the same output did) and return its summary; Ray must be
    initialized."""
    began = time.time()
    usage = TreeUsage()
    manifest = _claim(job, config)
    if manifest.get("complete") and not job.images:
        log.info("%s is complete already: nothing to do", job.output)
        usage.stop()
        return json.loads(_read(f"{job.state}/summary.json"))
    remove_temporaries(job.parts)
    kind = pa.string() if job.images else pa.int64()
    done = done_keys(job.parts, job.key, kind)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    cpu = {"num_cpus": config.preprocessor.num_cpus, "batch_format": "pyarrow"}
    if job.images:
        images = image_table(job.source)
        todo = images.filter(pc.invert(pc.is_in(images.column("key"), value_set=done)))
        skipped = images.num_rows - todo.num_rows
        blocks = [todo.slice(at, IMAGE_BLOCK_ROWS) for at in range(0, todo.num_rows, IMAGE_BLOCK_ROWS)]
        dataset = ray.data.from_arrow(blocks) if blocks else None
        prepare, finish, kwargs = stages.prepare_images, stages.finish_images, {"options": job.options}
    else:
        max_line = config.limits.max_body_bytes + stages.LINE_SLACK_BYTES
        dataset = ray.data.read_datasource(RequestLines(job.source, done.to_numpy(), max_line))
        skipped = len(done)
        prepare, finish, kwargs = stages.prepare_lines, stages.finish_lines, {}
    sink = PartsSink(job.parts, job.key, job.rows_per_file)
    if dataset is not None:
        items = dataset.map_batches(prepare, fn_kwargs={"config": config, **kwargs}, **cpu)
        generated = _generate(items, job, config, worker)
        rows = generated.map_batches(finish, fn_kwargs={"config": config}, **cpu)
        rows.write_datasink(sink, ray_remote_args={"num_cpus": config.preprocessor.num_cpus})
    dropped = drop_duplicates(job.parts, job.key)
    if dropped:
        log.warning("dropped %d rows that a retried task wrote twice", dropped)
    if not job.images:
        merge_lines(job.parts, job.output)
        fs, path = filesystem(job.parts)
        fs.delete_dir(path)
    measured = usage.includes("raylet")
    record = {"job": asdict(job), "service": config.model_dump(mode="json")}
    summary = batch_summary(record, sink.written, skipped, time.time() - began, usage.stop(), measured)
    _write(f"{job.state}/summary.json", json.dumps(summary, indent=2) + "\n")
    _write(f"{job.state}/manifest.json", json.dumps({**manifest, "complete": True}, indent=2) + "\n")
    return summary


def _generate(items: ray.data.Dataset, job: BatchJob, config: ServiceConfig, worker: type) -> ray.data.Dataset:
    """The generation operator: ``worker`` actors with the Generator's resources, each fed ``ENGINE_CALLS`` blocks
    of half the engine's batch at a time. Without ``job.engines``, one engine per GPU the cluster has (on the CPU
    where it has none and ``cpu_fallback`` is on); with it, that many engines with the Generator's resources as
    configured, GPUs included, which an autoscaling cluster adds if it has none yet."""
    explicit = job.engines is not None and config.engine.kind != "pixels"
    resources = (config.generator if explicit else generator_resources(config)).ray_actor_options
    engines = job.engines
    if engines is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        engines = max(1, int(gpus // resources.num_gpus)) if resources.num_gpus else 1
    options = resources.model_dump(exclude_none=True)
    pool = ray.data.ActorPoolStrategy(
        size=engines, max_tasks_in_flight_per_actor=ENGINE_CALLS, max_concurrent_calls_per_actor=ENGINE_CALLS
    )
    return items.map_batches(
        worker,
        fn_constructor_kwargs={"config": config},
        batch_size=max(1, config.engine.max_batch_size // 2),
        batch_format="pyarrow",
        compute=pool,
        **options,
    )


def _claim(job: BatchJob, config: ServiceConfig) -> dict[str, Any]:
    """The manifest of the run the output holds, if it is this one's; else this run's, written. Raises
    ``BatchError`` where the output holds another run's state (a batch file's whose output was removed since it
    completed is started over)."""
    wanted = job.manifest(config)
    path = f"{job.state}/manifest.json"
    if _exists(path):
        found = json.loads(_read(path))
        differs = sorted(name for name in wanted if found.get(name) != wanted[name])
        gone = found.get("complete") and not job.images and not _exists(job.output)
        if not differs and not gone:
            return found
        if differs and not gone:
            raise BatchError(
                f"{job.state} holds the state of a run with another {', '.join(differs)}; "
                "choose another output, or remove it to start over"
            )
    _write(path, json.dumps(wanted, indent=2) + "\n")
    return wanted


def _exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def _write(location: str, text: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())
