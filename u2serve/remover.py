"""In process: what ``rembg.remove`` is to rembg's users, with the service's own answers.

A :class:`Remover` is the service in this process, without HTTP. It starts the service's core
(:func:`service.core.service.start_service`: the weights loaded and verified, the model's
batcher started, the codec pool and the map cache made; no web app is built), on an event loop
of its own in a thread; each
call is what ``POST /segment`` does for a request once it is read, ``Pipeline.answer`` on a
``Submission``, and its ``Rendered`` answer is given back in the kind of image it came as
(:mod:`u2serve.images`). So its answers are the service's bytes for the same parameters, and
calls from many threads at once meet in the service's batcher.

Nothing of the service is imported until a Remover is made: ``import u2serve`` stays quick for
those who only use the client.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, overload

import numpy as np
from PIL import Image

from u2serve.errors import InvalidParameter, U2ServeError, error_for
from u2serve.images import ImageInput, answer_as, as_fields, upload_of
from u2serve.loop import LoopThread

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager
    from os import PathLike

    from service.core.service import Service
    from service.images.encode import Rendered
    from service.params import SegmentParams
    from service.settings import Settings

__all__ = ["Remover", "remove"]

Output = Literal["mask", "probability", "cutout", "box"]
Precision = Literal["faithful", "fast", "float32"]
Engine = Literal["auto", "torch", "mnn", "openvino"]

# The service's own settings that mean nothing in process, pinned whatever the environment says:
# images are given, not fetched; no API key, CORS or Redis; no image ids (nothing asks again).
# A script's threads wait for their turn rather than be refused: the queue, the deadline and
# the memory budget are as large as the settings allow (the threads bound what is in flight).
_IN_PROCESS: dict[str, Any] = {
    "url_input": False,
    "api_key": None,
    "cors_origins": [],
    "cache_url": None,
    "cache_upload_bytes": 0,
    "workers": 1,
    "max_queue": 100_000,
    "request_timeout_s": 3600,
    "memory_budget_bytes": 2**62,
    # The first call pays for the first allocation, as rembg's does; start-up stays short.
    "warmup": False,
}


def _settings(model: str, given: dict[str, Any]) -> Settings:
    """The service's settings for one model in process: ``given`` (None: the setting's
    default, or its ``U2SERVE_*`` variable, as for ``u2serve segment``) and the pinned ones."""
    from pydantic import ValidationError

    from service.settings import Settings

    chosen = {k: v for k, v in given.items() if v is not None}
    try:
        return Settings(model=model, models=[model], **chosen, **_IN_PROCESS)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        raise ValueError(problems) from None


def _ensure_weights(settings: Settings, model: str) -> None:
    """Fetch and verify the model's weights into the weights folder if they are not there (an
    explicit ``U2SERVE_WEIGHTS`` file is its owner's to provide)."""
    from weights.fetch import fetch

    if settings.weights is None and not settings.weights_for(model).is_file():
        fetch(model, settings.weights_dir)


