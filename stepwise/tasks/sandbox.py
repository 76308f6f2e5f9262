"""Run one untrusted Python program in a confined subprocess: `run_python(source, stdin, timeout_s)`.

Every run gets a fresh temp dir as its cwd (removed afterwards), a new session (process group), the
resource limits of `SandboxLimits` (CPU seconds, address space, file size, processes, no core), a
clean environment, a wall-clock timeout that kills everything it started, and stdout/stderr read
with a cap (never more than `output_bytes` per stream kept; exceeding it ends the run).

When running as root the program never runs as root: it gets a uid/gid of its own (leased per run,
`SANDBOX_UID_BASE` + slot, no supplementary groups), which is what makes RLIMIT_NPROC bite (root is
exempt) and lets every process of the run be found and killed afterwards, even ones that left the
session; files the uid cannot reach (e.g. /root 0700) are out of reach, and the interpreter it runs
is the first of the usual ones that it can run (`sandbox_python`).

Two isolation modes (`isolation="auto"` picks bwrap when `bwrap` is on PATH and works here):
- "bwrap": `bwrap --ro-bind / / --tmpfs /tmp --bind WORKDIR --dev /dev --proc /proc --unshare-all
  --die-with-parent --new-session`: read-only root, private /tmp, only the work dir writable, own
  pid/ipc/uts/network namespaces (no network at all), so nothing of the run outlives bwrap.
- "fallback" (standard library only): limits as above, a private network namespace (best effort:
  as root CLONE_NEWNET, otherwise only where unprivileged user namespaces are allowed), no_new_privs,
  and Landlock where the kernel has it (Linux >= 5.13): writes only beneath the work dir, no TCP
  bind/connect (ABI 4), no signals to processes outside the run (ABI 6). It cannot hide files from
  reading (anything the uid may read is readable), nor stop UDP or unix-socket traffic without a
  network namespace; without Landlock it cannot stop writes to world-writable places (/tmp,
  /dev/shm); not as root, a process that leaves the session (setsid) escapes the final kill and
  lives until its CPU limit, and RLIMIT_NPROC counts all of the user's processes (the limit is set
  to the user's current count plus `processes`).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stepwise.tasks.sandbox_launch import landlock_abi

LAUNCHER = str(Path(__file__).with_name("sandbox_launch.py"))
SANDBOX_UID_BASE = 2_100_000_000  # as root: run n gets uid/gid SANDBOX_UID_BASE + a free slot
SANDBOX_UID_SLOTS = 256
SETUP_FAILED_EXIT = 127
READ_CHUNK = 1 << 16
KILL_SETTLE_S = 2.0


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits; `cpu_s` None means the wall-clock timeout rounded up, plus one second."""

    memory_bytes: int = 512 << 20
    file_size_bytes: int = 16 << 20
    processes: int = 64
    output_bytes: int = 8 << 20
    cpu_s: int | None = None
    isolation: str = "auto"  # auto | bwrap | fallback


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when the run was ended by the timeout or the output cap
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_exceeded: bool
    isolation: str
    uid: int  # the uid the program ran as
    session_id: int  # the session (and process group) the run started in

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


class SandboxSetupError(RuntimeError):
    """The sandbox itself could not be set up (not a verdict on the program)."""


def _running_as_root() -> bool:
    return os.geteuid() == 0


@functools.cache
def bwrap_usable() -> bool:
    """Whether `bwrap` is on PATH and can start a sandbox here (user namespaces allowed)."""
    if shutil.which("bwrap") is None:
        return False
    with contextlib.suppress(SandboxSetupError):
        return run_argv(["/bin/true"], b"", 10.0, SandboxLimits(isolation="bwrap")).returncode == 0
    return False


def resolve_isolation(isolation: str) -> str:
    if isolation == "auto":
        return "bwrap" if bwrap_usable() else "fallback"
    if isolation not in ("bwrap", "fallback"):
        raise ValueError(f"sandbox isolation '{isolation}': valid are auto, bwrap, fallback")
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        raise SandboxSetupError("sandbox isolation 'bwrap' asked for but bwrap is not on PATH")
    return isolation


