"""Run one untrusted program with limits, out of reach of everything else, and make sure
nothing of it survives.

Each run gets, set up in the forked child between fork and exec (``_ChildSetup``):

* **its own file system** (``fsroot.py``): a private mount namespace whose root is a fresh,
  size-limited tmpfs holding ``/work`` (the program's files, cwd and HOME), empty ``/tmp``,
  ``/var/tmp`` and ``/dev/shm``, and the toolchain read-only; nothing of the project, the
  suites, the store, ``.env`` files, other runs or the host's /tmp. Root uses
  ``CLONE_NEWNS``; an unprivileged caller ``CLONE_NEWUSER | CLONE_NEWNS`` (its uid mapped to
  itself, so the program has no capability left after its exec). Where the kernel refuses
  both (``filesystem = "shared"``) the program runs in a host temp directory and sees what
  its uid may read: the documented weakness;
* **whole-tree limits** (``cgroup.py``): a memory and a pids cgroup for the run where cgroups
  are writable (``tree_limits = "cgroup"``), else rlimits only (``"rlimit"``);
* ``RLIMIT_CPU`` = ceil(time limit) + 1 s (soft; SIGXCPU), +1 s hard: a backstop, since the
  wall limit below normally fires first;
* ``RLIMIT_AS`` = ``memory_mb`` per process, set by ``prlimit(1)`` *after* the exec: set in
  the forked child of a large caller, it made Python 3.10's ``preexec_fn`` machinery
  segfault (the child already maps more than the cap); ``prlimit`` is a small C program;
* ``RLIMIT_FSIZE`` = output cap + 1 byte: stdout and stderr are memfds (regular files held
  only by the runner), so a program that writes past the cap gets SIGXFSZ / EFBIG, and a
  longer file means OLE. The same cap applies to every file the program writes;
* ``RLIMIT_CORE`` = 0, a process cap (see below), a network namespace (see below),
  ``PR_SET_PDEATHSIG`` = SIGKILL (if the item process is killed, its program dies with it).

The parent enforces the time limit on the wall clock, minus the time the program spent
runnable but waiting for a CPU (``/proc/PID/schedstat`` ``run_delay`` of its main thread):
load from other processes on the machine, which the lease pool cannot control, then delays
the kill instead of turning into a false TLE, up to ``max_wall_factor`` x the limit (3 by
default; never past ``wall_cap``, the time the item's task deadline leaves). A program that
sleeps or blocks is not waiting for a CPU: its limit is not extended; nor is the limit of a
run with several processes or threads at the moment the limit is reached (it may be waiting
behind its own tasks: a fork bomb gets no extra time). The parent waits on a pidfd, SIGKILLs
the process group and every other process of the run when the time is up, then reaps the
program with ``wait4`` (whose rusage gives the CPU time of the program and the children it
waited for).

Process cap and "nothing survives", by privilege:

* **root** (``process_cap = "uid"``): the program runs under a uid of its own,
  ``UID_BASE + <native thread id of the runner>`` (unique among concurrent runs on the
  machine, no passwd entry needed). ``RLIMIT_NPROC`` is counted per uid and is not enforced
  for root, but it *is* for that uid, so the cap is exact. After the run, every process of
  the run's cgroup (without cgroups: of that uid) is killed, round after round until none
  is left; a
  process can leave neither without privileges, so ``setsid``, double forks, a cleared
  environment or a new name do not help it.
* **not root** (``"rlimit-shared"``): the program keeps the caller's uid, ``RLIMIT_NPROC`` is
  set to the caller's current task count + the cap. Weakness: the count is shared with the
  caller's other processes, and without a writable cgroup the sweep finds escaped processes
  only through ``LLMBENCH_RUN_TOKEN`` in their environment, which a program can drop by
  exec'ing with a clean environment after ``setsid``.

Network: ``CLONE_NEWNET`` (with the namespaces above) gives the program a namespace with only
a loopback device that is down, so every ``connect`` fails with ENETUNREACH, 127.0.0.1
included. When the kernel refuses (``network = "shared"``), the program shares the host's
network: the documented weakness. ``RunResult.isolation`` says what applied to each run.

Secrets for a harness (``secret``): passed in a memfd whose number is in
``LLMBENCH_HARNESS_FDS`` with the write end of a pipe for the harness's report; neither has a
path, and the pipe cannot be read back by the program.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import math
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmbench.coord import proc
from pytest_llmbench.scoring.codeexec import fsroot
from pytest_llmbench.scoring.codeexec.cgroup import RunCgroup
from pytest_llmbench.scoring.codeexec.cgroup import probe as probe_cgroups

log = logging.getLogger("pytest_llmbench.scoring.codeexec")

UID_BASE = 0x60000000
"""First sandbox uid (root mode); the runner's native thread id is added (pid_max <= 2**22)."""
ITEM_TOKEN_ENV = "LLMBENCH_ITEM_TOKEN"
RUN_TOKEN_ENV = "LLMBENCH_RUN_TOKEN"
HARNESS_FDS_ENV = "LLMBENCH_HARNESS_FDS"
"""``<secret fd>,<report fd>`` for a harness (see ``run_program(secret=...)``)."""

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_SWEEP_ROUNDS = 200
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_REPORT_CAP = 4096


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Limits of one run. ``time`` is wall-clock seconds, enforced by the parent."""

    time: float = 2.0
    memory_mb: int = 256
    """Per process: address space (``RLIMIT_AS``) in MiB; whole tree: resident memory
    (memory cgroup, where available). 0 = none."""
    output_kb: int = 1024
    """Cap on stdout and on stderr (each) in KiB; writing more is OLE. Every other file the
    program writes is capped at this size too (``RLIMIT_FSIZE``)."""
    processes: int = 32
    """Processes + threads the program may have at once (pids cgroup / ``RLIMIT_NPROC``)."""
    disk_mb: int = 64
    """Size of the run's tmpfs (``/work``, ``/tmp``, ``/var/tmp``, ``/dev/shm`` together)."""
    max_wall_factor: float = 3.0
    """The wall limit grows by the time the program waits for a CPU, up to this multiple of
    ``time`` (1.0: a strict wall limit)."""
    wall_cap: float | None = None
    """Hard ceiling of the wall time whatever the above says (the item's remaining time)."""

    @property
    def max_wall(self) -> float:
        wall = self.time * max(1.0, self.max_wall_factor)
        return wall if self.wall_cap is None else min(wall, self.wall_cap)

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
    filesystem: str = "shared"
    """``mount-ns`` (root), ``userns+mount-ns`` (unprivileged) or ``shared`` (none)."""
    tree_limits: str = "rlimit"
    """``cgroup`` (memory and pids for the whole tree) or ``rlimit`` (per process / uid)."""
    unshare_flags: int = 0

    @property
    def switch_user(self) -> bool:
        return self.process_cap == "uid"

    @property
    def own_root(self) -> bool:
        return self.filesystem != "shared"

    @property
    def user_namespace(self) -> bool:
        return bool(self.unshare_flags & _CLONE_NEWUSER)

    def to_dict(self) -> dict[str, str]:
        return {"process_cap": self.process_cap, "network": self.network,
                "filesystem": self.filesystem, "tree_limits": self.tree_limits}


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
    oom_kills: int = 0
    """Processes the kernel killed at the run's whole-tree memory limit (cgroup)."""
    peak_memory_kb: int = 0
    """Peak memory of the whole tree together (cgroup; 0 when unknown)."""
    report: str = ""
    """What was written to the harness's report pipe (``secret`` runs only; its tail)."""
    error: str = ""
    """Non-empty when the sandbox itself failed (then nothing above is meaningful)."""
    limits: Limits = field(default_factory=Limits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    # Resolve the symbols now: the child must not run dlsym between fork and exec.
    _ = libc.unshare, libc.prctl, libc.mount, libc.umount2, libc.syscall
    return libc


@functools.cache
def _prlimit() -> str | None:
    path = shutil.which("prlimit", path=_SAFE_PATH)
    return os.path.realpath(path) if path else None


class _ChildSetup:
    """``preexec_fn``: runs in the forked child, before exec. Must not log or allocate much.

    Order matters: join the cgroups (by path, before the root changes), enter the
    namespaces, build the root (needs the privileges the uid switch drops), set the
    rlimits (after the files are written: ``RLIMIT_FSIZE``), switch the uid, and ask to die
    with the parent (the uid switch would clear that request).
    """

    def __init__(self, limits: Limits, isolation: Isolation, uid: int | None, nproc: int, *,
                 cgroup_paths: Sequence[bytes] = (), plan: fsroot.RootPlan | None = None,
                 files: Mapping[str, bytes] | None = None, fd_socket: socket.socket | None = None,
                 set_as: bool = False) -> None:
        self.rlimits: list[tuple[int, int, int]] = [
            (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, limits.output_bytes + 1, limits.output_bytes + 1),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NPROC, nproc, nproc),
        ]
        if set_as and limits.memory_mb > 0:  # only when prlimit(1) is missing (see docstring)
            cap = limits.memory_mb * 1024 * 1024
            self.rlimits.append((resource.RLIMIT_AS, cap, cap))
        self.flags = isolation.unshare_flags
        self.user_ns = isolation.user_namespace
        self.ids = (os.getuid(), os.getgid())
        self.uid = uid
        self.cgroup_paths = list(cgroup_paths)
        self.plan = plan
        self.files = dict(files or {})
        self.fd_socket = fd_socket
        self.libc = _libc()

    def _enter_namespaces(self) -> None:
        if self.libc.unshare(self.flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")
        if self.user_ns:  # map our own uid/gid to themselves: no root inside either
            uid, gid = self.ids
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)

    def __call__(self) -> None:
        try:
            self._setup()
        except BaseException as exc:
            # fd 2 is already the run's stderr memfd: the runner reports this line
            os.write(2, f"sandbox setup failed: {exc!r}".encode())
            raise

    def _setup(self) -> None:
        for path in self.cgroup_paths:
            with open(path, "wb") as f:
                f.write(b"0")  # cgroup v1: "0" is the writing process
        if self.flags:
            self._enter_namespaces()
        if self.plan is not None:
            fsroot.build_root(self.plan, self.libc, self.files, self.uid, self.fd_socket)
        for which, soft, hard in self.rlimits:
            resource.setrlimit(which, (soft, hard))
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)
        self.libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _true_binary() -> str:
    return os.path.realpath(shutil.which("true") or "/bin/true")


