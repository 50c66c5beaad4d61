"""A container engine for the container tests: a running Docker engine, else rootful podman.

Podman here is configured as docs/deployment.md and the project's CI need it on hosts without a
Docker daemon: runc, cgroupfs, explicit nofile/nproc ulimits, and all storage, network configs
and runtime state in one temporary folder. What podman's CNI plugins leave on the host (bridges,
iptables chains, IPAM files) is recorded before and removed after, so a run leaves the host as it
found it.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The compose CLI of podman comes from the `dev` extra, in the same environment as pytest.
VENV_BIN = Path(sys.executable).parent


class EngineUnavailable(Exception):
    """No container engine can run here; the message says why (the tests skip with it)."""


def _which(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.exists() else shutil.which(name)


@dataclass
class Engine:
    """One container engine: its CLI, its compose CLI, and the environment both run in."""

    name: str  # "docker" or "podman"
    cli: list[str]
    compose_cli: list[str] | None
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None  # podman's private state, removed by close()
    host_state: HostNetworkState | None = None
    lock: HostLock | None = None

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        return run([*self.cli, *args], env=self.env, check=check, timeout=timeout, **kwargs)

    def compose(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        assert self.compose_cli is not None
        return run([*self.compose_cli, *args], env={**self.env, **(env or {})}, check=check, timeout=timeout)

    def close(self) -> None:
        """Remove podman's private state and what its network plugins left on the host."""
        if self.name != "podman" or self.workdir is None:
            return
        self("rm", "--all", "--force", "--volumes", "--time", "0", check=False, timeout=120)
        self("rmi", "--all", "--force", check=False, timeout=120)
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.host_state is not None:
            self.host_state.restore()
        self.workdir = None

    def release(self) -> None:
        """Let the next run on this host start (after close() and any check of the host state)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def run(
    cmd: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; on failure the error shows the command and its output."""
    result = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"`{shlex.join(cmd)}` exited with {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n"
            f"--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def find_engine() -> Engine:
    """A usable engine, or EngineUnavailable saying why neither Docker nor podman can run here.

    KOS_TEST_ENGINE=docker or =podman insists on one.
    """
    wanted = os.environ.get("KOS_TEST_ENGINE", "")
    reasons = []
    if wanted in ("", "docker"):
        try:
            return _docker()
        except EngineUnavailable as exc:
            reasons.append(str(exc))
    if wanted in ("", "podman"):
        try:
            return _podman()
        except EngineUnavailable as exc:
            reasons.append(str(exc))
    raise EngineUnavailable("; ".join(reasons) or f"KOS_TEST_ENGINE={wanted!r} is neither docker nor podman")


def _docker() -> Engine:
    docker = shutil.which("docker")
    if docker is None:
        raise EngineUnavailable("docker: not installed")
    info = run([docker, "info", "--format", "{{.ServerVersion}}"], check=False, timeout=60)
    if info.returncode != 0:
        raise EngineUnavailable(
            f"docker: no engine answers ({info.stderr.strip().splitlines()[-1] if info.stderr.strip() else 'docker info failed'})"
        )
    compose = None
    if run([docker, "compose", "version"], check=False, timeout=60).returncode == 0:
        compose = [docker, "compose"]
    elif shutil.which("docker-compose"):
        compose = [shutil.which("docker-compose")]  # type: ignore[list-item]
    return Engine("docker", [docker], compose, env={"DOCKER_BUILDKIT": "1"})


def _podman() -> Engine:
    podman = shutil.which("podman")
    if podman is None:
        raise EngineUnavailable("podman: not installed (scripts/install-container-tools.sh installs it)")
    if os.geteuid() != 0:
        raise EngineUnavailable("podman: the tests use rootful podman and are not running as root")
    if shutil.which("runc") is None:
        raise EngineUnavailable("podman: runc is not installed (scripts/install-container-tools.sh installs it)")
    compose = _which("podman-compose")
    if compose is None:
        raise EngineUnavailable("podman: podman-compose is not installed (it is in the `dev` extra)")
    # Podman's CNI state (bridge, iptables chains) is host-wide: runs on one host take turns, so
    # that one run's clean-up never removes what another run's containers still use.
    lock = HostLock.acquire(timeout=float(os.environ.get("KOS_TEST_LOCK_TIMEOUT", "1800")))
    host_state = HostNetworkState.capture()
    workdir = Path(tempfile.mkdtemp(prefix="kos-podman-"))
    (workdir / "net.d").mkdir()
    (workdir / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{workdir}/run"\ngraphroot = "{workdir}/root"\n'
    )
    # The host lacks CAP_SYS_RESOURCE (explicit ulimits), crun refuses its hybrid cgroup layout
    # (runc), there is no systemd (cgroupfs, file events). Network configs and runtime state stay
    # in the work folder.
    (workdir / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[network]\n"
        f'network_config_dir = "{workdir}/net.d"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{workdir}/tmp"\n'
    )
    env = {
        "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
        "CONTAINERS_CONF": str(workdir / "containers.conf"),
        # Docker's image format, which keeps HEALTHCHECK (OCI's has none), for podman-compose's builds too.
        "BUILDAH_FORMAT": "docker",
    }
    engine = Engine("podman", [podman], [compose], env=env, workdir=workdir, host_state=host_state, lock=lock)
    info = engine("info", "--format", "{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}", check=False, timeout=120)
    if info.returncode != 0:
        engine.close()
        engine.release()
        raise EngineUnavailable(f"podman: cannot start here ({info.stderr.strip()[-500:]})")
    return engine


