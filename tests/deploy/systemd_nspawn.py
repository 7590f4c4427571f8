"""``make test-deploy``, systemd part (issue 17): the units of deploy/systemd/ under a real systemd.

Boots a debootstrapped Debian with systemd in ``systemd-nspawn`` (it shares the host's network,
so the machine's RabbitMQ and PostgreSQL on loopback serve it), installs Fleet there from wheels
built on this host, installs the units as docs/operations.md says, and checks what they promise
(``nspawn/check.sh``, run inside by the oneshot ``nspawn/fleet-deploy-check.service``): READY=1,
credentials, hardening, reload, the watchdog, a configuration error, a clean stop; half-way it
asks this driver to run ``fleetctl`` on the host (boots on both agents, a live migration).

Per run: a RabbitMQ vhost with its own logins, a PostgreSQL role and database, a temp directory;
all removed at the end, whatever happens. Cached between runs under ``$FLEET_DEPLOY_CACHE``
(default /var/tmp/fleet-deploy-cache): the Debian root (~1 min to make, ~350 MB), the
dependency wheels and the virtualenv inside the root (keyed by constraints.txt and
pyproject.toml). The root is booted with ``--volatile=overlay``: read-only, every change in a
tmpfs thrown away at the end, so a run never alters the cache.

Exit status: 0 all checks passed; 1 a check failed; 77 skipped (printed as ``SKIPPED: ...``)
where this machine cannot run it (not root, no way to install systemd-nspawn, no rabbitmqctl).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    CACHE,
    EXIT_SKIPPED,
    REPO,
    ROOT_PACKAGES,
    Skip,
    apt_install,
    ensure_rootfs,
    exit_on_signals,
    print_timings,
    run,
    say,
    timed,
)

HERE = Path(__file__).resolve().parent / "nspawn"
HOSTS = ("compute-1", "compute-2")
# The whole container run: boot, install, checks (the watchdog alone waits WatchdogSec=30).
BOOT_TIMEOUT = int(os.environ.get("FLEET_DEPLOY_TIMEOUT", "600"))


# --- what the machine needs -----------------------------------------------------------------------


def preflight() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        raise Skip("needs root on Linux (systemd-nspawn, debootstrap)")
    missing = [t for t in ("systemd-nspawn", "debootstrap") if shutil.which(t) is None]
    if missing:
        apt_install("systemd-container", "debootstrap")
    if shutil.which("rabbitmqctl") is None:
        raise Skip("no rabbitmqctl: the test needs the machine's RabbitMQ (make services)")


def copy_source(dest: Path) -> Path:
    """The files a wheel is built from, copied so that the build leaves nothing in the repo."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "constraints.txt", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for package in ("shared_objects", "conductor", "compute_agent"):
        shutil.copytree(
            REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return src


def dependency_key() -> str:
    digest = hashlib.sha256()
    for name in ("constraints.txt", "pyproject.toml"):
        digest.update((REPO / name).read_bytes())
    digest.update(ROOT_PACKAGES.encode())
    return digest.hexdigest()[:16]


def build_wheels(workdir: Path) -> tuple[Path, Path]:
    """(the dependency wheels, cached; this tree's own wheel, per run)."""
    src = copy_source(workdir)
    key = dependency_key()
    deps = CACHE / f"wheels-{key}"
    own = workdir / "wheels"
    own.mkdir()
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
    if not (deps / ".done").exists():
        say("building the dependency wheels (once per constraints.txt; cached)")
        shutil.rmtree(deps, ignore_errors=True)
        with timed("dependency wheels"):
            run(*pip, "-c", src / "constraints.txt", "-w", deps, f"{src}[speed]")
        for wheel in deps.glob("fleet-*.whl"):
            wheel.unlink()
        (deps / ".done").touch()
    with timed("project wheel"):
        run(*pip, "--no-deps", "-w", own, src)
    return deps, own


def ensure_venv(root: Path, deps: Path) -> None:
    """A virtualenv with every dependency at /opt/fleet-venv inside the cached root (pip there
    has no network: local wheels only). The project itself is installed per run, at boot."""
    key = dependency_key()
    stamp = root / "opt/fleet-venv/.deps"
    if stamp.exists() and stamp.read_text() == key:
        return
    say("installing the dependency wheels into /opt/fleet-venv in the root (cached)")
    shutil.rmtree(root / "opt/fleet-venv", ignore_errors=True)
    wheels = sorted(p.name for p in deps.glob("*.whl"))
    nspawn = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit"]
    with timed("venv in the root"):
        run(*nspawn, "/usr/bin/python3", "-m", "venv", "/opt/fleet-venv")
        run(
            *nspawn, f"--bind-ro={deps}:/wheels", "/opt/fleet-venv/bin/pip", "install", "-q",
            "--disable-pip-version-check", "--no-index", "--find-links=/wheels",
            *(f"/wheels/{w}" for w in wheels),
        )  # fmt: skip
    stamp.write_text(key)


# --- the deployment's own broker logins and database ----------------------------------------------


class Backends:
    """A vhost with one login per service and an operator, a role and a database, on the shared
    RabbitMQ and PostgreSQL; ``close`` deletes them (never the services themselves)."""

    def __init__(self, tag: str) -> None:
        from shared_objects.testing.broker_logins import BrokerLogins
        from shared_objects.testing.isolation import vhost_url

        self.tag = tag
        self.vhost = f"fleet-deploy-{tag}"
        self.db = f"fleet_deploy_{tag}"
        self.db_password = secrets.token_hex(12)
        self.logins = BrokerLogins(vhost_url(self.vhost), self.vhost, tag=tag)
        self.vhost_made = False
        self.db_made = False

    def _ctl(self, *argv: str) -> None:
        run("rabbitmqctl", "-q", *argv, stdout=subprocess.DEVNULL)

    async def open(self) -> None:
        import asyncpg

        from shared_objects.testing.isolation import PG_ADMIN_DSN

        self._ctl("add_vhost", self.vhost)
        self.vhost_made = True
        await self.logins.ensure(
            conductors=["1"], operators=[""], hosts=list(HOSTS), exchanges=["fleet"]
        )
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            self.db_made = True
            await admin.execute(f"CREATE ROLE \"{self.db}\" LOGIN PASSWORD '{self.db_password}'")
            await admin.execute(f'CREATE DATABASE "{self.db}" OWNER "{self.db}"')
        finally:
            await admin.close()

    async def close(self) -> None:
        import asyncpg

        from shared_objects.testing.isolation import PG_ADMIN_DSN

        with contextlib.suppress(Exception):
            await self.logins.delete()
        if self.vhost_made:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._ctl("delete_vhost", self.vhost)
        if self.db_made:
            admin = await asyncpg.connect(PG_ADMIN_DSN)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
                await admin.execute(f'DROP ROLE IF EXISTS "{self.db}"')
            finally:
                await admin.close()

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://{self.db}:{self.db_password}@127.0.0.1:5432/{self.db}"

    def url(self, login: str) -> str:
        return self.logins.url_for(login)

    def common_env(self) -> dict[str, str]:
        """Non-secret settings every process of this deployment shares."""
        return {"FLEET_CONTROL_EXCHANGE": "fleet", **self.logins.security_env()}


# --- the per-run files the container reads --------------------------------------------------------


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)


