"""The file system a sandboxed program sees: a minimal root in a private mount namespace.

The forked child, before it execs the program, calls ``unshare(CLONE_NEWNS)`` (root) or
``unshare(CLONE_NEWUSER | CLONE_NEWNS)`` (unprivileged, its own uid mapped to itself), makes
every mount private, and builds a new root on a fresh, size-limited tmpfs::

    /usr /etc/<a few files> /lib... read-only bind mounts of the toolchain (nosuid)
    <interpreter prefix>            read-only, when the interpreter lives outside /usr
    /bin /lib /lib64 /sbin          symlinks into /usr where the host has merged /usr
    /dev/{null,zero,full,random,urandom}   bind mounts of the host's devices
    /dev/shm /tmp /var/tmp          empty directories on the tmpfs (mode 1777)
    /work                           the program's files, its cwd and HOME
    /proc                           root mode only: a new procfs with ``hidepid=2``

then ``pivot_root`` into it and detaches the old root, so nothing else of the host is
reachable (not the project, the suites, the store, ``.env`` files, other runs, the host's
/tmp). The tmpfs lives in the namespace only: it disappears, with all the program wrote,
when the last process of the run exits, and its ``size`` is the run's disk cap. The runner
receives an fd of ``/work`` over a socket (``SCM_RIGHTS``) before the exec, to read back the
files it wants (a compiler's output) after the run.

The plan (what to mount, with which locked flags) is computed in the parent; the child only
replays it, so it stays short and allocates little.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

TOOLCHAIN_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime",
             "passwd", "group", "nsswitch.conf")
DEVICES = ("null", "zero", "full", "random", "urandom")
WORK = "/work"

# statvfs f_flag bits -> mount flags a bind mount must keep when remounted (in a user
# namespace the kernel refuses a remount that would clear them: they are "locked")
_LOCKED = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
           (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
           (os.ST_RELATIME, MS_RELATIME), (os.ST_RDONLY, MS_RDONLY))


@dataclass(frozen=True)
class Bind:
    source: str
    flags: int
    """Flags of the remount: read-only, nosuid, plus the source mount's locked flags."""
    is_dir: bool


@dataclass(frozen=True)
class RootPlan:
    """What the child mounts; built by ``plan_root``."""

    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[str, str], ...]
    """``(path, link text)``."""
    size_bytes: int
    proc: bool

    def describe(self) -> dict[str, Any]:
        return {"read_only": [b.source for b in self.binds if not b.source.startswith("/dev/")],
                "tmpfs_mb": self.size_bytes // (1024 * 1024), "proc": self.proc}


def _locked_flags(path: str) -> int:
    try:
        have = os.statvfs(path).f_flag
    except OSError:
        return 0
    return sum(flag for bit, flag in _LOCKED if have & bit)


def plan_root(extra_ro: Sequence[str], *, disk_mb: int, proc: bool) -> RootPlan:
    """The mounts for one run: the toolchain, ``extra_ro`` (interpreter prefixes), devices."""
    binds: list[Bind] = []
    links: list[tuple[str, str]] = []
    for path in TOOLCHAIN_DIRS:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(Bind(path, MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(path), True))
    for name in ETC_FILES:
        path = f"/etc/{name}"
        if os.path.exists(path):
            binds.append(Bind(path, MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(path),
                              os.path.isdir(path)))
    covered = [b.source for b in binds]
    for path in extra_ro:
        real = os.path.realpath(path)
        if real == "/" or not os.path.isdir(real):
            continue
        if not any(real == c or real.startswith(c + "/") for c in covered):
            binds.append(Bind(real, MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(real), True))
            covered.append(real)
    for name in DEVICES:
        path = f"/dev/{name}"
        if os.path.exists(path):
            # devices stay writable (a read-only mount refuses opening /dev/null for writing)
            binds.append(Bind(path, MS_NOSUID | MS_NOEXEC | _locked_flags(path) & ~MS_RDONLY, False))
    return RootPlan(tuple(binds), tuple(links), max(1, disk_mb) * 1024 * 1024, proc)


def _check(result: int, what: str, libc: Any) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc: Any, source: bytes | None, target: str, fstype: bytes | None, flags: int,
           data: bytes | None = None) -> None:
    _check(libc.mount(source, target.encode(), fstype, flags, data), f"mount {target}", libc)


def build_root(plan: RootPlan, libc: Any, files: Mapping[str, bytes], owner: int | None,
               fd_socket: socket.socket | None) -> None:
    """In the child, inside its new mount namespace: build the root and pivot into it.

    ``owner``: uid (and gid) to own ``/work`` and the files (root mode); ``fd_socket``: where
    to send an fd of ``/work`` for the runner.
    """
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    root = "/tmp"  # any directory will do: the mount is private to this namespace
    opts = f"size={plan.size_bytes},nr_inodes=16384,mode=0755".encode()
    _mount(libc, b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, opts)
    for path, text in plan.symlinks:
        os.symlink(text, root + path)
    for bind in plan.binds:
        target = root + bind.source
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if bind.is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(libc, bind.source.encode(), target, None, MS_BIND | MS_REC)
        _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | bind.flags)
    os.makedirs(root + "/dev", exist_ok=True)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        os.makedirs(root + path, exist_ok=True)
        os.chmod(root + path, 0o1777)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    if plan.proc:
        os.mkdir(root + "/proc")
        try:  # hidepid=2: only the run's own processes are visible (its own uid)
            _mount(libc, b"proc", root + "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   b"hidepid=2")
        except OSError:
            os.rmdir(root + "/proc")
    work = root + WORK
    os.mkdir(work, 0o700)
    for name, data in files.items():
        fd = os.open(f"{work}/{name}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o755)
        os.write(fd, data)  # tmpfs writes are complete: no short writes to loop on
        os.close(fd)
        if owner is not None:
            os.chown(f"{work}/{name}", owner, owner)
    if owner is not None:
        os.chown(work, owner, owner)
    if fd_socket is not None:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        socket.send_fds(fd_socket, [b"w"], [fd])
        os.close(fd)
    os.chdir(root)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is not None:
        _check(libc.syscall(number, b".", b"."), "pivot_root", libc)
        _check(libc.umount2(b".", MNT_DETACH), "umount old root", libc)
    else:  # pragma: no cover - other architectures: chroot (weaker with a user namespace)
        os.chroot(".")
    os.chdir(WORK)
