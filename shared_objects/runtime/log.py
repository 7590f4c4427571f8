"""Logging setup for Fleet processes: structlog in front, stdlib logging underneath.

One call at start-up, ``configure_logging(cfg.logging.format, cfg.logging.level, static=...)``,
makes every line, whether it comes from ``structlog`` or from a library using the stdlib
``logging`` module (aio-pika, SQLAlchemy, Alembic), go through the same processors and out of
one handler:

- JSON, one object per line, when the stream is not a terminal (systemd journal, docker logs,
  files) or when ``format="json"``; a readable coloured layout on a terminal or with
  ``format="console"``;
- an ISO-8601 UTC ``timestamp``, ``level``, ``logger`` (the module name), ``event``;
- everything bound with ``structlog.contextvars`` (the RPC server binds ``request_id`` while a
  handler runs, so every line written on behalf of a request carries it, across services);
- the ``static`` fields given here (``service``, ``host``) on every line, so logs of several
  processes can be merged and still told apart.

Tests capture structured events with ``structlog.testing.capture_logs``; loggers are not cached
on first use, so that helper keeps working after ``configure_logging`` was called.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

if TYPE_CHECKING:
    from shared_objects.runtime.config import FleetConfig

__all__ = ["configure_logging", "configure_service_logging", "get_logger", "resolve_format"]

_HANDLER_MARK = "_fleet_handler"
# Libraries whose DEBUG output is frame-by-frame noise; capped at INFO even when we debug.
_CHATTY = ("aiormq", "aio_pika", "asyncio", "sqlalchemy.engine.Engine")


def resolve_format(fmt: str, stream: IO[str]) -> str:
    """``"json"`` or ``"console"``: ``"auto"`` means console on a terminal, JSON elsewhere."""
    if fmt in ("json", "console"):
        return fmt
    if fmt != "auto":
        raise ValueError(f"unknown log format {fmt!r} (expected auto, json or console)")
    isatty = getattr(stream, "isatty", None)
    return "console" if callable(isatty) and isatty() else "json"


def _static_fields(fields: Mapping[str, Any]) -> Processor:
    """A processor adding ``fields`` to every event that does not set them itself."""
    frozen = dict(fields)

    def add(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        for key, value in frozen.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    *,
    stream: IO[str] | None = None,
    static: Mapping[str, Any] | None = None,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr) as JSON or console text.

    Safe to call again (tests, reloads): the previous Fleet handler is replaced, not duplicated.
    """
    out = sys.stderr if stream is None else stream
    rendering = resolve_format(fmt, out)
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _static_fields(static or {}),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if rendering == "json":
        final += [structlog.processors.format_exc_info, structlog.processors.UnicodeDecoder()]
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        colors = bool(getattr(out, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    final.append(renderer)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared], processors=final
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric_level, logging.INFO))
    # SQLAlchemy treats INFO on its engine logger as echo=True (every statement logged).
    logging.getLogger("sqlalchemy.engine").setLevel(max(numeric_level, logging.WARNING))
    logging.getLogger("sqlalchemy.engine.Engine").setLevel(max(numeric_level, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        # Not cached: structlog.testing.capture_logs must still work after configuration.
        cache_logger_on_first_use=False,
    )


def configure_service_logging(
    cfg: FleetConfig, service: str, *, stream: IO[str] | None = None
) -> None:
    """``configure_logging`` from ``cfg.logging``, tagging every line with service and host;
    also turns the trace of received object versions on or off (``trace_object_versions``)."""
    # Imported here: logging set-up stays usable by tools that never load the objects.
    from shared_objects.serializer import trace_object_versions

    configure_logging(
        cfg.logging.format,
        cfg.logging.level,
        stream=stream,
        static={"service": service, "host": cfg.host},
    )
    trace_object_versions(cfg.logging.trace_object_versions)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use ``__name__``), with ``initial`` values bound."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial)
    return logger
