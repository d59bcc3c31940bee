"""The service's errors: each carries the HTTP status and the stable code it is answered with
(:mod:`service.http.errors` writes the JSON body), so the core raises them without knowing HTTP."""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ClientGone",
    "Draining",
    "FetchFailed",
    "FetchTimeout",
    "ImageNotFound",
    "ImageTooLarge",
    "InvalidParameter",
    "InvalidUrl",
    "NotReady",
    "QueueFull",
    "RequestTimeout",
    "ServiceError",
    "TimedOut",
    "Unauthorized",
    "UnsupportedImage",
    "UnsupportedParameter",
    "UrlForbidden",
]


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class InvalidUrl(ServiceError):
    """The ``url`` parameter is not an http(s) URL the service can fetch."""

    status, code = 400, "invalid_url"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class UrlForbidden(ServiceError):
    """The URL, or a redirect, leads to an address the service may not reach."""

    status, code = 403, "url_forbidden"


class RequestTimeout(ServiceError):
    """The client did not send its request in time (a slow or stalled upload)."""

    status, code = 408, "request_timeout"


class ClientGone(ServiceError):
    """Nobody is listening for this answer any more (nginx's 499)."""

    status, code = 499, "client_closed_request"


class ImageNotFound(ServiceError):
    """An ``image_id`` that this service does not have (any more, or for this API key)."""

    status, code = 404, "image_not_found"


class ImageTooLarge(ServiceError):
    status, code = 413, "image_too_large"


class UnsupportedImage(ServiceError):
    status, code = 415, "unsupported_image"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class UnsupportedParameter(ServiceError):
    """A valid parameter of another API (service/http/compat/) that this service has no way to
    honour: refused, never ignored."""

    status, code = 400, "unsupported_parameter"


class QueueFull(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Draining(ServiceError):
    status, code = 503, "draining"


class FetchFailed(ServiceError):
    """The URL's server could not be reached, or answered something other than an image."""

    status, code = 502, "fetch_failed"


class TimedOut(ServiceError):
    status, code = 504, "timeout"


class FetchTimeout(ServiceError):
    status, code = 504, "fetch_timeout"
