"""Find the program in a model's answer.

Models wrap code in Markdown fences, often several (a solution, then a usage example, or a
first try and a corrected one). The rule, in order:

1. fenced blocks whose tag names the wanted language (the ``language`` option), or any
   supported language when no option is given;
2. else untagged fenced blocks;
3. else any fenced block at all (run as the wanted language);
4. else the whole answer.

Among the candidates the longest block wins, ties going to the last one. An unterminated
fence (an answer cut off by ``max_tokens``) runs to the end of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Fence tag (lower case) -> language name used by the runner.
LANGUAGE_TAGS: dict[str, str] = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "cc": "cpp",
    "cxx": "cpp",
    "c": "c",
}

#: Languages the runner knows how to build and run.
LANGUAGES = ("python", "cpp", "c")


@dataclass(frozen=True)
class Block:
    tag: str
    """The fence's info string's first word, lower case ('' when untagged)."""
    source: str


@dataclass(frozen=True)
class Program:
    language: str
    source: str
    origin: str
    """How it was found: ``fence:<tag>``, ``fence`` (untagged) or ``whole answer``."""
    blocks: int
    """Number of fenced blocks in the answer."""


def fenced_blocks(text: str) -> list[Block]:
    """All fenced code blocks (three or more backticks) in order of appearance."""
    blocks: list[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fence = len(stripped) - len(stripped.lstrip("`"))
            info = stripped[fence:].strip()
            tag = info.split()[0].lower() if info else ""
            body: list[str] = []
            i += 1
            while i < len(lines):
                closing = lines[i].strip()
                if closing.startswith("`" * fence) and not closing.strip("`"):
                    break
                body.append(lines[i])
                i += 1
            blocks.append(Block(tag, "\n".join(body)))
        i += 1
    return blocks


def _pick(blocks: list[Block]) -> Block:
    # Longest wins; on a tie the later block (a corrected version) wins.
    return max(reversed(blocks), key=lambda b: len(b.source.strip()))


def extract_program(answer: str, language: str | None = None) -> Program:
    """The program to run and its language (see the module docstring for the rule).

    ``language`` is the suite's ``language`` option; without it the chosen block's tag
    decides, and untagged code is Python.
    """
    blocks = fenced_blocks(answer)
    if language is not None:
        tiers = [
            [b for b in blocks if LANGUAGE_TAGS.get(b.tag) == language],
            [b for b in blocks if not b.tag],
            blocks,
        ]
    else:
        tiers = [[b for b in blocks if b.tag in LANGUAGE_TAGS], [b for b in blocks if not b.tag]]
    for candidates in tiers:
        if candidates:
            block = _pick(candidates)
            lang = language or LANGUAGE_TAGS.get(block.tag, "python")
            origin = f"fence:{block.tag}" if block.tag else "fence"
            return Program(lang, block.source.strip("\n") + "\n", origin, len(blocks))
    return Program(language or "python", answer.strip("\n") + "\n", "whole answer", len(blocks))
