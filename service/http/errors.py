"""The service's errors as HTTP answers: every client-visible error has the same JSON body,
``{"error": {"code": "...", "message": "..."}}``, with the status and headers it carries."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service.errors import ServiceError

__all__ = ["error_response", "response_of"]


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def response_of(exc: ServiceError) -> JSONResponse:
    """``exc`` answered in ``/segment``'s shape."""
    return error_response(exc.status, exc.code, exc.message, exc.headers)
