"""Over HTTP: :class:`Client` and :class:`AsyncClient` use a running service as it is meant to be
used, so that each backend does not write its own ``requests.post`` and get the details wrong.

- A 503 (``overloaded``, ``not_ready``, ``draining``) is tried again after its ``Retry-After``,
  and a connection that failed before any answer after a short pause, as long as the waiting
  stays within ``retry_s`` in all; then the last error is raised. Nothing else is retried: a
  422 or any other 4xx will not change by asking again.
- Any other refusal raises the typed error of :mod:`u2serve.errors`, carrying the service's
  code, message and request id (an image id the service no longer has: :class:`ImageNotFound`).
- :meth:`Client.again` asks for another answer for a photo by the image id of an earlier answer:
  the photo is not sent again, and its network map is not computed again.
- :meth:`Client.segment_many` keeps enough requests in flight for the service's batcher to fill
  its batches, and yields each answer as it comes.
- A :class:`Result` gives the subject's box (``X-Foreground-*``), the image id, and the stage
  timings (``Server-Timing``).

:class:`Client` is :class:`AsyncClient` run on an event loop of its own: one implementation of
every rule, and a Ctrl-C that cancels the requests in flight rather than waiting for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeGuard

import httpx

from u2serve.errors import ConnectionFailed, ImageNotFound, U2ServeError, error_for
from u2serve.images import ImageInput, as_fields, upload_of
from u2serve.loop import LoopThread

__all__ = [
    "DEFAULT_RETRY_S",
    "DEFAULT_TIMEOUT_S",
    "AsyncClient",
    "Box",
    "Client",
    "Outcome",
    "Result",
]

log = logging.getLogger("u2serve.client")

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRY_S = 60.0
# segment_many's least concurrency: the network's batch, and the decoding and encoding of the
# images before and after it, which the service does beside it.
_MIN_CONCURRENCY = 4
# Pauses after a connection that failed, doubling up to the last.
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Box:
    """The subject's box, in the answer's pixels."""

    left: int
    top: int
    width: int
    height: int


@dataclass(frozen=True)
class Result:
    """One answer of ``POST /segment``.

    ``content``: its bytes (an image, or JSON for ``output=box``), of ``media_type``.
    ``image_id``: for :meth:`Client.again` (None when the service could not keep the photo).
    ``box``: the subject's box in the answer's pixels (None: no foreground), and
    ``foreground_ratio`` its share of the image's pixels. ``timings``: each stage's
    milliseconds, from ``Server-Timing`` (``decode``, ``queue``, ``infer``, ``encode``,
    ``total``, …); ``map_cache``: ``hit`` when the photo's network map was already kept,
    ``miss`` when it was computed. ``retries``: the 503s and failed connections waited out
    before it. ``model``: the model asked for (None: the service's default), which
    :meth:`Client.again` keeps.
    """

    content: bytes
    media_type: str
    image_id: str | None
    box: Box | None
    foreground_ratio: float
    timings: Mapping[str, float] = field(default_factory=dict)
    map_cache: str | None = None
    request_id: str | None = None
    retries: int = 0
    model: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One image of :meth:`Client.segment_many`: its position in the images given, the image as
    given, and its :class:`Result` or the error it got (a :class:`~u2serve.U2ServeError`, or the
    ``OSError`` of a file that could not be read)."""

    index: int
    image: ImageInput
    result: Result | None = None
    error: U2ServeError | OSError | None = None

    def get(self) -> Result:
        """The result; raises the error if this image got one."""
        if self.error is not None:
            raise self.error
        assert self.result is not None  # one of the two is always set
        return self.result


# -- the rules, shared by both clients -----------------------------------------------------------


def _retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (seconds, or an HTTP date); 1 if absent or unread."""
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return 1.0
            return max(0.0, when.timestamp() - time.time())
    return 1.0


# Failures where the service has not begun on the request (the connection was refused, or not
# made in time), or closed a kept-alive connection as the request went out: asking again sends
# it once. A read that timed out is not among them: the service may still be working on it.
_RETRIED_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class _Waits:
    """When to ask again, for one call: after a 503 its ``Retry-After``, after a failed
    connection a pause that doubles, for as long as the call's end (``retry_s`` from its start)
    is not passed by waiting."""

    def __init__(self, retry_s: float) -> None:
        self._end = time.monotonic() + retry_s
        self.count = 0

    def after(self, answer: httpx.Response | Exception) -> float | None:
        """Seconds to wait before asking again, or None: the answer (or failure) is final."""
        if isinstance(answer, httpx.Response):
            if answer.status_code != 503:
                return None
            wait = _retry_after(answer.headers.get("retry-after"))
        elif isinstance(answer, _RETRIED_FAILURES):
            wait = _BACKOFF_S[min(self.count, len(_BACKOFF_S) - 1)]
        else:
            return None
        if time.monotonic() + wait > self._end:
            return None
        self.count += 1
        return wait


def _is_url(image: object) -> TypeGuard[str]:
    return isinstance(image, str) and image[:8].lower().startswith(("http://", "https://"))


def _timings(header: str) -> tuple[dict[str, float], str | None]:
    """``Server-Timing`` → each stage's milliseconds, and the map cache's ``desc``."""
    timings: dict[str, float] = {}
    cache = None
    for metric in header.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        if not name:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):  # a stage without a figure is left out
                    timings[name] = float(value)
            elif key == "desc" and name == "cache":
                cache = value.strip('"')
    return timings, cache


def _box(headers: httpx.Headers) -> tuple[Box | None, float]:
    try:
        left, top, width, height = (
            int(headers[f"x-foreground-{side}"]) for side in ("left", "top", "width", "height")
        )
        ratio = float(headers["x-foreground-ratio"])
    except (KeyError, ValueError):
        return None, 0.0
    return (Box(left, top, width, height) if width and height else None), ratio


def _error(response: httpx.Response) -> U2ServeError:
    """The typed error for a refusal: the service's JSON error, or what a proxy answered."""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{response.status_code}"
        message = response.text[:200].strip() or response.reason_phrase
    retry_after = (
        _retry_after(response.headers.get("retry-after")) if response.status_code == 503 else None
    )
    return error_for(
        response.status_code, code, message, request_id=request_id, retry_after=retry_after
    )


def _result(response: httpx.Response, retries: int, model: object = None) -> Result:
    if response.status_code != 200:
        raise _error(response)
    timings, cache = _timings(response.headers.get("server-timing", ""))
    box, ratio = _box(response.headers)
    return Result(
        content=response.content,
        media_type=response.headers.get("content-type", "application/octet-stream"),
        image_id=response.headers.get("x-image-id"),
        box=box,
        foreground_ratio=ratio,
        timings=timings,
        map_cache=cache,
        request_id=response.headers.get("x-request-id"),
        retries=retries,
        model=model if isinstance(model, str) else None,
    )


def _why(answer: httpx.Response | Exception) -> str:
    if isinstance(answer, httpx.Response):
        return f"{answer.status_code} {_error(answer).code}"
    return type(answer).__name__


def _failed(url: str, exc: Exception) -> ConnectionFailed:
    return ConnectionFailed(f"no answer from {url}: {type(exc).__name__}: {exc}".rstrip(": "))


def _image_id(result_or_id: Result | str) -> str:
    image_id = result_or_id.image_id if isinstance(result_or_id, Result) else result_or_id
    if image_id is None:
        raise ImageNotFound(
            "this answer has no image id: the service could not keep its photo; send the "
            "image again"
        )
    return image_id


def _concurrency(readiness: Mapping[str, Any], model: object) -> int:
    """Twice the model's batch: one batch in the network while the next one fills."""
    models = readiness.get("models") or [readiness]
    chosen = next((m for m in models if m.get("model") == model), models[0])
    return max(_MIN_CONCURRENCY, 2 * int(chosen.get("max_batch_size") or 1))


class _Requests:
    """What each call sends: the requests, built alike for both clients."""

    def __init__(self, url: str, api_key: str | None) -> None:
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"the service's URL is http(s)://host[:port][/path], not {url!r}")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def upload(self, data: bytes, options: Mapping[str, object]) -> dict[str, Any]:
        # The raw body: no multipart to build and parse; the parameters in the query.
        return {
            "params": as_fields(options),
            "content": data,
            "headers": {"content-type": "application/octet-stream"},
        }

    def by_reference(self, name: str, value: str, options: Mapping[str, object]) -> dict[str, Any]:
        # A form body rather than the query: proxies log query strings, and an image id is a
        # bearer capability for the photo's answers.
        return {"data": {name: value, **as_fields(options)}}


