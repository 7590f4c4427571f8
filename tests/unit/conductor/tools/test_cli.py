"""``fleetctl`` without a fleet: parsing (global options anywhere, validation), output formats
and columns, the error lines, and what starting it imports."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conductor.tools.fleetctl import build_parser
from conductor.tools.fleetctl._base import Exit, UsageError
from conductor.tools.fleetctl._errors import describe
from conductor.tools.fleetctl._output import emit
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.messaging import MessagingTimeout

ROOT = Path(__file__).resolve().parents[4]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(list(argv)).parse_args(list(argv))


def test_global_options_before_or_after_the_verb() -> None:
    before = parse("-f", "json", "--timeout", "5", "-c", "uuid", "list")
    after = parse("list", "-f", "json", "--timeout", "5", "-c", "uuid")
    for args in (before, after):
        assert (args.format, args.timeout, args.column) == ("json", 5.0, ["uuid"])
    # Not given after the verb: the value given before it stays.
    assert parse("--format", "yaml", "flavor", "list").format == "yaml"
    assert parse("flavor", "list").format == "table"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("flavor", "create", "x", "--vcpus", "abc", "--ram", "1", "--disk", "1"), "'abc'"),
        (("flavor", "create", "x", "--vcpus", "0", "--ram", "1", "--disk", "1"), "at least 1"),
        (("flavor", "create", "", "--vcpus", "1", "--ram", "1", "--disk", "1"), "empty"),
        (("boot", "--flavor", "f", "--name", "n", "--count", "0"), "--count"),
        (("--timeout", "-1", "list"), "--timeout"),
        (("live-migration", "abort", "x"), "not a valid UUID"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: tuple[str, ...], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    assert raised.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and words in err, err
    assert "positive_int" not in err


def _emit(rows: object, columns: tuple[str, ...], *argv: str) -> str:
    args = argparse.Namespace(format="table", column=None)
    for i in range(0, len(argv), 2):
        if argv[i] == "-c":
            args.column = [*(args.column or []), argv[i + 1]]
        else:
            args.format = argv[i + 1]
    out = io.StringIO()
    emit(args, rows, columns, stream=out)  # type: ignore[arg-type]
    return out.getvalue()


ROWS = [{"uuid": "u1", "name": "a", "host": None}, {"uuid": "u2", "name": "b", "host": "h"}]


def test_formats_and_columns() -> None:
    assert _emit(ROWS, ("uuid", "name"), "-f", "value") == "u1 a\nu2 b\n"
    assert _emit(ROWS, ("uuid", "name"), "-f", "value", "-c", "name") == "a\nb\n"
    assert json.loads(_emit(ROWS, ("uuid",), "-f", "json")) == ROWS  # every key
    assert yaml.safe_load(_emit(ROWS, ("uuid",), "-f", "yaml", "-c", "host")) == [
        {"host": None},
        {"host": "h"},
    ]
    table = _emit(ROWS, ("uuid", "name"))
    assert "| uuid | name |" in table and "host" not in table
    record = _emit({"uuid": "u1", "name": "a"}, (), "-f", "value", "-c", "name")
    assert record == "a\n"
    assert "| Field | Value |" in _emit({"uuid": "u1"}, ())
    with pytest.raises(UsageError, match="columns: uuid, name, host"):
        _emit(ROWS, ("uuid", "name"), "-c", "nope")


def test_no_conductor_line_names_topic_exchange_and_timeout() -> None:
    cfg = FleetConfig()
    args = argparse.Namespace(timeout=2.0, group="list")
    code, line = describe(
        MessagingTimeout("Timed out ... 'object_class_action_versions'"), args, cfg
    )
    assert code == Exit.NO_CONDUCTOR
    assert line.startswith("no conductor answered on topic 'conductor' (exchange 'fleet')")
    assert "within 2s — is a conductor running?" in line
    assert "object_class_action_versions" not in line


def test_help_and_usage_errors_load_no_runtime_objects_or_database() -> None:
    probe = (
        "import sys\n"
        "from conductor.tools.fleetctl import main\n"
        "for argv in (['--help'], ['flavor', 'create', '']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('aio_pika', 'oslo_versionedobjects', 'oslo_messaging', 'sqlalchemy', "
        "'shared_objects.runtime.messaging', 'shared_objects.objects')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_deferred_imports_load_on_first_use_and_behave_as_the_real_modules() -> None:
    probe = (
        "import sys\n"
        "from conductor.tools.fleetctl._startup import defer_imports, skip_oslo_messaging\n"
        "skip_oslo_messaging()\n"
        "defer_imports()\n"
        "import shared_objects.objects.instance\n"
        "import oslo_config.types\n"
        "from oslo_versionedobjects import fields\n"
        "print(sorted(n for n in ('rfc3986.misc', 'stevedore.extension') if n in sys.modules))\n"
        "assert fields.FlexibleBooleanField().coerce(None, 'x', 'yes') is True\n"
        "assert 'sekrit' not in fields.SensitiveStringField().stringify(\"password='sekrit'\")\n"
        "assert oslo_config.types.URI()('https://example.org/x') == 'https://example.org/x'\n"
        "from oslo_utils import timeutils\n"
        "print(sorted(n for n in ('zoneinfo._common',) if n in sys.modules))\n"
        "assert timeutils.parse_isotime('2026-01-02T03:04:05Z').tzinfo is not None\n"
        "assert str(timeutils.normalize_time(timeutils.parse_isotime('2026-01-02T03:04:05+01:00')))"
        " == '2026-01-02 02:04:05'\n"
        "import zoneinfo\n"
        "assert zoneinfo.ZoneInfo('UTC').key == 'UTC'\n"
        "import rfc3986\n"
        "used = ('rfc3986', 'oslo_utils.strutils')\n"
        "print(['stand-in' in (sys.modules[n].__doc__ or '') for n in used],"
        " rfc3986.uri_reference('a:b').scheme)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # Nothing of them loaded by the imports alone; the real modules once used.
    assert done.stdout.splitlines() == ["[]", "[]", "[False, False] a"], done.stdout


def test_argparse_messages_are_looked_up_once_with_the_same_answer() -> None:
    probe = (
        "import argparse, gettext\n"
        "from conductor.tools.fleetctl._startup import cache_argparse_messages\n"
        "before = argparse._('usage: '), argparse._('show this help message and exit')\n"
        "cache_argparse_messages()\n"
        "after = argparse._('usage: '), argparse._('show this help message and exit')\n"
        "print(before == after, argparse._ is not gettext.gettext)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"], done.stdout


def test_start_up_pauses_the_collector_and_the_session_resumes_it_frozen() -> None:
    probe = (
        "import gc\n"
        "from conductor.tools.fleetctl._startup import pause_gc, resume_gc\n"
        "pause_gc()\n"
        "paused = gc.isenabled()\n"
        "resume_gc()\n"
        "print(paused, gc.isenabled(), gc.get_freeze_count() > 0)\n"
        "gc.disable()\n"
        "resume_gc()\n"  # not paused by pause_gc: left as the caller set it
        "print(gc.isenabled())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False True True", "False"], done.stdout