class Remover:
    """One model, loaded once, for as many calls as you like, from as many threads as you like.

    ``model``: ``u2net`` (most faithful) or ``u2netp`` (small, fast). The other arguments are
    the service's settings of the same names (``u2serve segment`` has them as flags); None keeps
    the setting's default, or its ``U2SERVE_*`` variable where one is set:

    - ``device``: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:N``;
    - ``precision``: ``faithful`` (the default), ``fast`` or ``float32``; ``engine``: ``auto``,
      ``torch``, ``mnn`` or ``openvino``;
    - ``threads``: the network's CPU threads; ``max_batch_size``: the most images per batch
      (1 on a CPU, 32 on a GPU);
    - ``weights_dir``: where the weights are kept (``~/.cache/u2serve``); missing weights are
      fetched there and verified first, as ``python -m weights fetch`` does.

    Close it (or use it in a ``with`` block) to stop its threads; ``remove()`` keeps one per
    model for the life of the process.
    """

    def __init__(
        self,
        model: str = "u2net",
        *,
        device: str | None = None,
        precision: Precision | None = None,
        engine: Engine | None = None,
        threads: int | None = None,
        max_batch_size: int | None = None,
        weights_dir: str | PathLike[str] | None = None,
    ) -> None:
        from model.weights import SPECS, WeightsError

        if model not in SPECS:
            raise ValueError(f"model must be one of {', '.join(SPECS)}, not {model!r}")
        given: dict[str, Any] = {
            "device": device,
            "precision": precision,
            "engine": engine,
            "threads": threads,
            "max_batch_size": max_batch_size,
            "weights_dir": Path(weights_dir) if weights_dir is not None else None,
        }
        settings = _settings(model, given)
        _ensure_weights(settings, model)
        self.model = model
        self._closed = False
        self._loop = LoopThread("u2serve-remover")
        try:
            try:
                self._service = self._loop.run(self._open(settings))
            except WeightsError:
                if settings.weights is not None:
                    raise
                # Weights present but an engine's file derived from them missing or stale:
                # fetch makes what is missing (verifying what is there), then start again.
                from weights.fetch import fetch

                fetch(model, settings.weights_dir)
                self._service = self._loop.run(self._open(settings))
        except BaseException:
            self._loop.stop()
            raise

    # -- calls -----------------------------------------------------------------------------------

    @overload
    def remove(
        self,
        image: bytes | bytearray | memoryview | str | PathLike[str],
        *,
        output: Output = ...,
        **options: object,
    ) -> bytes: ...

    @overload
    def remove(
        self, image: Image.Image, *, output: Literal["box"], **options: object
    ) -> dict[str, Any]: ...

    @overload
    def remove(
        self,
        image: Image.Image,
        *,
        output: Literal["mask", "probability", "cutout"] = ...,
        **options: object,
    ) -> Image.Image: ...

    @overload
    def remove(
        self, image: np.ndarray, *, output: Literal["box"], **options: object
    ) -> dict[str, Any]: ...

    @overload
    def remove(
        self,
        image: np.ndarray,
        *,
        output: Literal["mask", "probability", "cutout"] = ...,
        **options: object,
    ) -> np.ndarray: ...

    def remove(self, image: ImageInput, *, output: Output = "cutout", **options: object) -> Any:
        """The answer ``POST /segment`` gives for ``image`` with these parameters, in the kind
        of image given: bytes for bytes and for a path (the encoded file the service answers),
        a PIL image for a PIL image, an array for an array (``output="box"``: the JSON as a
        dict). ``output`` defaults to ``cutout``, as rembg's does; ``options`` are the other
        parameters of ``POST /segment`` (``threshold``, ``format``, ``crop``, ``crop_margin``,
        ``bg_color``, ``quality``, ``max_side``, ``refine``), validated as the service does:
        :class:`~u2serve.InvalidParameter` with the service's message."""
        return self._remove(image, output, options)

    def _remove(self, image: ImageInput, output: str, options: dict[str, object]) -> Any:
        params = self._params(output, options)
        data, kind = upload_of(image)
        answer = self._answer(data, params)
        return answer_as(kind, answer.body, answer.media_type)

    def _params(self, output: str, options: dict[str, object]) -> SegmentParams:
        from service.errors import InvalidParameter as Invalid
        from service.params import parse_params

        if "model" in options:
            raise InvalidParameter(
                f"model: this Remover runs {self.model}; make one with Remover(model=...) for "
                "another"
            )
        try:
            return parse_params(as_fields({"output": output, **options}))
        except Invalid as exc:
            raise InvalidParameter(exc.message) from None

    def _answer(self, data: bytes, params: SegmentParams) -> Rendered:
        from service.core.access import AccessRecord
        from service.core.pipeline import RequestContext
        from service.core.request import Submission
        from service.errors import ServiceError

        if self._closed:
            raise RuntimeError("this Remover is closed")
        service = self._service

        async def answer() -> Rendered:
            now = time.monotonic()
            ctx = RequestContext(AccessRecord(uuid.uuid4().hex, "in-process"), now, received=now)
            # Counted as the route counts a request, so that close() (the core's drain) waits
            # for it.
            with service.counted():
                return await service.pipeline.answer(Submission(params, image=data), ctx)

        try:
            return self._loop.run(answer())
        except ServiceError as exc:
            raise _translated(exc) from None

    # -- the event loop --------------------------------------------------------------------------

    async def _open(self, settings: Settings) -> Service:
        from service.core.service import start_service
        from service.metrics import Metrics

        self._starting: AbstractAsyncContextManager[Service] = start_service(settings, Metrics())
        service = await self._starting.__aenter__()
        # The core marks itself ready from a task it has just begun.
        for _ in range(1000):
            if service.is_ready:
                service.serving()
                return service
            await asyncio.sleep(0)
        raise RuntimeError("the in-process service did not become ready")

    def close(self) -> None:
        """Finish the calls under way, then stop the model's threads."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._starting.__aexit__(None, None, None))
        finally:
            self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _translated(exc: Exception) -> U2ServeError:
    from service.errors import ServiceError

    assert isinstance(exc, ServiceError)
    return error_for(exc.status, exc.code, exc.message)


_removers: dict[str, Remover] = {}
_removers_lock = threading.Lock()


@overload
def remove(
    image: bytes | bytearray | memoryview | str | PathLike[str],
    *,
    model: str = ...,
    output: Output = ...,
    **options: object,
) -> bytes: ...


@overload
def remove(
    image: Image.Image, *, model: str = ..., output: Literal["box"], **options: object
) -> dict[str, Any]: ...


@overload
def remove(
    image: Image.Image,
    *,
    model: str = ...,
    output: Literal["mask", "probability", "cutout"] = ...,
    **options: object,
) -> Image.Image: ...


@overload
def remove(
    image: np.ndarray, *, model: str = ..., output: Literal["box"], **options: object
) -> dict[str, Any]: ...


@overload
def remove(
    image: np.ndarray,
    *,
    model: str = ...,
    output: Literal["mask", "probability", "cutout"] = ...,
    **options: object,
) -> np.ndarray: ...


def remove(
    image: ImageInput, *, model: str = "u2net", output: Output = "cutout", **options: object
) -> Any:
    """:meth:`Remover.remove` with a :class:`Remover` of ``model`` made on first use (its
    weights fetched if missing) and kept for later calls; make your own Remover to choose its
    device, precision or engine, or to close it."""
    with _removers_lock:
        remover = _removers.get(model)
        if remover is None:
            remover = _removers[model] = Remover(model)
    return remover._remove(image, output, options)