def _client_kwargs(url: str, headers: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    return {
        "base_url": url,
        "headers": dict(headers),
        "timeout": httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        # segment_many's concurrency bounds the connections; a pool limit would make requests
        # wait for a connection within the timeout.
        "limits": httpx.Limits(max_connections=None, max_keepalive_connections=64),
    }


# -- the clients ---------------------------------------------------------------------------------


class AsyncClient:
    """A running service at ``url`` (``http://host:8000``, or a prefix behind a proxy), with its
    API key if it has one, for asyncio. ``timeout_s``: the longest wait for one answer;
    ``retry_s``: how long a call keeps asking again after 503s and failed connections, in all.

    Close it with ``await client.aclose()``, or use it in an ``async with`` block.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        self._requests = _Requests(url, api_key)
        self.url = self._requests.url
        self.retry_s = retry_s
        self._http = httpx.AsyncClient(
            **_client_kwargs(self.url, self._requests.headers, timeout_s)
        )

    async def segment(self, image_or_url: ImageInput, **options: object) -> Result:
        """The answer for an image (bytes, a path, a PIL image or a numpy array: sent as the
        bytes :mod:`u2serve.images` says; a file is read, an image encoded, in a thread), or for
        an ``http(s)://`` URL the service fetches. ``options``: the parameters of
        ``POST /segment`` (``output``, ``threshold``, ``format``, ``crop``, ``bg_color``, …) and
        ``model``, validated by the service."""
        model = options.get("model")
        if _is_url(image_or_url):
            return await self._call(
                self._requests.by_reference("url", image_or_url, options), model
            )
        if isinstance(image_or_url, bytes):
            data = image_or_url
        else:
            data, _ = await asyncio.to_thread(upload_of, image_or_url)
        return await self._call(self._requests.upload(data, options), model)

    async def again(self, result_or_id: Result | str, **options: object) -> Result:
        """Another answer for the photo of an earlier one (its :class:`Result`, or its image
        id), from the upload the service kept: nothing is sent again. The model is the earlier
        answer's, unless ``model`` names another. :class:`ImageNotFound` when the service no
        longer has it: send the image again with :meth:`segment`."""
        image_id = _image_id(result_or_id)
        if isinstance(result_or_id, Result) and result_or_id.model and "model" not in options:
            options = {**options, "model": result_or_id.model}
        model = options.get("model")
        return await self._call(self._requests.by_reference("image_id", image_id, options), model)

    async def segment_many(
        self, images: Iterable[ImageInput], *, concurrency: int | None = None, **options: object
    ) -> AsyncGenerator[Outcome, None]:
        """Every image's :class:`Outcome`, **as each completes, not in the order given**
        (``Outcome.index`` is its position there). ``concurrency`` requests are kept in flight
        (None: twice the model's batch size as ``/readyz`` gives it, at least 4, so that one
        batch fills while the last one runs). ``images`` is read as requests go out, so it may
        be a generator of any length. A failed image is an outcome with its error, not an
        exception. Closing the generator early cancels the requests in flight."""
        if concurrency is None:
            concurrency = _concurrency(await self.info(), options.get("model"))
        if concurrency < 1:
            raise ValueError(f"concurrency is at least 1, not {concurrency}")
        running: dict[asyncio.Task[Result], tuple[int, ImageInput]] = {}
        pending = enumerate(images)
        try:
            while True:
                while len(running) < concurrency:
                    item = next(pending, None)
                    if item is None:
                        break
                    running[asyncio.ensure_future(self.segment(item[1], **options))] = item
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index, image = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        yield Outcome(index, image, result=task.result())
                    elif isinstance(exc, U2ServeError | OSError):
                        yield Outcome(index, image, error=exc)
                    else:
                        raise exc
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def info(self) -> dict[str, Any]:
        """What the service serves (``GET /readyz``): its models, engine, device, batch size;
        waits while it is starting, as a call does after a 503."""
        response, _ = await self._send(lambda: self._http.build_request("GET", "/readyz"))
        _result(response, 0)  # raises what a refusal means
        data: dict[str, Any] = response.json()
        return data

    async def _call(self, request: dict[str, Any], model: object = None) -> Result:
        response, retries = await self._send(
            lambda: self._http.build_request("POST", "/segment", **request)
        )
        return _result(response, retries, model)

    async def _send(self, build: Callable[[], httpx.Request]) -> tuple[httpx.Response, int]:
        waits = _Waits(self.retry_s)
        while True:
            try:
                answer: httpx.Response | Exception = await self._http.send(build())
            except httpx.TransportError as exc:
                answer = exc
            wait = waits.after(answer)
            if wait is None:
                if isinstance(answer, Exception):
                    raise _failed(self.url, answer) from answer
                return answer, waits.count
            log.info("%s: %s; asking again in %.1f s", self.url, _why(answer), wait)
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Client:
    """:class:`AsyncClient` for code without asyncio: the same arguments, rules and results,
    its calls waited for. It runs an :class:`AsyncClient` on an event loop of its own, in a
    thread, so it is thread-safe (calls from many threads share its connections) and a call or
    ``segment_many`` interrupted by Ctrl-C cancels its requests at once.

    Close it, or use it in a ``with`` block.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        _Requests(url, api_key)  # a bad URL is refused here, in the caller's thread
        self._loop = LoopThread("u2serve-client")

        async def made() -> AsyncClient:
            return AsyncClient(url, api_key, timeout_s=timeout_s, retry_s=retry_s)

        self._async = self._loop.run(made())
        self._closed = False
        self.url = self._async.url
        self.retry_s = retry_s

    def segment(self, image_or_url: ImageInput, **options: object) -> Result:
        """The answer for an image (bytes, a path, a PIL image or a numpy array: sent as the
        bytes :mod:`u2serve.images` says), or for an ``http(s)://`` URL the service fetches.
        ``options``: the parameters of ``POST /segment`` (``output``, ``threshold``, ``format``,
        ``crop``, ``bg_color``, …) and ``model``, validated by the service."""
        return self._loop.run(self._async.segment(image_or_url, **options))

    def again(self, result_or_id: Result | str, **options: object) -> Result:
        """Another answer for the photo of an earlier one (its :class:`Result`, or its image
        id), from the upload the service kept: nothing is sent again. The model is the earlier
        answer's, unless ``model`` names another. :class:`ImageNotFound` when the service no
        longer has it: send the image again with :meth:`segment`."""
        return self._loop.run(self._async.again(result_or_id, **options))

    def segment_many(
        self, images: Iterable[ImageInput], *, concurrency: int | None = None, **options: object
    ) -> Generator[Outcome, None, None]:
        """Every image's :class:`Outcome`, **as each completes, not in the order given**
        (``Outcome.index`` is its position there). ``concurrency`` requests are kept in flight
        (None: twice the model's batch size as ``/readyz`` gives it, at least 4, so that one
        batch fills while the last one runs). ``images`` is read as requests go out, so it may
        be a generator of any length. A failed image is an outcome with its error, not an
        exception. Leaving the loop early (``break``, Ctrl-C) cancels the requests in flight."""
        outcomes = self._async.segment_many(images, concurrency=concurrency, **options)
        try:
            while True:
                try:
                    outcome = self._loop.run(anext(outcomes))
                except StopAsyncIteration:
                    return
                yield outcome
        finally:
            self._loop.run(outcomes.aclose())

    def info(self) -> dict[str, Any]:
        """What the service serves (``GET /readyz``): its models, engine, device, batch size;
        waits while it is starting, as a call does after a 503."""
        return self._loop.run(self._async.info())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._async.aclose())
        finally:
            self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