@functools.cache
def sandbox_python(isolation: str) -> str:
    """The first interpreter the sandboxed program can run: $STEPWISE_SANDBOX_PYTHON when set (one with the
    packages a benchmark's tests import, e.g. numpy for MBPP+, readable by the sandbox uid), else this one,
    else a system python3 (as root this one may sit where the sandbox uid cannot reach, e.g. under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = "/usr/local/bin:/usr/bin:/bin"
    candidates = [os.environ.get("STEPWISE_SANDBOX_PYTHON", ""), sys.executable, os.path.realpath(sys.executable),
                  getattr(sys, "_base_executable", ""), shutil.which(version, path=system),
                  shutil.which("python3", path=system)]
    candidates = list(dict.fromkeys(c for c in candidates if c))
    if not _running_as_root():
        return candidates[0]
    for candidate in candidates:
        with contextlib.suppress(SandboxSetupError):
            probe = run_argv([candidate, "-I", "-c", "import json"], b"", 20.0, SandboxLimits(isolation=isolation))
            if probe.returncode == 0:
                return candidate
    raise SandboxSetupError(f"no Python interpreter the sandbox uid can run among {candidates}; install "
                            "a system python3 readable by all users (e.g. apt-get install python3)")


def run_python(source: str, stdin: bytes | str = b"", timeout_s: float = 10.0,
               limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a script (`python -I -B main.py` in the sandbox's cwd) with `stdin`."""
    isolation = resolve_isolation(limits.isolation)
    return run_argv([sandbox_python(isolation), "-I", "-B", "main.py"], stdin, timeout_s, limits, source)


def run_argv(argv: list[str], stdin: bytes | str, timeout_s: float, limits: SandboxLimits,
             main_py: str | None = None) -> SandboxResult:
    """Run `argv` in the sandbox (cwd: a fresh dir holding `main_py` as main.py when given)."""
    isolation = resolve_isolation(limits.isolation)
    stdin_bytes = stdin.encode() if isinstance(stdin, str) else stdin
    with _sandbox_identity() as (uid, gid), tempfile.TemporaryDirectory(prefix="stepwise-sandbox-") as workdir:
        if main_py is not None:
            Path(workdir, "main.py").write_text(main_py)
        if uid is not None:
            for path in (workdir, os.path.join(workdir, "main.py")):
                if os.path.exists(path):
                    os.chown(path, uid, gid)
        command = (_bwrap_argv(workdir) if isolation == "bwrap" else []) + argv
        return _launch(command, workdir, uid, gid, isolation, stdin_bytes, timeout_s, limits)


def _bwrap_argv(workdir: str) -> list[str]:
    return [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--bind", workdir, workdir,
            "--dev", "/dev", "--proc", "/proc", "--unshare-all", "--die-with-parent", "--new-session",
            "--chdir", workdir]


def _launch(command: list[str], workdir: str, uid: int | None, gid: int | None, isolation: str, stdin: bytes,
            timeout_s: float, limits: SandboxLimits) -> SandboxResult:
    status_read, status_write = os.pipe()
    processes = limits.processes if uid is not None else len(_pids_of_uid(os.getuid(), zombies=True)) + limits.processes
    config = {"limits": {"cpu_s": limits.cpu_s or int(timeout_s) + 2, "memory_bytes": limits.memory_bytes,
                         "file_size_bytes": limits.file_size_bytes, "processes": processes},
              "uid": uid, "gid": gid, "workdir": workdir, "isolate_network": isolation == "fallback",
              "landlock_abi": landlock_abi() if isolation == "fallback" else 0, "status_fd": status_write,
              "argv": command}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": workdir}
    deadline = time.monotonic() + timeout_s
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-B", LAUNCHER, json.dumps(config)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                                start_new_session=True, pass_fds=(status_write,))
    finally:
        os.close(status_write)
    try:
        streams = _exchange(proc, stdin, status_read, deadline, limits.output_bytes,
                            lambda: _kill_run(proc.pid, uid))
    finally:
        os.close(status_read)
        _kill_run(proc.pid, uid)
        proc.wait()
    setup_error, stdout, stderr, timed_out, exceeded = streams
    if setup_error:
        raise SandboxSetupError(f"sandbox setup failed: {setup_error.decode(errors='replace')}")
    returncode = None if timed_out or exceeded else proc.returncode
    return SandboxResult(returncode, stdout, stderr, timed_out, exceeded, isolation,
                         os.getuid() if uid is None else uid, proc.pid)


