"""Debian's real systemd as PID 1 of private namespaces, so tests can drive shipped unit files.

The machine's own PID 1 is not systemd, and a test must not touch the host anyway, so each
``RealSystemd`` boots ``/lib/systemd/systemd`` as PID 1 of new PID, mount, cgroup, IPC and UTS
namespaces. The network namespace is shared on purpose: the test's simulated FreeSWITCH reaches
the units' sockets on 127.0.0.1 directly.

Inside, before systemd starts (``INIT``): the host's ``/``, ``/sys`` and ``/proc/sys`` are
read-only (nothing systemd, journald or a service does can write to the host); ``/run``,
``/tmp``, ``/dev`` and ``/var/log/journal`` are private tmpfs; ``/sys/fs/cgroup`` is a cgroup2
mount whose root is a cgroup made for this run. ``SYSTEMD_UNIT_PATH`` points at one directory,
so this systemd sees only the units the test staged there plus empty stand-ins for the targets
every unit depends on (``sysinit.target`` and the like) and journald: none of the distribution's
services starts. Every mount lives in the private mount namespace, so killing PID 1 (which takes
every process of its PID namespace with it) leaves nothing behind but the run's cgroup
directories, which ``close()`` removes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path


from tests.gateway_process import run_command, wait_until

SYSTEMD = "/lib/systemd/systemd"
PR_SET_PDEATHSIG = 1
HOST_UNITS = Path("/lib/systemd/system")
STAGE_IN_NAMESPACE = "/run/esl-gateway-test"   # the staged directory, as the namespace sees it
DEFAULT_TARGET = "esl-gateway-test.target"
# Units every service and socket depends on by default (DefaultDependencies=yes): empty here.
EMPTY_TARGETS = ("sysinit", "basic", "sockets", "multi-user", "network", "shutdown")
JOURNALD_UNITS = ("systemd-journald.service", "systemd-journald.socket",
                  "systemd-journald-dev-log.socket")

# In a private mount namespace: a cgroup of our own (so a run never collides with another, and
# its leftovers are found), then the namespaces whose PID 1 runs INIT.
LAUNCH = r"""
set -e
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir "/sys/fs/cgroup/$ESL_TEST_CGROUP"
echo $$ > "/sys/fs/cgroup/$ESL_TEST_CGROUP/cgroup.procs"
umount /sys/fs/cgroup
exec unshare --pid --fork --kill-child --cgroup --ipc --uts --mount --mount-proc \
    sh -c "$ESL_TEST_INIT"
"""

# PID 1 of the new namespaces, before it becomes systemd.
INIT = r"""
set -e
mount -o remount,bind,ro /
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -t tmpfs -o mode=755 tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=755 tmpfs /var/log/journal; fi
mount -t tmpfs -o mode=755 tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty c 5 0
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=666 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
cp -r "$ESL_TEST_STAGE" "$ESL_TEST_STAGE_IN_NAMESPACE"
for path in $ESL_TEST_KEEP; do
  mkdir -p "/run/esl-gateway-test-keep$path"
  mount --rbind "$path" "/run/esl-gateway-test-keep$path"
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
for path in $ESL_TEST_KEEP; do
  mkdir -p "$path"
  mount --move "/run/esl-gateway-test-keep$path" "$path"