def _try_setup(flags: int, with_root: bool) -> bool:
    probe = Isolation(process_cap="probe", network="probe", unshare_flags=flags)
    plan = fsroot.plan_root([], disk_mb=1, proc=False) if with_root else None
    setup = _ChildSetup(Limits(), probe, None, 0, plan=plan)
    setup.rlimits = []  # only the namespaces are probed
    try:
        subprocess.run([_true_binary()], preexec_fn=setup, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@functools.cache
def probe_isolation() -> Isolation:
    """Find out once per process what isolation works here (tens of ms)."""
    root = os.geteuid() == 0
    cap = "uid" if root else "rlimit-shared"
    tree = "cgroup" if root and probe_cgroups() is not None else "rlimit"
    user = 0 if root else _CLONE_NEWUSER
    prefix = "" if root else "userns+"
    if _try_setup(user | _CLONE_NEWNS | _CLONE_NEWNET, True):
        iso = Isolation(process_cap=cap, network=f"{prefix}netns", filesystem=f"{prefix}mount-ns",
                        tree_limits=tree, unshare_flags=user | _CLONE_NEWNS | _CLONE_NEWNET)
    elif _try_setup(user | _CLONE_NEWNET, False):
        iso = Isolation(process_cap=cap, network=f"{prefix}netns", tree_limits=tree,
                        unshare_flags=user | _CLONE_NEWNET)
        log.warning("no mount namespace available: sandboxed programs see the host's files")
    else:
        iso = Isolation(process_cap=cap, network="shared", tree_limits=tree)
        log.warning("no namespaces available: sandboxed programs see the host's files "
                    "and share the host network")
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


def _pids_with_run_token(token: str) -> list[int]:
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


def _run_pids(uid: int | None, token: str, cg: RunCgroup | None) -> set[int]:
    """Every process of the run: its cgroup's members (exact: no process can leave the
    cgroup, and reading it is one file instead of a ``/proc`` scan), else its uid's, else
    those with its token."""
    if cg is not None:
        return set(cg.members())
    if uid is not None:
        return set(_pids_of_uid(uid))
    return set(_pids_with_run_token(token))


def _alive(pid: int) -> bool:
    info = proc.read_stat(pid)
    return info is not None and info.alive


def sweep(uid: int | None, token: str, keep: int | None = None,
          cg: RunCgroup | None = None) -> int:
    """SIGKILL every live process of the run until none is left; returns how many were hit.

    ``uid``: the run's own uid (root mode); ``cg``: its cgroups; else processes are found by
    their run token. ``keep``: a pid not to signal (the program itself, not reaped yet).
    Orphans re-parented to the item process (a subreaper) are reaped (``proc.reap``).
    """
    me = os.getpid()
    hit: set[int] = set()
    for _ in range(_SWEEP_ROUNDS):
        live = [p for p in _run_pids(uid, token, cg) if p not in (me, keep) and _alive(p)]
        if not live:
            break
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            hit.add(pid)
        proc.reap(live)
        time.sleep(0.001)
    else:
        log.error("processes of a sandbox run survived %d kill rounds", _SWEEP_ROUNDS)
    proc.reap(sorted(hit))
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


@dataclass
class _Run:
    """One run being prepared and executed (see ``run_program``)."""

    argv: list[str]
    limits: Limits
    iso: Isolation
    program: str = ""
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    uid: int | None = None
    cg: RunCgroup | None = None
    host_work: Path | None = None
    fd_socket: socket.socket | None = None
    fds: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def alone(self, pid: int) -> bool:
        """The run is one single-threaded process: its CPU wait cannot be self-inflicted."""
        try:
            if len(os.listdir(f"/proc/{pid}/task")) != 1:
                return False
        except OSError:
            return False
        return all(p == pid or not _alive(p) for p in _run_pids(self.uid, self.token, self.cg))

    def wait_exit(self, pid: int, started: float) -> bool:
        """Wait until ``pid`` exits (without reaping it); False when its time is up.

        Time is up when the wall time minus the program's CPU wait (``run_delay``) reaches
        the limit, or the wall time reaches ``limits.max_wall``. The wait is excused only
        while the run is a single task; a program with several processes or threads may be
        waiting behind its own (a fork bomb), so its limit stays a plain wall limit.
        """
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = -1
        poller = select.poll()
        if fd >= 0:
            poller.register(fd, select.POLLIN)
        hard = started + self.limits.max_wall
        deadline = min(started + self.limits.time, hard)
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    if self.alone(pid):
                        deadline = min(started + self.limits.time + run_delay(pid), hard)
                    if now >= deadline:
                        return False
                if fd >= 0:
                    if poller.poll(max(1, math.ceil((deadline - now) * 1000))):
                        return True
                elif os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
                else:  # no pidfd: poll without reaping
                    time.sleep(min(0.002, max(0.0, deadline - now)))
        finally:
            if fd >= 0:
                os.close(fd)


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(f"llmbench-{name}")
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _drain(fd: int) -> str:
    """What sits in the (non-blocking) pipe ``fd``, the last ``_REPORT_CAP`` bytes."""
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)[-_REPORT_CAP:].decode("utf-8", "replace")


