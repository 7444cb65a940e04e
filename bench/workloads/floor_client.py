"""The floor a server allows: the workload's requests from a minimal client, no runner.

``python floor_client.py BASE_URL N C``: N chat calls (the same messages every side sends,
``gen.messages``), at most C at once, from one asyncio process with ``aiohttp`` (C-accelerated
HTTP parsing; no SDK, no scoring, no storage, no processes). What it takes over N*L/C is the
server's own cost (its CPU, the waves of answers arriving together) plus a lean client's: no
runner can expect to do better on that server, so ``bench/run.py`` prints it beside the
ideal, and a peer's time over it is the most any ratio to that peer can be in that run.
Exits 1 if any call did not get an HTTP 200.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
from gen import MAX_TOKENS, MODEL, messages  # run by path from this folder


async def _main(base_url: str, n: int, c: int) -> int:
    url = base_url.rstrip("/") + "/chat/completions"
    gate = asyncio.Semaphore(c)
    failed = 0
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            nonlocal failed
            body = {"model": MODEL, "messages": messages(i), "max_tokens": MAX_TOKENS}
            async with gate, session.post(url, json=body) as response:
                await response.json()
                failed += response.status != 200

        await asyncio.gather(*(one(i) for i in range(n)))
    return failed


def main(argv: list[str]) -> int:
    base_url, n, c = argv[0], int(argv[1]), int(argv[2])
    start = time.perf_counter()
    failed = asyncio.run(_main(base_url, n, c))
    print(f"{n - failed} of {n} calls answered in {time.perf_counter() - start:.2f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
