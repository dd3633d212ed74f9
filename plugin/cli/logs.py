"""Log output of the `gpushare` commands: `--log-format text` (default) or `json`.

JSON logs are one object per line: `time` (RFC 3339, UTC, milliseconds), `level`, `logger`,
`message`, then the structured fields a line carries where they apply (`resource`, `device`,
`gpu`, `xid`, `affected`), and `exception` with the traceback when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
FIELDS = ("resource", "device", "gpu", "xid", "affected")  # passed as `extra=` by log calls
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO lines say nothing about a device ("1 change detected" for every file
# event in a watched directory, "Scheduler started"): shown only with --log-level DEBUG.
CHATTY_LIBRARIES = ("watchfiles", "apscheduler")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object."""
        stamp = datetime.fromtimestamp(record.created, tz=timezone.utc)
        out: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Send log records at `level` or above to stderr in `log_format` (text or json).

    Like logging.basicConfig, this does nothing when the root logger has handlers already
    (an embedding program, or pytest, decides then). The CHATTY_LIBRARIES log warnings and
    errors only, unless `level` is DEBUG.
    """
    handler = logging.StreamHandler(sys.stderr)
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def describe_os_error(err: OSError) -> str:
    """An OS error as a user reads it: `PATH: Permission denied`, not `[Errno 13] ...: 'PATH'`."""
    if err.strerror is None:
        return str(err)  # one of ours: its message says what and where
    if err.filename is None:
        return err.strerror
    if err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {err.strerror}"
    return f"{err.filename}: {err.strerror}"
