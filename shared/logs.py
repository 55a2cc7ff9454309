"""JSON logs on stderr, one object a line, with secrets scrubbed before they are written."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# Cashu tokens, sk- keys, nsec keys and bearer values must never reach a log line.
_SECRET = re.compile(r"(cashu[AB][A-Za-z0-9_\-+/=]{8,}|sk-[0-9a-fA-F]{16,}|nsec1[0-9a-z]{20,}|Bearer\s+\S+)")


def scrub(text: str) -> str:
    return _SECRET.sub(lambda m: m.group(0)[:6] + "…[redacted]", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key in ("request_id", "event"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO") -> None:
    """Route the root logger (and aiohttp's) to one JSON handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