done
export container=esl-gateway-test SYSTEMD_UNIT_PATH="$ESL_TEST_STAGE_IN_NAMESPACE/units"
exec "$ESL_TEST_SYSTEMD" --unit="$ESL_TEST_TARGET"
"""

REMOVE_CGROUP = r"""
set -e
mount -t cgroup2 cgroup2 /sys/fs/cgroup
[ -d "/sys/fs/cgroup/$ESL_TEST_CGROUP" ] || exit 0
find "/sys/fs/cgroup/$ESL_TEST_CGROUP" -depth -type d -exec rmdir {} +
"""


class SystemdUnavailable(Exception):
    """Real systemd cannot run here; the message says why."""


def why_systemd_cannot_run() -> str | None:
    """The reason real systemd cannot be booted on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (new namespaces, mounts and a cgroup2 hierarchy)"
    for tool in ("unshare", "nsenter", "mount", "mknod"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is missing (apt-get install systemd)"
    if "cgroup2" not in Path("/proc/filesystems").read_text():
        return "the kernel has no cgroup2"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--cgroup", "--mount-proc",
                            "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create PID/mount/cgroup namespaces: {probe.stderr.strip()}"
    return None


def stage_base_units(units: Path) -> None:
    """What any test's systemd needs: a default target that starts journald only, the empty
    targets units depend on, and journald (so `journalctl -u` shows a service's log)."""
    units.mkdir(parents=True, exist_ok=True)
    for name in EMPTY_TARGETS:
        (units / f"{name}.target").write_text(
            f"[Unit]\nDescription={name} (empty: this systemd runs only the test's units)\n")
    (units / DEFAULT_TARGET).write_text(
        "[Unit]\nDescription=esl-gateway test: journald and nothing else\n"
        "Wants=systemd-journald.service\n")
    for name in JOURNALD_UNITS:
        (units / name).symlink_to(HOST_UNITS / name)


class RealSystemd:
    """One booted systemd. ``stage`` is a directory with ``units/`` (see ``stage_base_units``)
    and whatever else the units refer to; the namespace sees it at STAGE_IN_NAMESPACE. ``keep``:
    host directories the units run from (a checkout, a venv), which stay visible even when they
    lie under /tmp (a CI clone may), where the private /tmp would hide them."""

    def __init__(self, stage: Path, keep=()):
        self.stage = stage
        self.keep = _outermost_under_tmp([Path(path).resolve() for path in keep])
        self.cgroup = f"esl-gateway-test-{uuid.uuid4().hex[:12]}"
        self.log_path = stage / "init.log"
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None   # systemd's PID as the host sees it

    def boot(self, timeout: float = 20.0) -> "RealSystemd":
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "ESL_TEST_CGROUP": self.cgroup, "ESL_TEST_INIT": INIT,
               "ESL_TEST_STAGE": str(self.stage), "ESL_TEST_STAGE_IN_NAMESPACE": STAGE_IN_NAMESPACE,
               "ESL_TEST_SYSTEMD": SYSTEMD, "ESL_TEST_TARGET": DEFAULT_TARGET,
               "ESL_TEST_KEEP": " ".join(map(str, self.keep))}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", LAUNCH], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        try:
            self.pid1 = self._wait(self._systemd_pid, timeout, "systemd started as PID 1")
            self._wait(lambda: self.systemctl("is-system-running", check=False).stdout.strip()
                       in ("running", "degraded"), timeout, "systemd running")
        except SystemdUnavailable:
            self.close()
            raise
        return self

    def _wait(self, condition, timeout: float, what: str):
        """Like wait_until, but a launcher that died means systemd cannot run here."""
        def ready():
            if self.proc.poll() is not None:
                raise SystemdUnavailable(f"the namespace's init exited ({self.proc.returncode})"
                                         f" before {what}: {self.log_path.read_text().strip()}")
            return condition()
        try:
            return wait_until(ready, timeout, what)
        except AssertionError as exc:
            raise SystemdUnavailable(f"{exc}: {self.log_path.read_text().strip()}") from None

    def _systemd_pid(self) -> int | None:
        """The launcher's child (PID 1 inside), once it has become systemd."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in children.read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue   # exec'ing or gone: looked at again on the next poll
        return None

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command inside the namespaces (systemctl reaches that PID 1 through its /run).
        Cooperative, so simulated calls go on while systemctl waits for a job."""
        result = run_command(["nsenter", "-t", str(self.pid1), "-m", "-p", *command],
                             capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}: "
                                 f"{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        output = self.systemctl("show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        """The unit's log lines, messages only (systemd's about the unit included)."""
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def close(self) -> None:
        """Kill PID 1 (the kernel then kills every process of the namespace and the private
        mounts go with it) and remove the run's cgroups. Safe to call more than once."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # launcher, and systemd: its own group
            if self.pid1 is not None:
                _kill(self.pid1)
        self.proc.wait(10)
        self.proc = None
        # The kernel frees a cgroup a moment after its last process is reaped ("busy" until).
        wait_until(self._remove_cgroups, 10, f"cgroup {self.cgroup} removed", poll=0.1)

    def _remove_cgroups(self) -> bool:
        removed = subprocess.run(["unshare", "--mount", "sh", "-c", REMOVE_CGROUP],
                                 env=dict(os.environ, ESL_TEST_CGROUP=self.cgroup),
                                 capture_output=True)
        return removed.returncode == 0

def _outermost_under_tmp(paths: list[Path]) -> list[Path]:
    """The paths below /tmp, without those inside another one (its bind brings them along).
    Split on blanks by INIT's shell, so a path with one is refused rather than half-kept."""
    tmp = Path("/tmp")
    below = sorted({path for path in paths if path.is_relative_to(tmp) and path != tmp})
    for path in below:
        if any(c.isspace() for c in str(path)):
            raise SystemdUnavailable(f"cannot keep {path} visible: it has a blank in its name")
    return [path for path in below if not any(path.is_relative_to(other) and path != other
                                               for other in below)]


def _die_with_parent() -> None:
    """In the launcher before exec: a test process that is killed outright (no finally runs)
    takes the launcher with it, and ``unshare --kill-child`` then takes systemd."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
