"""Run one untrusted program with limits, and make sure nothing of it survives.

Each run gets a fresh temporary directory (``<tmp>/llmbench-run-*/work``, the program's cwd,
HOME and TMPDIR), its own session and process group, and, set in the child between fork and
exec:

* ``RLIMIT_CPU``  = ceil(time limit) + 1 s (soft; SIGXCPU), +1 s hard: a backstop, since the
  wall limit below normally fires first;
* ``RLIMIT_AS``   = ``memory_mb`` (0: unlimited);
* ``RLIMIT_FSIZE``= output cap + 1 byte: stdout and stderr are regular files, so a program
  that writes past the cap gets SIGXFSZ / EFBIG, and a file longer than the cap means OLE;
* ``RLIMIT_CORE`` = 0;
* a process cap (see below), a network namespace (see below), ``PR_SET_PDEATHSIG`` = SIGKILL
  (if the item process is killed, its running program dies with it).

The parent enforces the time limit on the wall clock, minus the time the program spent
runnable but waiting for a CPU (``/proc/PID/schedstat`` ``run_delay`` of its main thread):
load from other processes on the machine, which the lease pool cannot control, then delays
the kill instead of turning into a false TLE, up to ``max_wall_factor`` x the limit (3 by
default). A program that sleeps or blocks is not waiting for a CPU: its limit is not
extended; nor is the limit of a run with several processes or threads at the moment the
limit is reached (it may be waiting behind its own tasks: a fork bomb gets no extra time). The parent waits on a pidfd, SIGKILLs the process group and every other process
of the run when the time is up, then reaps the program with ``wait4`` (whose rusage gives
the CPU time of the program and the children it waited for).

Process cap and "nothing survives", by privilege:

* **root** (``process_cap = "uid"``): the program runs under a uid of its own,
  ``UID_BASE + <native thread id of the runner>`` (unique among concurrent runs on the
  machine, no passwd entry needed). ``RLIMIT_NPROC`` is counted per uid and is not enforced
  for root, but it *is* for that uid, so the cap is exact. After the run, every process whose
  ``/proc/PID`` belongs to that uid is killed, round after round until none is left; a
  process cannot leave its uid without privileges, so ``setsid`` or double forks do not help
  it. The interpreter must then be reachable by that uid (``judge.py`` picks one).
* **not root** (``"rlimit-shared"``): the program keeps the caller's uid, ``RLIMIT_NPROC`` is
  set to the caller's current task count + the cap. Weakness: the count is shared with the
  caller's other processes (a busy machine can starve the program, a quiet one allows a few
  more), and the sweep finds escaped processes only through ``LLMBENCH_RUN_TOKEN`` in their
  environment, which a program can drop by exec'ing with a clean environment after ``setsid``.

Network: ``unshare(CLONE_NEWNET)`` (root) or ``CLONE_NEWUSER | CLONE_NEWNET`` (unprivileged
user namespaces) gives the program a namespace with only a loopback device that is down, so
every ``connect`` fails with ENETUNREACH, 127.0.0.1 included. When the kernel refuses both
(``network = "shared"``), the program shares the host's network: the documented weakness;
``details["isolation"]`` says which applied.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("pytest_llmbench.scoring.codeexec")

UID_BASE = 0x60000000
"""First sandbox uid (root mode); the runner's native thread id is added (pid_max <= 2**22)."""
ITEM_TOKEN_ENV = "LLMBENCH_ITEM_TOKEN"
RUN_TOKEN_ENV = "LLMBENCH_RUN_TOKEN"

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_SWEEP_ROUNDS = 200
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Limits of one run. ``time`` is wall-clock seconds, enforced by the parent."""

    time: float = 2.0
    memory_mb: int = 256
    """Address-space cap (``RLIMIT_AS``) in MiB; 0 = none."""
    output_kb: int = 1024
    """Cap on stdout and on stderr (each) in KiB; writing more is OLE."""
    processes: int = 32
    """Processes + threads the program may have at once (``RLIMIT_NPROC``)."""
    max_wall_factor: float = 3.0
    """The wall limit grows by the time the program waits for a CPU, up to this multiple of
    ``time`` (1.0: a strict wall limit)."""

    @property
    def max_wall(self) -> float:
        return self.time * max(1.0, self.max_wall_factor)

    @property
    def output_bytes(self) -> int:
        return self.output_kb * 1024

    @property
    def cpu_seconds(self) -> int:
        return math.ceil(self.time) + 1


@dataclass(frozen=True, kw_only=True)
class Isolation:
    """What this machine lets the runner do (``probe_isolation``)."""

    process_cap: str
    """``uid`` (own uid per run, exact) or ``rlimit-shared`` (see the module docstring)."""
    network: str
    """``netns``, ``userns+netns`` or ``shared`` (no isolation)."""
    unshare_flags: int = 0

    @property
    def switch_user(self) -> bool:
        return self.process_cap == "uid"

    def to_dict(self) -> dict[str, str]:
        return {"process_cap": self.process_cap, "network": self.network}


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """The raw facts of one run; ``judge.classify`` turns them into a verdict."""

    exit_code: int | None = None
    signal: int | None = None
    wall: float = 0.0
    cpu_wait: float = 0.0
    """Of ``wall``, the seconds the program was runnable but waiting for a CPU (machine load)."""
    cpu: float = 0.0
    maxrss_kb: int = 0
    timed_out: bool = False
    """Killed by the runner at the wall limit."""
    stdout: str = ""
    stderr: str = ""
    stdout_over: bool = False
    stderr_over: bool = False
    killed_leftovers: int = 0
    """Processes of the run still alive after the program ended (or was killed), killed."""
    error: str = ""
    """Non-empty when the sandbox itself failed (then nothing above is meaningful)."""
    limits: Limits = field(default_factory=Limits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    # Resolve the symbols now: the child must not run dlsym between fork and exec.
    _ = libc.unshare, libc.prctl
    return libc


class _ChildSetup:
    """``preexec_fn``: runs in the forked child, before exec. Must not log or allocate much."""

    def __init__(self, limits: Limits, isolation: Isolation, uid: int | None, nproc: int) -> None:
        self.rlimits: list[tuple[int, int, int]] = [
            (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, limits.output_bytes + 1, limits.output_bytes + 1),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NPROC, nproc, nproc),
        ]
        if limits.memory_mb > 0:
            cap = limits.memory_mb * 1024 * 1024
            self.rlimits.append((resource.RLIMIT_AS, cap, cap))
        self.flags = isolation.unshare_flags
        self.uid = uid
        self.libc = _libc()

    def __call__(self) -> None:
        for which, soft, hard in self.rlimits:
            resource.setrlimit(which, (soft, hard))
        if self.flags and self.libc.unshare(self.flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)
        self.libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _true_binary() -> str:
    return shutil.which("true") or "/bin/true"


def _try_unshare(flags: int) -> bool:
    libc = _libc()

    def setup() -> None:
        if libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")

    try:
        subprocess.run([_true_binary()], preexec_fn=setup, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@functools.cache
def probe_isolation() -> Isolation:
    """Find out once per process what isolation works here (about 10 ms)."""
    root = os.geteuid() == 0
    cap = "uid" if root else "rlimit-shared"
    if root and _try_unshare(_CLONE_NEWNET):
        iso = Isolation(process_cap=cap, network="netns", unshare_flags=_CLONE_NEWNET)
    elif not root and _try_unshare(_CLONE_NEWUSER | _CLONE_NEWNET):
        flags = _CLONE_NEWUSER | _CLONE_NEWNET
        iso = Isolation(process_cap=cap, network="userns+netns", unshare_flags=flags)
    else:
        iso = Isolation(process_cap=cap, network="shared")
        log.warning("no network namespace available: sandboxed programs share the host network")
    log.debug("sandbox isolation: %s", iso)
    return iso


def accessible_by_others(path: str | os.PathLike[str]) -> bool:
    """True when a uid with no special rights can reach and execute ``path``.

    Checks the ``o+x`` bit of every directory on the way and ``o+rx`` on the file itself; used
    to decide whether an interpreter can be run under a sandbox uid.
    """
    real = Path(os.path.realpath(path))
    try:
        st = real.stat()
        if not (st.st_mode & stat.S_IXOTH and st.st_mode & stat.S_IROTH):
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


# --- finding and killing what a run left behind ------------------------------------------


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    with os.scandir("/proc") as it:
        for entry in it:
            if entry.name.isdigit():
                try:
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        pids.append(int(entry.name))
                except OSError:
                    continue
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            data = f.read()
    except OSError:
        return True  # gone
    right = data.rfind(b")")
    return data[right + 2 : right + 3] in (b"Z", b"X")


def _pids_with_token(token: str) -> list[int]:
    needle = f"\0{RUN_TOKEN_ENV}={token}\0".encode()
    found = []
    for pid in _pids_of_uid(os.getuid()):
        try:
            with open(f"/proc/{pid}/environ", "rb", buffering=0) as f:
                data = b"\0" + f.read()
        except OSError:
            continue
        if needle in data:
            found.append(pid)
    return found


def _reap_if_child(pids: Sequence[int]) -> None:
    # The item process may be a subreaper: orphans of the program then become our children.
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def sweep(uid: int | None, token: str, keep: int | None = None) -> int:
    """SIGKILL every live process of the run until none is left; returns how many were hit.

    ``uid``: the run's own uid (root mode), else processes are found by their run token.
    ``keep``: a pid not to signal (the program itself, when it is already a zombie).
    """
    me = os.getpid()
    hit: set[int] = set()
    for _ in range(_SWEEP_ROUNDS):
        pids = _pids_of_uid(uid) if uid is not None else _pids_with_token(token)
        live = [p for p in pids if p not in (me, keep) and not _is_zombie(p)]
        if not live:
            break
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            hit.add(pid)
        _reap_if_child(live)
        time.sleep(0.001)
    else:
        log.error("processes of a sandbox run survived %d kill rounds", _SWEEP_ROUNDS)
    _reap_if_child(sorted(hit))
    return len(hit)


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for pid in _pids_of_uid(uid):
        with contextlib.suppress(OSError):
            count += len(os.listdir(f"/proc/{pid}/task"))
    return count


# --- the run ------------------------------------------------------------------------------


def run_delay(pid: int) -> float:
    """Seconds ``pid`` (its main thread) spent runnable but waiting for a CPU (schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb", buffering=0) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _alone(pid: int, uid: int | None, token: str) -> bool:
    """The run is one single-threaded process: its CPU wait cannot be self-inflicted."""
    try:
        if len(os.listdir(f"/proc/{pid}/task")) != 1:
            return False
    except OSError:
        return False
    others = _pids_of_uid(uid) if uid is not None else _pids_with_token(token)
    return all(p == pid or _is_zombie(p) for p in others)


def _wait_exit(pid: int, started: float, limits: Limits, uid: int | None, token: str) -> bool:
    """Wait until ``pid`` exits (without reaping it); False when its time is up.

    Time is up when the wall time minus the program's CPU wait (``run_delay``) reaches the
    limit, or the wall time reaches ``limits.max_wall``. The wait is excused only while the
    run is a single task; a program with several processes or threads may be waiting behind
    its own (a fork bomb), so its limit stays a plain wall limit.
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    poller = select.poll()
    if fd >= 0:
        poller.register(fd, select.POLLIN)
    hard = started + limits.max_wall
    deadline = min(started + limits.time, hard)
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                if _alone(pid, uid, token):
                    deadline = min(started + limits.time + run_delay(pid), hard)
                if now >= deadline:
                    return False
            if fd >= 0:
                if poller.poll(max(1, math.ceil((deadline - now) * 1000))):
                    return True
            else:  # no pidfd: poll without reaping
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
                time.sleep(min(0.002, max(0.0, deadline - now)))
    finally:
        if fd >= 0:
            os.close(fd)


def _read_capped(f: Any, cap: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(cap + 1)
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def _child_env(work: Path, token: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": _SAFE_PATH,
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        RUN_TOKEN_ENV: token,
    }
    item_token = os.environ.get(ITEM_TOKEN_ENV)
    if item_token:  # the engine's tree kill finds the program by it
        env[ITEM_TOKEN_ENV] = item_token
    env.update(extra or {})
    return env


def run_program(
    argv: Sequence[str],
    *,
    limits: Limits,
    stdin: str | bytes | None = None,
    files: Mapping[str, bytes] | None = None,
    env: Mapping[str, str] | None = None,
    isolation: Isolation | None = None,
    keep_files: Sequence[str] = (),
) -> tuple[RunResult, dict[str, bytes]]:
    """Run ``argv`` in a fresh sandbox directory holding ``files``; return facts and outputs.

    ``argv[0]`` may be relative to the work directory (``./prog``). ``keep_files`` names files
    to read back from the work directory after the run (a compiler's output), returned in the
    second element. Never raises for anything the program does; a failure of the sandbox
    itself is reported in ``RunResult.error``.
    """
    iso = isolation or probe_isolation()
    try:
        base = Path(tempfile.mkdtemp(prefix="llmbench-run-"))
    except OSError as exc:
        return RunResult(error=f"cannot create a temporary directory: {exc}", limits=limits), {}
    try:
        return _run_in(base, argv, limits, stdin, files or {}, env, iso, keep_files)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_in(
    base: Path,
    argv: Sequence[str],
    limits: Limits,
    stdin: str | bytes | None,
    files: Mapping[str, bytes],
    env: Mapping[str, str] | None,
    iso: Isolation,
    keep_files: Sequence[str],
) -> tuple[RunResult, dict[str, bytes]]:
    token = secrets.token_hex(8)
    uid = UID_BASE + threading.get_native_id() if iso.switch_user else None
    try:
        os.chmod(base, 0o711)  # the sandbox uid may traverse, not list or open our files
        work = base / "work"
        work.mkdir(mode=0o700)
        for name, data in files.items():
            path = work / name
            path.write_bytes(data)
            path.chmod(0o755)
        if uid is not None:
            for path in (work, *(work / n for n in files)):
                os.chown(path, uid, uid)
            sweep(uid, token)  # a crashed earlier runner with the same thread id
            nproc = limits.processes
        else:
            nproc = _tasks_of_uid(os.getuid()) + limits.processes
        stdin_path = base / "stdin"
        stdin_path.write_bytes(stdin.encode() if isinstance(stdin, str) else (stdin or b""))
        setup = _ChildSetup(limits, iso, uid, nproc)
    except OSError as exc:
        return RunResult(error=f"cannot prepare the sandbox: {exc}", limits=limits), {}

    with (
        open(stdin_path, "rb") as fin,
        open(base / "stdout", "w+b") as fout,
        open(base / "stderr", "w+b") as ferr,
    ):
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=work,
                env=_child_env(work, token, env),
                start_new_session=True,
                preexec_fn=setup,  # setrlimit/unshare/setuid must happen between fork and exec
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return RunResult(error=f"cannot start {argv[0]!r}: {exc}", limits=limits), {}
        timed_out = False
        try:
            timed_out = not _wait_exit(proc.pid, started, limits, uid, token)
            wall = time.monotonic() - started
            waited = run_delay(proc.pid)  # still readable: the program is not reaped yet
        finally:
            # The program (maybe a zombie by now) is not reaped yet, so its pid and pgid
            # cannot have been reused: signalling them is safe. It may have left its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGKILL)
            leftovers = sweep(uid, token, keep=proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
            leftovers += sweep(uid, token)
        stdout, stdout_over = _read_capped(fout, limits.output_bytes)
        stderr, stderr_over = _read_capped(ferr, limits.output_bytes)
    kept: dict[str, bytes] = {}
    for name in keep_files:
        with contextlib.suppress(OSError):
            kept[name] = (work / name).read_bytes()
    result = RunResult(
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        wall=round(wall, 4),
        cpu_wait=round(waited, 4),
        cpu=round(usage.ru_utime + usage.ru_stime, 4),
        maxrss_kb=usage.ru_maxrss,
        timed_out=timed_out,
        stdout=stdout,
        stderr=stderr,
        stdout_over=stdout_over,
        stderr_over=stderr_over,
        killed_leftovers=leftovers,
        limits=limits,
    )
    return result, kept