DROPINS = {
    # One machine plays the conductor host and two hypervisor hosts: each unit gets its own host
    # name, and the agents their own credential (the conductor keeps the documented paths).
    "fleet-conductor.service.d": "[Service]\nEnvironment=FLEET_HOST=conductor-1\n",
    "fleet-compute-agent.service.d": (
        "[Service]\nEnvironment=FLEET_HOST=compute-1\nLoadCredential=\n"
        "LoadCredential=transport_url:/etc/fleet/compute-1/transport_url\n"
    ),
    "fleet-compute-agent-2.service.d": (
        "[Unit]\nDescription=Fleet compute agent (second host on this machine)\n"
        "[Service]\nEnvironment=FLEET_HOST=compute-2\nLoadCredential=\n"
        "LoadCredential=transport_url:/etc/fleet/compute-2/transport_url\n"
        "StateDirectory=\nStateDirectory=fleet-compute-2\nWorkingDirectory=%S/fleet-compute-2\n"
    ),
}


def write_inputs(inp: Path, backends: Backends, own_wheels: Path) -> None:
    logins = backends.logins
    write_private(inp / "etc/conductor/transport_url", backends.url(logins.conductor_login("1")))
    write_private(inp / "etc/conductor/database_url", backends.database_url)
    for host in HOSTS:
        write_private(inp / f"etc/{host}/transport_url", backends.url(logins.host_login(host)))
    env = {**backends.common_env(), "FLEET_COMPUTE__SPAWN_DELAY": "0.3"}
    (inp / "etc/fleet.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for name, text in DROPINS.items():
        (inp / "dropins" / name).mkdir(parents=True)
        (inp / "dropins" / name / "50-deploy-test.conf").write_text(text)
    shutil.copytree(own_wheels, inp / "wheels")
    shutil.copy2(HERE / "check.sh", inp / "check.sh")


# --- fleetctl on the host -------------------------------------------------------------------------


def fleetctl_env(backends: Backends, *, database: bool = False) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLEET_") or k.startswith("FLEET_TEST")
    }
    env.update(backends.common_env())
    env["FLEET_TRANSPORT_URL"] = backends.url(backends.logins.operator_login())
    env["PYTHONPATH"] = str(REPO)
    if database:
        env["FLEET_DATABASE_URL"] = backends.database_url
    return env


def fleetctl(backends: Backends, *args: str, database: bool = False, show: bool = True) -> str:
    exe = Path(sys.executable).with_name("fleetctl")
    done = subprocess.run(
        [str(exe), *args],
        env=fleetctl_env(backends, database=database),
        capture_output=True,
        text=True,
        timeout=240,
    )
    if show:
        print(f"$ fleetctl {' '.join(args)}", flush=True)
        for line in (done.stdout + done.stderr).rstrip().splitlines():
            print(f"  {line}", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"fleetctl {' '.join(args)}: exit {done.returncode}")
    return done.stdout


