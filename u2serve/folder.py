"""Files and folders of photos (``u2serve segment``): in-process, or sent to a running service.

What a run does is the same either way: plan the outputs (a folder's images under their relative
paths), skip those already written, show progress, write each answer to a hidden temporary name
and rename it when complete (so an interrupted run leaves only whole files, and the next run
skips them), and report each photo that failed with the service's error code and message. What
turns a photo into its answer is the run's :class:`Step`:

- :class:`InProcess`: the model here, through the same stages as a request, without HTTP:
  ``decode`` → ``run_batch`` → ``finish`` → ``render``, so a file's output is byte for byte what
  ``POST /segment`` answers for it with the same parameters. As in the service, each photo's
  network map is kept in an in-process map cache (``U2SERVE_CACHE_MAP_BYTES``) under its bytes'
  digest: a photo that comes again (the same file under two names, or in two folders) skips the
  network, and the summary counts those hits. Reading, decoding and preparing the next photos,
  and finishing, encoding and writing the last ones, run in a thread pool while the model works
  on the current batch; at most a few photos are in flight, whatever the folder's size.
- :class:`Remote`: ``POST /segment`` on a running service (``--server``), through
  :class:`u2serve.Client`, which keeps enough requests in flight for the service's batcher and
  waits out its 503s; the summary counts the service's map cache hits.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from model.segmenter import Segmenter
from service.core.cache import digest, map_key
from service.core.cache.memory import MemoryMapCache
from service.core.infer import finish, run_batch
from service.errors import ServiceError
from service.images.decode import DecodedImage, decode
from service.images.encode import MEDIA_TYPES, Rendered, render
from service.params import SegmentParams
from u2serve.errors import ConnectionFailed, U2ServeError, Unauthorized

if TYPE_CHECKING:
    from u2serve.client import Client

__all__ = [
    "IMAGE_SUFFIXES",
    "InProcess",
    "Remote",
    "Report",
    "Step",
    "Summary",
    "Task",
    "outstanding",
    "plan",
    "segment_files",
    "store",
    "suffix_for",
]

log = logging.getLogger("u2serve")

# What a folder scan picks up; other files are counted as ignored. Files named on the command
# line are always tried, whatever their name.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
_SUFFIXES = {"image/png": ".png", "image/webp": ".webp", "image/jpeg": ".jpg"}


def suffix_for(media_type: str) -> str:
    """The file name extension of an answer's media type."""
    base = media_type.split(";")[0].strip().lower()
    return _SUFFIXES.get(base) or mimetypes.guess_extension(base) or ".bin"