class HostLock:
    """An exclusive lock for the whole host (flock on a file in /run/lock), held by one test run at a time."""

    PATH = Path("/run/lock" if Path("/run/lock").is_dir() else tempfile.gettempdir()) / "keras-onnx-serve-containers.lock"

    def __init__(self, handle):
        self._handle = handle

    @classmethod
    def acquire(cls, timeout: float) -> HostLock:
        handle = open(cls.PATH, "a")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(handle)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise EngineUnavailable(
                        f"podman: another container test run on this host held {cls.PATH} for {timeout:.0f}s"
                    ) from None
                time.sleep(1)

    def release(self) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def unmount_under(folder: Path) -> None:
    """Unmount whatever is still mounted inside a folder (podman's overlay layers, debootstrap's /proc), deepest first."""
    try:
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return
    prefix = str(folder) + "/"
    for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


# Where CNI plugins keep host-wide state outside podman's own folders.
_DNSNAME = Path("/run/containers/cni/dnsname")  # the dnsname plugin: one dnsmasq per network
_CNI_STATE_DIRS = [Path("/var/lib/cni/networks"), Path("/var/lib/cni/results"), _DNSNAME]
_CNI_STATE_ROOTS = [Path("/var/lib/cni"), Path("/run/containers"), Path("/var/lib/containers")]


@dataclass
class HostNetworkState:
    """What rootful podman's CNI networking changes on the host, to put back afterwards."""

    links: set[str]
    iptables: dict[tuple[str, str], list[str]]  # (binary, table) -> `-S` lines
    entries: set[Path]
    roots: set[Path]
    ip_forward: str | None
    dnsmasq: set[int]

    @classmethod
    def capture(cls) -> HostNetworkState:
        return cls(
            links=_links(),
            iptables=_iptables_rules(),
            entries={entry for d in _CNI_STATE_DIRS if d.is_dir() for entry in d.iterdir()},
            roots={r for r in _CNI_STATE_ROOTS if r.exists()},
            ip_forward=_read(Path("/proc/sys/net/ipv4/ip_forward")),
            dnsmasq=set(_dnsmasq_processes()),
        )

    def restore(self) -> None:
        """Remove the bridges, CNI iptables rules and chains, and CNI state files created since capture()."""
        for link in sorted(_links() - self.links):
            if link.startswith(("cni-podman", "podman")):
                subprocess.run(["ip", "link", "delete", link], capture_output=True)
        for (binary, table), lines in _iptables_rules().items():
            before = set(self.iptables.get((binary, table), []))
            new_chains = [rule.split()[1] for rule in lines if rule.startswith("-N ") and rule not in before and _is_cni(rule)]
            for line in reversed(lines):
                if line.startswith("-A ") and line not in before and _is_cni(line) and line.split()[1] not in new_chains:
                    subprocess.run([binary, "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True)
            for chain in new_chains:
                subprocess.run([binary, "-t", table, "-F", chain], capture_output=True)
            for chain in new_chains:
                subprocess.run([binary, "-t", table, "-X", chain], capture_output=True)
        # The dnsname plugin's dnsmasq of a network whose teardown did not stop it holds the bridge address.
        stray = set(_dnsmasq_processes()) - self.dnsmasq
        for pid in stray:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while stray & set(_dnsmasq_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for d in _CNI_STATE_DIRS:
            if d.is_dir():
                for entry in set(d.iterdir()) - self.entries:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for root in _CNI_STATE_ROOTS:
            if root.exists() and root not in self.roots:
                shutil.rmtree(root, ignore_errors=True)
        if self.ip_forward is not None and _read(Path("/proc/sys/net/ipv4/ip_forward")) != self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)

    def leftovers(self) -> list[str]:
        """What is still there that was not before capture(): empty after a clean restore()."""
        now = HostNetworkState.capture()
        found = [f"link {link}" for link in sorted(now.links - self.links) if link.startswith(("cni-podman", "podman", "veth"))]
        for key, lines in now.iptables.items():
            found += [
                f"{key[0]} -t {key[1]} {rule}" for rule in lines if _is_cni(rule) and rule not in set(self.iptables.get(key, []))
            ]
        found += [str(e) for e in sorted(now.entries - self.entries)]
        found += [f"process {p}" for p in _dnsmasq_processes() if p not in self.dnsmasq]
        return found


def _dnsmasq_processes() -> dict[int, str]:
    """The dnsmasq processes the dnsname plugin started, by pid."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith("dnsmasq") and any(a.startswith(f"--conf-file={_DNSNAME}/") for a in cmdline):
            found[int(proc.name)] = " ".join(cmdline).strip()
    return found


def _is_cni(rule: str) -> bool:
    """A rule or chain of CNI's plugins: their chains are CNI-*, dnsname opens DNS on cni-podman* bridges."""
    return "CNI-" in rule or "cni-podman" in rule


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _links() -> set[str]:
    result = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    return {line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines() if ":" in line}


def _iptables_rules() -> dict[tuple[str, str], list[str]]:
    rules = {}
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary) is None:
            continue
        for table in ("filter", "nat"):
            result = subprocess.run([binary, "-t", table, "-S"], capture_output=True, text=True)
            if result.returncode == 0:
                rules[(binary, table)] = result.stdout.splitlines()
    return rules


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll until predicate() returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet: refused, reset, 503
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s (last error: {last_error!r})")