def _read_capped(fd: int, cap: int) -> tuple[str, bool]:
    data = os.pread(fd, cap + 1, 0)
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def _child_env(run: _Run, extra: Mapping[str, str] | None) -> dict[str, str]:
    home = str(run.host_work) if run.host_work is not None else fsroot.WORK
    env = {
        "PATH": _SAFE_PATH,
        "HOME": home,
        "TMPDIR": home if run.host_work is not None else "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        RUN_TOKEN_ENV: run.token,
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
    secret: bytes | None = None,
) -> tuple[RunResult, dict[str, bytes]]:
    """Run ``argv`` in a fresh sandbox holding ``files``; return facts and outputs.

    ``argv[0]`` may be relative to the work directory (``./prog``). ``keep_files`` names files
    to read back from the work directory after the run (a compiler's output), returned in the
    second element. ``secret``: bytes for a harness, readable once from an inherited memfd
    (``HARNESS_FDS_ENV``); what it writes to the second fd, a write-only pipe, is
    ``RunResult.report``. Never
    raises for anything the program does; a failure of the sandbox itself is reported in
    ``RunResult.error``.
    """
    iso = isolation or probe_isolation()
    with contextlib.ExitStack() as stack:
        run = _Run(list(argv), limits, iso, program=argv[0])
        try:
            setup = _prepare(run, stack, stdin, files or {}, secret)
        except OSError as exc:
            return RunResult(error=f"cannot prepare the sandbox: {exc}", limits=limits), {}
        run.env = _child_env(run, {**run.env, **(env or {})})
        return _execute(run, setup, keep_files)
    raise AssertionError("unreachable")  # pragma: no cover - mypy: ExitStack may swallow