def fleet_through_fleetctl(backends: Backends) -> bool:
    """Boots on both agents of the container, a live migration compute-1 -> compute-2."""
    try:
        fleetctl(backends, "flavor", "create", "deploy-small", "--vcpus", "1", "--ram", "256",
                 "--disk", "1")  # fmt: skip
        for name, host in (("deploy-a", "compute-1"), ("deploy-b", "compute-2")):
            fleetctl(backends, "boot", "--flavor", "deploy-small", "--name", name, "--host", host,
                     "--wait")  # fmt: skip
        fleetctl(backends, "live-migrate", "deploy-a", "--host", "compute-2", "--wait")
        fleetctl(backends, "list", "-c", "name", "-c", "host", "-c", "vm_state", "-c", "task_state")
        fleetctl(backends, "services")
        rows = fleetctl(backends, "list", "-f", "value", "-c", "name", "-c", "host", show=False)
        where = dict(line.split() for line in rows.splitlines() if line.strip())
        if where != {"deploy-a": "compute-2", "deploy-b": "compute-2"}:
            print(f"  unexpected placement after the migration: {where}", flush=True)
            return False
        return True
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"  {exc}", flush=True)
        return False


# --- the container --------------------------------------------------------------------------------


def boot(root: Path, run_dir: Path, backends: Backends) -> int:
    """Boot the container, relay the check's report, answer its fleetctl request; its status."""
    inp, out = run_dir / "in", run_dir / "out"
    out.mkdir()
    console = (run_dir / "console.log").open("w")
    argv = [
        "systemd-nspawn", "-D", str(root), "--volatile=overlay", "--boot", "--register=no",
        "--keep-unit", f"--machine=fleet-deploy-{backends.tag}",
        f"--bind-ro={REPO}:/opt/fleet-src", f"--bind-ro={inp}:/srv/fleet-test/in",
        f"--bind={out}:/srv/fleet-test/out",
        f"--bind-ro={HERE / 'fleet-deploy-check.service'}:"
        "/etc/systemd/system/fleet-deploy-check.service",
        "systemd.wants=fleet-deploy-check.service",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console)
    say(f"booting the container (systemd-nspawn PID {proc.pid}); checks follow")
    started = time.monotonic()
    printed = 0
    asked = False
    try:
        while True:
            report = out / "report"
            if report.exists():
                lines = report.read_text().splitlines()
                for line in lines[printed:]:
                    print(f"  {line}", flush=True)
                printed = len(lines)
            if not asked and (out / "fleetctl.request").exists():
                asked = True
                with timed("fleetctl (host)"):
                    ok = fleet_through_fleetctl(backends)
                tmp = out / "fleetctl.done.tmp"
                tmp.write_text("0" if ok else "1")
                tmp.rename(out / "fleetctl.done")
            if proc.poll() is not None:
                if report.exists():
                    for line in report.read_text().splitlines()[printed:]:
                        print(f"  {line}", flush=True)
                return proc.returncode
            if time.monotonic() - started > BOOT_TIMEOUT:
                say(f"the container did not finish within {BOOT_TIMEOUT} s")
                return 1
            time.sleep(0.5)
    finally:
        stop_container(proc)
        console.close()


def stop_container(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to systemd-nspawn (it powers the container off), SIGKILL if that hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    exit_on_signals()
    total = time.monotonic()
    try:
        preflight()
    except Skip as exc:
        print(f"SKIPPED: test-deploy (systemd): {exc}", flush=True)
        return EXIT_SKIPPED
    sys.path.insert(0, str(REPO))
    tag = "dt" + secrets.token_hex(4)
    run_dir = Path(tempfile.mkdtemp(prefix="fleet-deploy-"))
    backends = Backends(tag)
    status = 1
    try:
        with timed("prepare (root, wheels, venv)"):
            root = ensure_rootfs()
            deps, own = build_wheels(run_dir)
            ensure_venv(root, deps)
        asyncio.run(backends.open())
        say(f"vhost {backends.vhost} with logins {', '.join(sorted(backends.logins.logins))}; "
            f"database {backends.db}")  # fmt: skip
        fleetctl(backends, "db", "upgrade", database=True)
        write_inputs(run_dir / "in", backends, own)
        with timed("container (boot, checks, stop)"):
            status = boot(root, run_dir, backends)
        if status != 0:
            for name in ("journal.txt", "install.log"):
                path = run_dir / "out" / name
                if path.exists():
                    say(f"{name} (from the container):")
                    print(path.read_text()[-20000:], flush=True)
            say("console (last lines):")
            print("\n".join((run_dir / "console.log").read_text().splitlines()[-40:]), flush=True)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(backends.close())
        shutil.rmtree(run_dir, ignore_errors=True)
        print_timings("systemd", total)
    print(f"test-deploy (systemd): {'PASSED' if status == 0 else 'FAILED'}", flush=True)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
