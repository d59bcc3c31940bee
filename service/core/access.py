"""One access-log line per image request (``/segment``, and the compatible APIs of
:mod:`service.http.compat`), as ``key=value`` text or as a JSON object.

Health and metrics probes are not logged: they would drown the requests an operator looks for.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AccessRecord", "JsonFormatter", "access_log"]

access_log = logging.getLogger("u2serve.access")


@dataclass
class AccessRecord:
    """What one request did, filled in as it goes through the stages."""

    request_id: str
    client: str = "-"
    api: str = "segment"  # the API the request spoke: segment, removebg or rembg
    output: str = "-"
    model: str = "-"
    source: str = "-"  # upload, url or image_id
    size: tuple[int, int] | None = None
    bytes_in: int = 0
    stages_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None
    cache: str = "-"  # the map cache: hit or miss

    def fields(self, status: int, code: str | None, bytes_out: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "client": self.client,
            "api": self.api,
            "status": status,
            "error": code,
            "output": self.output,
            "model": self.model,
            "source": self.source,
            "width": self.size[0] if self.size else None,
            "height": self.size[1] if self.size else None,
            "bytes_in": self.bytes_in,
            "bytes_out": bytes_out,
            "cache": self.cache,
        }
        out.update({f"{stage}_ms": round(ms, 1) for stage, ms in self.stages_ms.items()})
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        return out

    def emit(self, status: int, code: str | None, bytes_out: int) -> None:
        fields = self.fields(status, code, bytes_out)
        text = " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
        access_log.info("%s", text, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; an access line carries its fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
