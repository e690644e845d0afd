"""The worker's logs: one JSON object per line on stderr, quiet unless LOG_LEVEL asks for more.

Each line holds "ts", "level", "logger", "msg", the record's `extra` fields (job id, queue, reason, ...)
and "exc" with the traceback when there is one, so a log collector can filter on fields instead of
parsing sentences. RQ's and transformers' loggers go through the same handler; progress bars are off.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

import transformers

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(
            {key: value for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES}
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Send every logger of the process to stderr as JSON lines, at `level` (a name like "WARNING")."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"LOG_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # transformers logs through a handler of its own and draws progress bars while loading weights.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(max(numeric, logging.WARNING))
