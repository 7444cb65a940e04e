"""Canned program answers for code problems: ``[[sim:program=NAME]]`` answers ``PROGRAMS[NAME]``.

The rule-based model cannot write programs, so code suites name the answer they want the
simulator to give (a correct solution, a wrong one, one that loops...). Each value is the
complete answer text, prose and a fenced code block, exactly as a chat model would reply.
``example_suites/code.toml`` uses every entry and says which verdict each one earns.
"""

from __future__ import annotations

__all__ = ["PROGRAMS"]


def _answer(intro: str, code: str, lang: str = "python", outro: str = "") -> str:
    text = f"{intro}\n\n```{lang}\n{code.strip()}\n```\n"
    return f"{text}\n{outro}\n" if outro else text


PROGRAMS: dict[str, str] = {
    "hello": '```python\nprint("hello")\n```',
    # A + B: one line "a b" -> a + b.
    "sum_ok": _answer(
        "Read the two integers and print their sum:",
        """
import sys

a, b = map(int, sys.stdin.read().split())
print(a + b)
""",
        outro="This runs in O(1).",
    ),
    "sum_wrong": _answer(
        "Here is my solution:",
        """
a, b = map(int, input().split())
print(a - b)
""",
    ),
    "sum_cpp": _answer(
        "A C++ solution:",
        """
#include <iostream>

int main() {
    long long a, b;
    std::cin >> a >> b;
    std::cout << a + b << "\\n";
    return 0;
}
""",
        lang="cpp",
    ),
    # C++ that does not compile (an undeclared name): verdict CE.
    "sum_cpp_broken": _answer(
        "A C++ solution:",
        """
#include <iostream>

int main() {
    long long a, b;
    std::cin >> a >> b;
    std::cout << a + c << "\\n";
    return 0;
}
""",
        lang="cpp",
    ),
    # Counting 1..n, one line every 0.1 s: correct, but slower than a 0.5 s limit.
    "count_slow": _answer(
        "This prints the numbers one by one (slowly, but correctly):",
        """
import time

n = int(input())
for i in range(1, n + 1):
    print(i)
    time.sleep(0.1)
""",
    ),
    # Slow and wrong from the first line: its partial output is not a prefix.
    "count_slow_wrong": _answer(
        "Counting from zero:",
        """
import time

n = int(input())
for i in range(n):
    print(i)
    time.sleep(0.1)
""",
    ),
    "loop_silent": _answer(
        "This waits for the answer to converge:",
        """
x = 0
while True:
    x = (x * 31 + 7) % 1000003
""",
    ),
    "crash": _answer(
        "Sum of the list:",
        """
values = [int(v) for v in input().split()]
print(values[len(values)])
""",
    ),
    "memory_hog": _answer(
        "Precompute everything first:",
        """
table = []
while True:
    table.append(bytearray(8 * 1024 * 1024))
""",
    ),
    "output_flood": _answer(
        "Print the answer (with some debugging output):",
        """
while True:
    print("debug " * 100)
""",
    ),
    "fork_bomb": _answer(
        "Use all the processes we can get:",
        """
import os

while True:
    try:
        os.fork()
    except OSError:
        pass
""",
    ),
    # Tries a TCP connection (to the loopback only) and reports what happened.
    "network": _answer(
        "Fetch the data from the service:",
        """
import errno
import socket

try:
    socket.create_connection(("127.0.0.1", 9), timeout=2).close()
    print("connected")
except OSError as exc:
    if exc.errno == errno.ENETUNREACH:
        print("network unreachable")
    elif exc.errno == errno.ECONNREFUSED:
        print("connection refused")
    else:
        print("error", errno.errorcode.get(exc.errno or 0, exc.errno))
""",
    ),
    # HumanEval style: a function checked by the instance's test code.
    "add_function": _answer(
        "Here is the function:",
        '''
def add(x: int, y: int) -> int:
    """Add two numbers x and y."""
    return x + y
''',
    ),
    "add_function_wrong": _answer(
        "Here is the function:",
        """
def add(x: int, y: int) -> int:
    return x + y + 1
""",
    ),
}