@dataclass(frozen=True)
class Task:
    """One photo and where its output goes: ``stem`` plus the suffix of the answer's type."""

    source: Path
    stem: Path

    def target(self, suffix: str) -> Path:
        return self.stem.parent / (self.stem.name + suffix)


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    ignored: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    cache_hits: int = 0  # photos whose map came from the map cache
    cache_lookups: int = 0

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        ratio = self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0
        return (
            f"{self.written} written, {self.skipped} skipped (already done), "
            f"{len(self.failed)} failed, {self.ignored} ignored (not images by name) "
            f"in {self.seconds:.1f} s ({rate:.2f} images/s); map cache: {self.cache_hits} hits "
            f"of {self.cache_lookups} ({ratio:.0%})" + ("; interrupted" if self.interrupted else "")
        )


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _scan(folder: Path, recursive: bool, skip: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden files, and our own temporary ones
        if entry.is_dir():
            if recursive and not _is_within(entry.resolve(), skip):
                yield from _scan(entry, recursive, skip)
        elif entry.is_file():
            yield entry


def plan(inputs: Iterable[Path], out_dir: Path, *, recursive: bool, summary: Summary) -> list[Task]:
    """The work for ``inputs`` (files, and folders whose image files map into ``out_dir`` under
    their relative paths); missing inputs and clashing outputs are recorded as failed."""
    tasks: list[Task] = []
    out_resolved = out_dir.resolve()
    for given in inputs:
        if given.is_file():
            tasks.append(Task(given, out_dir / given.stem))
        elif given.is_dir() and given.resolve() == out_resolved:
            summary.failed.append((given, "is also the output folder: give -o another one"))
        elif given.is_dir():
            for path in _scan(given, recursive, out_resolved):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    summary.ignored += 1
                    continue
                rel = path.relative_to(given)
                tasks.append(Task(path, out_dir / rel.parent / rel.stem))
        else:
            summary.failed.append((given, "no such file or folder"))
    unique: list[Task] = []
    first: dict[Path, Path] = {}
    for task in tasks:
        if task.stem in first:
            summary.failed.append(
                (task.source, f"its output would overwrite that of {first[task.stem]}")
            )
        else:
            first[task.stem] = task.source
            unique.append(task)
    return unique


def outstanding(
    tasks: list[Task], params: SegmentParams, summary: Summary, *, overwrite: bool
) -> list[Task]:
    """The tasks whose output does not exist yet (all of them with ``overwrite``); the others
    are counted as skipped, and one whose output would replace its own input as failed."""
    # A box is answered as JSON whatever the format says (service/images/encode.py).
    media = "application/json" if params.output == "box" else MEDIA_TYPES.get(params.format)
    planned = suffix_for(media or "application/octet-stream")
    todo = []
    for task in tasks:
        target = task.target(planned)
        if target.resolve() == task.source.resolve():
            summary.failed.append((task.source, "its output would replace it"))
        elif overwrite or not target.exists():
            todo.append(task)
        else:
            summary.skipped += 1
    return todo


class Report:
    """A run's progress bar and summary, told what became of each photo (on the run's thread)."""

    def __init__(self, summary: Summary, total: int, *, progress: bool) -> None:
        self.summary = summary
        self.bar = tqdm(
            total=total,
            unit="img",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
            # Images per second throughout, where tqdm would switch to seconds per image.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
            "{rate_noinv_fmt}{postfix}]",
        )

    def written(self, task: Task) -> None:
        self.summary.written += 1
        self.bar.update(1)

    def failed(self, task: Task, exc: BaseException) -> None:
        self.summary.failed.append((task.source, _reason(exc)))
        self.bar.write(f"failed: {task.source}: {_reason(exc)}", file=sys.stderr)
        self.bar.set_postfix(failed=len(self.summary.failed), refresh=False)
        self.bar.update(1)

    def cache(self, *, hit: bool) -> None:
        """A photo's map was looked up in a map cache (this process's, or the service's)."""
        self.summary.cache_lookups += 1
        self.summary.cache_hits += hit

    def close(self) -> None:
        self.bar.close()


class Step(Protocol):
    """What turns a run's photos into answers: the model here, or a running service."""

    def run(self, tasks: list[Task], params: SegmentParams, report: Report) -> None:
        """Write every task's answer with :func:`store`, telling ``report`` what became of each.

        On ``KeyboardInterrupt``: take no new photo, deal with what is already being written as
        the step's documentation says, then raise it again."""
        ...

    def close(self) -> None:
        """Let go of what the step holds (a connection pool)."""
        ...


def store(task: Task, answer: Rendered) -> Path:
    """Write an answer to its task's output, whole or not at all: under a hidden temporary name,
    renamed when complete."""
    target = task.target(suffix_for(answer.media_type))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{os.getpid()}.part"
    try:
        partial.write_bytes(answer.body)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ServiceError | U2ServeError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def segment_files(
    step: Step,
    tasks: list[Task],
    params: SegmentParams,
    summary: Summary,
    *,
    progress: bool = True,
) -> Summary:
    """Segment every task (see ``outstanding``) with ``step``, recording what happened in
    ``summary``. A ``KeyboardInterrupt`` stops it and sets ``summary.interrupted``."""
    start = time.monotonic()
    report = Report(summary, len(tasks), progress=progress)
    try:
        step.run(tasks, params, report)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        report.close()
        summary.seconds += time.monotonic() - start
    return summary


# -- in process ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    image: DecodedImage
    digest: str  # the bytes' (the map cache's key)
    prepared: np.ndarray  # the network's input


def _read(path: Path, max_pixels: int, segmenter: Segmenter) -> _Read:
    """The decoded photo, its bytes' digest and the network's input, in a pool thread."""
    data = path.read_bytes()
    image = decode(data, max_pixels=max_pixels)
    return _Read(image, digest(data), segmenter.prepare(image.model_rgb))


def _finish_and_write(
    task: Task, segmenter: Segmenter, levels: np.ndarray, image: DecodedImage, params: SegmentParams
) -> Path:
    levels = finish(segmenter, levels, image.model_rgb, params)
    return store(task, render(levels, image, params))


@dataclass(eq=False)
class InProcess:
    """The model in this process: photos decoded ahead in a pool of ``threads``, batches of up
    to ``batch_size`` through the network on the run's thread, answers finished, encoded and
    written in the pool. Maps are kept in ``cache`` (a new one of 64 MiB if none is given).

    On ``KeyboardInterrupt``, photos not yet decoded are dropped and outputs being written are
    finished."""

    segmenter: Segmenter
    max_pixels: int
    batch_size: int = 1
    threads: int = 2
    cache: MemoryMapCache | None = None

    def run(self, tasks: list[Task], params: SegmentParams, report: Report) -> None:
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="u2serve-codec")
        run = _InProcessRun(self, pool, tasks, params, report)
        try:
            run.through()
        except KeyboardInterrupt:
            run.interrupted()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Nothing is held between runs: the pool is the run's."""


