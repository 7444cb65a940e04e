"""Hostile programs against the sandbox, as plain functions (no pytest).

``test_codeexec_isolation.py`` runs them in the test process (root in CI) and, through
``python3 sandbox_attacks.py``, as an unprivileged user of their own; each returns facts
that the tests assert on.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pytest_llmbench.records import ScoreRequest
from pytest_llmbench.scoring.codeexec import Limits, judge, probe_isolation, run_program
from pytest_llmbench.scoring.codeexec.languages import choose_python

SPY = """
import os, sys
for path in sys.stdin.read().split():
    try:
        with open(path) as f:
            print("READ", path, f.read()[:40].replace("\\n", " "))
    except OSError as exc:
        print("hidden", exc.errno)
"""


def python() -> str:
    found = choose_python("auto", probe_isolation())
    assert found is not None
    return found


def read_files(paths: list[str]) -> str:
    """stdout of a program that tries to read each of ``paths``."""
    r, _ = run_program([python(), "-u", "main.py"], files={"main.py": SPY.encode()},
                       stdin=" ".join(paths), limits=Limits(time=10))
    assert r.error == "", r.error
    return r.stdout


OTHER = """
import os, time
open("/work/secret.txt", "w").write("SECRET-{mark}")
open("/tmp/secret.txt", "w").write("SECRET-{mark}")
print("written", flush=True)
time.sleep(3)
"""

SEEK = """
import glob, os
hits = []
for pattern in ("/tmp/*/work/secret.txt", "/tmp/llmbench-run-*/work/secret.txt",
                "/tmp/secret.txt", "/proc/*/root/work/secret.txt", "/proc/*/cwd/secret.txt",
                "/proc/*/root/tmp/secret.txt", "/proc/*/fd/*"):
    for path in glob.glob(pattern):
        try:
            if "SECRET-{mark}" in open(path).read(200):
                hits.append(path)
        except (OSError, UnicodeDecodeError):
            pass
print("found", len(hits), hits)
"""


def other_run() -> str:
    """stdout of a program that looks for another, concurrent run's files."""
    mark = secrets.token_hex(6)
    started = threading.Event()

    def victim() -> None:
        started.set()
        run_program([python(), "-u", "main.py"], files={"main.py": OTHER.format(mark=mark).encode()},
                    limits=Limits(time=5))

    thread = threading.Thread(target=victim)
    thread.start()
    started.wait()
    time.sleep(1.0)  # the victim has written its files (its start-up takes ~0.1 s)
    r, _ = run_program([python(), "-u", "main.py"], files={"main.py": SEEK.format(mark=mark).encode()},
                       limits=Limits(time=10))
    thread.join()
    return r.stdout


FORGER = '''
import os, sys
source = open(__file__).read()
guesses = set()
for word in source.replace("'", " ").replace('"', " ").split():
    guesses.add(word)
for fd in range(3, 64):
    for guess in list(guesses)[:200]:
        try:
            os.write(fd, ("ok " + guess).encode())
        except OSError:
            break
print(source, file=sys.stderr)

def add(x: int, y: int) -> int:
    return x - y
'''

TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


def forged_marker(exit_early: bool) -> dict[str, Any]:
    """Verdict of a wrong HumanEval answer that tries to forge the pass."""
    code = FORGER + ("\nsys.exit(0)\n" if exit_early else "")
    req = ScoreRequest(answer=f"```python\n{code}\n```", expected=None,
                       options={"time_limit": 10},
                       extra={"test": TEST, "entry_point": "add",
                              "prompt": "def add(x: int, y: int) -> int:\n"})
    s = judge(req, lease=None)
    return {"verdict": s.details["verdict"], "explanation": s.explanation}


LITTER = """
import os
mark = "{mark}"
for d in ("/tmp", "/var/tmp", "/dev/shm", "."):
    with open(os.path.join(d, mark), "wb") as f:
        f.write(b"x" * 1000)
written = 0
try:
    for i in range(10000):
        with open(f"/tmp/{{mark}}-{{i}}", "wb") as f:
            f.write(b"y" * 512 * 1024)
        written += 512 * 1024
except OSError as exc:
    print("stopped", exc.errno)
print("written_mb", written // (1024 * 1024))
"""


def litter(disk_mb: int) -> dict[str, Any]:
    """A program writing into /tmp, /var/tmp, /dev/shm and its cwd until the disk is full."""
    mark = f"llmbench-litter-{secrets.token_hex(6)}"
    r, _ = run_program([python(), "-u", "main.py"], files={"main.py": LITTER.format(mark=mark).encode()},
                       limits=Limits(time=20, disk_mb=disk_mb))
    left = [str(p) for d in ("/tmp", "/var/tmp", "/dev/shm") for p in Path(d).glob(f"{mark}*")]
    return {"stdout": r.stdout, "stderr": r.stderr[-300:], "left": left}


def main() -> None:
    """``python3 sandbox_attacks.py PATH...``: every attack, as JSON on stdout."""
    out = {
        "uid": os.getuid(),
        "isolation": probe_isolation().to_dict(),
        "read_files": read_files(sys.argv[1:]),
        "other_run": other_run(),
        "forged": forged_marker(False),
        "forged_exit": forged_marker(True),
        "litter": litter(8),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