def _exchange(proc: subprocess.Popen, stdin: bytes, status_fd: int, deadline: float, cap: int, kill_rest):
    """Feed stdin, read the status fd and capped stdout/stderr until EOF, the deadline or the cap.

    Once the program's first process has exited, whatever it left running is killed (`kill_rest`),
    so pipes held open by stray children close. Returns (status, stdout, stderr, timed_out, exceeded).
    """
    selector = selectors.DefaultSelector()
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_fd: bytearray()}
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno() if stdin else -1
    if stdin:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    sent, timed_out, exceeded, stragglers_killed = 0, False, False, False
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(min(remaining, 0.05)):
            if key.fd == stdin_fd:
                try:
                    sent += os.write(key.fd, stdin[sent:sent + READ_CHUNK])
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # the program stopped reading: the rest of stdin is dropped
                    sent = len(stdin)
                if sent >= len(stdin):
                    selector.unregister(key.fd)
                    proc.stdin.close()
                continue
            chunk = os.read(key.fd, READ_CHUNK)
            if not chunk:
                selector.unregister(key.fd)
            elif len(buffers[key.fd]) + len(chunk) > cap:
                exceeded = True
            else:
                buffers[key.fd] += chunk
        if exceeded:
            break
        # waitid(WNOWAIT) leaves the exited process a zombie: its pid, the group's id, cannot be reused
        # before the caller reaps it, so killing that process group never hits a stranger.
        if not stragglers_killed and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            kill_rest()
            stragglers_killed = True
    selector.close()
    if not proc.stdin.closed:
        proc.stdin.close()
    return (bytes(buffers[status_fd]), bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]),
            timed_out, exceeded)


def _kill_run(session_id: int, uid: int | None) -> None:
    """SIGKILL the run's process group and, with a uid of its own, every process of that uid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session_id, signal.SIGKILL)
    if uid is not None:
        kill_uid(uid)


def _uids_of(pid: int, zombies: bool = False) -> list[int]:
    """The real, effective, saved and fs uids of a process; [] when it is gone (or a zombie, unless
    `zombies`: a zombie holds no resources, but RLIMIT_NPROC counts it until its parent reaps it)."""
    with contextlib.suppress(OSError, ValueError):
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if zombies or not fields["State"].strip().startswith(("Z", "X")):
            return [int(value) for value in fields["Uid"].split()]
    return []


def _pids_of_uid(uid: int, zombies: bool = False) -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc")
            if entry.name.isdigit() and uid in _uids_of(int(entry.name), zombies)]


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb needs a few rounds)."""
    give_up = time.monotonic() + KILL_SETTLE_S
    while pids := _pids_of_uid(uid):
        for pid in pids:
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                try:  # the uid is checked after pidfd_open, so a recycled pid is never hit
                    if uid in _uids_of(pid):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                finally:
                    os.close(pidfd)
        if time.monotonic() > give_up:
            raise SandboxSetupError(f"processes of sandbox uid {uid} survive SIGKILL: {pids[:10]}")
        time.sleep(0.005)


@contextlib.contextmanager
def _sandbox_identity():
    """As root, (uid, gid) of a free sandbox slot, held by a flock for the run; else (None, None)."""
    if not _running_as_root():
        yield None, None
        return
    lock_dir = Path(tempfile.gettempdir(), "stepwise-sandbox-uids")
    lock_dir.mkdir(mode=0o755, exist_ok=True)
    while True:
        for slot in range(SANDBOX_UID_SLOTS):
            uid = SANDBOX_UID_BASE + slot
            fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                kill_uid(uid)  # leftovers of a grader that died mid-run
                if _pids_of_uid(uid, zombies=True):  # zombies of an earlier run, not yet reaped by init
                    continue
                yield uid, uid
                return
            finally:
                os.close(fd)
        time.sleep(0.05)
