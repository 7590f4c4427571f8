"""Logging setup: JSON lines vs console, contextvars, stdlib routing, idempotent configuration."""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared_objects.runtime.config import load_config
from shared_objects.runtime.log import (
    configure_logging,
    configure_service_logging,
    get_logger,
    resolve_format,
)


class TTYStream(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika", "asyncio")}
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in libraries.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_timestamp_level_logger_and_static_fields() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out, static={"service": "conductor", "host": "c1"})
    get_logger("conductor.tasks").info("instance built", instance="abc")
    [event] = lines(out)
    assert event["event"] == "instance built"
    assert event["instance"] == "abc"
    assert event["level"] == "info"
    assert event["logger"] == "conductor.tasks"
    assert (event["service"], event["host"]) == ("conductor", "c1")
    stamp = datetime.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    assert stamp.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60


def test_request_id_bound_in_contextvars_appears_in_every_line() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    structlog.contextvars.bind_contextvars(request_id="req-123")
    get_logger("a").info("first")
    logging.getLogger("aio_pika.x").warning("from a library %s", "using stdlib")
    structlog.contextvars.clear_contextvars()
    get_logger("a").info("after")
    first, library, after = lines(out)
    assert first["request_id"] == "req-123"
    assert library["request_id"] == "req-123"
    assert library["event"] == "from a library using stdlib"
    assert library["logger"] == "aio_pika.x"
    assert library["level"] == "warning"
    assert "request_id" not in after


def test_level_filters_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    get_logger("a").info("hidden")
    logging.getLogger("b").info("hidden too")
    get_logger("a").error("shown")
    assert [e["event"] for e in lines(out)] == ["shown"]


def test_exceptions_are_rendered_into_the_json_line() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("a").exception("failed")
    [event] = lines(out)
    assert "RuntimeError: boom" in str(event["exception"])


def test_console_format_is_readable_text_not_json() -> None:
    out = TTYStream()
    configure_logging("auto", "info", stream=out)
    structlog.contextvars.bind_contextvars(request_id="req-9")
    get_logger("x").info("hello world", key="v")
    text = out.getvalue()
    assert "hello world" in text
    assert "req-9" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_auto_format_picks_console_on_tty_and_json_elsewhere() -> None:
    assert resolve_format("auto", TTYStream()) == "console"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", TTYStream()) == "json"
    with pytest.raises(ValueError, match="unknown log format"):
        resolve_format("xml", io.StringIO())


def test_reconfiguring_replaces_the_handler_instead_of_duplicating() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging("json", "info", stream=second)
    get_logger("a").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_capture_logs_still_works_after_configuration() -> None:
    configure_logging("json", "info", stream=io.StringIO())
    log = get_logger("a")
    with structlog.testing.capture_logs() as captured:
        log.info("captured event", n=1)
    assert captured == [{"event": "captured event", "n": 1, "log_level": "info"}]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("json", "loud", stream=io.StringIO())


def test_service_logging_takes_format_level_and_host_from_config() -> None:
    out = TTYStream()  # a terminal, yet the config says json
    cfg = load_config({"FLEET_LOG_FORMAT": "json", "FLEET_LOG_LEVEL": "error", "FLEET_HOST": "h7"})
    configure_service_logging(cfg, "compute-agent", stream=out)
    get_logger("x").warning("filtered")
    get_logger("x").error("kept")
    [event] = lines(out)
    assert (event["event"], event["service"], event["host"]) == ("kept", "compute-agent", "h7")