def _prepare(run: _Run, stack: contextlib.ExitStack, stdin: str | bytes | None,
             files: Mapping[str, bytes], secret: bytes | None) -> _ChildSetup:
    """Everything the parent does before the fork; closes what it opens through ``stack``."""
    limits, iso = run.limits, run.iso
    run.uid = UID_BASE + threading.get_native_id() if iso.switch_user else None
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    for name, content in (("stdin", data), ("stdout", b""), ("stderr", b"")):
        run.fds[name] = _memfd(name, content)
        stack.callback(os.close, run.fds[name])
    if secret is not None:
        # the report goes through a pipe: write-only for the program, so nothing written to
        # it (the harness's verdict line and its nonce) can be read back by code that runs
        # after the harness (an atexit hook); non-blocking, so filling it cannot hang anyone
        run.fds["secret"] = _memfd("secret", secret)
        run.fds["report_read"], run.fds["report"] = os.pipe()
        os.set_blocking(run.fds["report"], False)
        os.set_blocking(run.fds["report_read"], False)
        for name in ("secret", "report_read", "report"):
            stack.callback(os.close, run.fds[name])
        run.env[HARNESS_FDS_ENV] = f"{run.fds['secret']},{run.fds['report']}"
    plan = None
    if iso.own_root:
        extra_ro = []
        if os.path.isabs(run.argv[0]):  # the interpreter or compiler, at its real path
            real = os.path.realpath(run.argv[0])
            if not os.path.isfile(real):
                raise FileNotFoundError(errno.ENOENT, "no such program", run.argv[0])
            run.argv[0] = real
            prefix = os.path.dirname(os.path.dirname(real))
            if prefix != "/":
                extra_ro.append(prefix)
        plan = fsroot.plan_root(extra_ro, disk_mb=limits.disk_mb, proc=not iso.user_namespace)
        parent, run.fd_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        stack.callback(parent.close)
        stack.callback(run.fd_socket.close)
        run.fds["socket"] = parent.fileno()
    else:
        run.host_work = _host_work_dir(stack, files, run.uid)
    if iso.tree_limits == "cgroup":
        run.cg = RunCgroup.create(run.token, memory_bytes=limits.memory_mb * 1024 * 1024,
                                  pids=limits.processes)
        if run.cg is not None:
            stack.callback(run.cg.remove)
    if run.uid is not None:
        sweep(run.uid, run.token)  # a crashed earlier runner with the same thread id
    nproc = limits.processes if run.uid is not None else (
        _tasks_of_uid(os.getuid()) + limits.processes)
    wrapper = _prlimit()
    if wrapper is not None and limits.memory_mb > 0:
        cap = limits.memory_mb * 1024 * 1024
        run.argv = [wrapper, f"--as={cap}:{cap}", "--", *run.argv]
    return _ChildSetup(limits, iso, run.uid, nproc,
                       cgroup_paths=run.cg.join_paths if run.cg is not None else (),
                       plan=plan, files=files if plan is not None else None,
                       fd_socket=run.fd_socket, set_as=wrapper is None)


