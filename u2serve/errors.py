"""What u2serve raises instead of an answer: the service's own refusals, each carrying its HTTP
status, its stable code and its message, whether the service gave them over HTTP
(:class:`~u2serve.Client`) or the same pipeline gave them in this process
(:class:`~u2serve.Remover`).

Every code the service documents (README, "Errors") arrives as a :class:`U2ServeError`; the
ones a program handles differently have a class of their own.
"""

from __future__ import annotations

__all__ = [
    "ConnectionFailed",
    "ImageNotFound",
    "ImageTooLarge",
    "InvalidParameter",
    "Overloaded",
    "U2ServeError",
    "Unauthorized",
    "UnsupportedImage",
    "error_for",
]


class U2ServeError(Exception):
    """The service's refusal: ``status`` (its HTTP status; None where no answer came), ``code``
    (stable, for programs), ``message`` (for people), and ``request_id`` (its ``X-Request-ID``,
    to find it in the service's log)."""

    status: int | None = None
    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidParameter(U2ServeError):
    """422: an option out of range, unknown, or with others it does not go with; never retried."""

    status, code = 422, "invalid_parameter"


class ImageNotFound(U2ServeError):
    """404: the service no longer has the image behind this id (expired, evicted, unknown, or
    another API key's): send the image again."""

    status, code = 404, "image_not_found"


class ImageTooLarge(U2ServeError):
    """413: too many bytes or pixels."""

    status, code = 413, "image_too_large"


class UnsupportedImage(U2ServeError):
    """415: not a decodable image in a supported format."""

    status, code = 415, "unsupported_image"


class Unauthorized(U2ServeError):
    """401: the service wants an API key, and this one is missing or wrong."""

    status, code = 401, "unauthorized"


class Overloaded(U2ServeError):
    """503 (``overloaded``, ``not_ready``, ``draining``), still given once the client's retry
    time was spent; ``retry_after``: the seconds the service last asked to wait."""

    status, code = 503, "overloaded"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status, request_id=request_id)
        self.retry_after = retry_after


class ConnectionFailed(U2ServeError):
    """No answer came: the service could not be reached, closed the connection, or took longer
    than the client's timeout."""

    code = "connection_failed"


_BY_CODE: dict[str, type[U2ServeError]] = {
    cls.code: cls
    for cls in (InvalidParameter, ImageNotFound, ImageTooLarge, UnsupportedImage, Unauthorized)
}


def error_for(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> U2ServeError:
    """The typed error for the service's ``{"error": {"code", "message"}}`` with ``status``."""
    if status == 503:
        return Overloaded(
            message, code=code, status=status, request_id=request_id, retry_after=retry_after
        )
    cls = _BY_CODE.get(code, U2ServeError)
    return cls(message, code=code, status=status, request_id=request_id)