class _InProcessRun:
    """One run of an :class:`InProcess`: the photos read ahead in ``pool``, batches through the
    network on this thread, answers finished, encoded and written in ``pool``."""

    def __init__(
        self,
        step: InProcess,
        pool: ThreadPoolExecutor,
        tasks: list[Task],
        params: SegmentParams,
        report: Report,
    ) -> None:
        self.segmenter, self.max_pixels = step.segmenter, step.max_pixels
        self.batch_size, self.threads = step.batch_size, step.threads
        self.maps = step.cache if step.cache is not None else MemoryMapCache(64 * 1024**2)
        self.pool, self.params, self.report = pool, params, report
        self.window = max(2 * self.threads, 2 * self.batch_size)  # decodes ahead of the model
        self.ahead: deque[tuple[Task, Future[_Read]]] = deque()
        self.writing: dict[Future[Path], Task] = {}
        self.pending = iter(tasks)

    def through(self) -> None:
        """Every task, to its written answer or its reported failure."""
        self.fill()
        while self.ahead:
            batch = self.next_batch()
            if batch and not self.infer(batch):
                continue  # the batch failed, and its photos are reported: on to the next
            self.reap(limit=2 * self.threads)
        self.reap(limit=0)

    def interrupted(self) -> None:
        """Photos not yet decoded are dropped; outputs already being encoded are finished (and
        renamed) rather than abandoned."""
        for _, fut in self.ahead:
            fut.cancel()
        self.reap(limit=0)

    def fill(self) -> None:
        """Photos read ahead, up to the window."""
        while len(self.ahead) < self.window:
            task = next(self.pending, None)
            if task is None:
                return
            read = self.pool.submit(_read, task.source, self.max_pixels, self.segmenter)
            self.ahead.append((task, read))

    def next_batch(self) -> list[tuple[Task, _Read, str]]:
        """Up to ``batch_size`` read photos whose maps the cache does not have, each with its
        map's key; a photo that failed to read is reported, one the cache has is written."""
        batch: list[tuple[Task, _Read, str]] = []
        while self.ahead and len(batch) < self.batch_size:
            task, fut = self.ahead.popleft()
            try:
                read = fut.result()
            except Exception as exc:  # one bad file is reported and skipped, not fatal
                self.report.failed(task, exc)
                self.fill()
                continue
            self.fill()
            key = map_key(self.segmenter.identity, read.digest)
            cached = self.maps.lookup(key)
            self.report.cache(hit=cached is not None)
            if cached is None:
                batch.append((task, read, key))
                continue
            # The same photo again: its map's second half only, as the service does on a hit.
            side = self.segmenter.spec.input_size
            self.write(task, np.frombuffer(cached, np.uint8).reshape(side, side), read.image)
        return batch

    def infer(self, batch: list[tuple[Task, _Read, str]]) -> bool:
        """The batch's maps through the network, kept in the cache and written; False (each
        photo reported) if the network failed."""
        try:
            results = run_batch(self.segmenter, [read.prepared for _, read, _ in batch])
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(batch))
            for task, _, _ in batch:
                self.report.failed(task, exc)
            return False
        for (task, read, key), levels in zip(batch, results, strict=True):
            self.maps.keep(key, levels.tobytes())
            self.write(task, levels, read.image)
        return True

    def write(self, task: Task, levels: np.ndarray, image: DecodedImage) -> None:
        """The map's second half and the encode in the pool, as the service runs them."""
        fut = self.pool.submit(_finish_and_write, task, self.segmenter, levels, image, self.params)
        self.writing[fut] = task

    def reap(self, limit: int) -> None:
        """Collect finished writes; block while more than ``limit`` are outstanding."""
        while self.writing:
            done, _ = wait(list(self.writing), timeout=None if len(self.writing) > limit else 0)
            if not done:
                return
            for fut in done:
                task = self.writing.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    self.report.failed(task, exc)
                else:
                    self.report.written(task)


# -- by a running service ------------------------------------------------------------------------


@dataclass(eq=False)
class Remote:
    """``POST /segment`` on a running service, through ``client``: ``concurrency`` requests in
    flight (None: as many as its batcher needs, see :meth:`u2serve.Client.segment_many`),
    ``model`` one of the service's (None: its default). Answers are written as they come.

    An error that is the run's rather than a photo's (the service cannot be reached, or refuses
    the API key) stops the run and is raised. On ``KeyboardInterrupt``, no new request is sent,
    and the answers of those in flight are dropped, for the next run to ask again."""

    client: Client
    concurrency: int | None = None
    model: str | None = None

    def run(self, tasks: list[Task], params: SegmentParams, report: Report) -> None:
        # The parameters as they were given: the service validates which were, as here.
        options: dict[str, object] = params.model_dump(exclude_unset=True)
        if self.model is not None:
            options["model"] = self.model
        outcomes = self.client.segment_many(
            [task.source for task in tasks], concurrency=self.concurrency, **options
        )
        try:
            for outcome in outcomes:
                task = tasks[outcome.index]
                if outcome.error is not None:
                    if isinstance(outcome.error, ConnectionFailed | Unauthorized):
                        raise outcome.error
                    report.failed(task, outcome.error)
                    continue
                result = outcome.get()
                try:
                    store(task, Rendered(result.content, result.media_type))
                except OSError as exc:
                    report.failed(task, exc)
                    continue
                if result.map_cache is not None:
                    report.cache(hit=result.map_cache == "hit")
                report.written(task)
        finally:
            outcomes.close()

    def close(self) -> None:
        self.client.close()