def _host_work_dir(stack: contextlib.ExitStack, files: Mapping[str, bytes],
                   uid: int | None) -> Path:
    """Without a mount namespace: ``<tmp>/llmbench-run-*/work`` on the host, removed after."""
    base = Path(tempfile.mkdtemp(prefix="llmbench-run-"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
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
    return work


def _receive_work_fd(run: _Run) -> int | None:
    if "socket" not in run.fds:
        return None
    with socket.socket(fileno=os.dup(run.fds["socket"])) as sock:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 16, 1, socket.MSG_DONTWAIT)
        except OSError:
            return None
    return fds[0] if fds else None


def _read_kept(run: _Run, work_fd: int | None, names: Sequence[str]) -> dict[str, bytes]:
    kept: dict[str, bytes] = {}
    for name in names:
        with contextlib.suppress(OSError):
            if work_fd is not None:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=work_fd)
                with os.fdopen(fd, "rb") as f:
                    kept[name] = f.read()
            elif run.host_work is not None:
                kept[name] = (run.host_work / name).read_bytes()
    return kept


def _execute(run: _Run, setup: _ChildSetup, keep_files: Sequence[str],
             ) -> tuple[RunResult, dict[str, bytes]]:
    limits = run.limits
    started = time.monotonic()
    try:
        child = subprocess.Popen(
            run.argv,
            stdin=run.fds["stdin"],
            stdout=run.fds["stdout"],
            stderr=run.fds["stderr"],
            cwd=run.host_work,  # None with an own root: the setup changes to /work
            env=run.env,
            start_new_session=True,
            pass_fds=[run.fds[k] for k in ("secret", "report") if k in run.fds],
            preexec_fn=setup,  # namespaces/rlimits/setuid must happen between fork and exec
        )
    except (OSError, subprocess.SubprocessError) as exc:
        why = os.pread(run.fds["stderr"], 500, 0).decode("utf-8", "replace")
        return RunResult(error=f"cannot start {run.program!r}: {why or exc}",
                         limits=limits), {}
    work_fd = _receive_work_fd(run)
    timed_out = False
    try:
        timed_out = not run.wait_exit(child.pid, started)
        wall = time.monotonic() - started
        waited = run_delay(child.pid)  # still readable: the program is not reaped yet
    finally:
        # The program (maybe a zombie by now) is not reaped yet, so its pid and pgid
        # cannot have been reused: signalling them is safe. It may have left its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child.pid, signal.SIGKILL)
        leftovers = sweep(run.uid, run.token, keep=child.pid, cg=run.cg)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        leftovers += sweep(run.uid, run.token, cg=run.cg)
    try:
        kept = _read_kept(run, work_fd, keep_files)
    finally:
        if work_fd is not None:
            os.close(work_fd)  # the last reference to the run's tmpfs: it is freed now
    stdout, stdout_over = _read_capped(run.fds["stdout"], limits.output_bytes)
    stderr, stderr_over = _read_capped(run.fds["stderr"], limits.output_bytes)
    report = _drain(run.fds["report_read"]) if "report_read" in run.fds else ""
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
        oom_kills=run.cg.oom_kills() if run.cg is not None else 0,
        peak_memory_kb=run.cg.peak_memory() // 1024 if run.cg is not None else 0,
        report=report,
        limits=limits,
    )
    return result, kept
