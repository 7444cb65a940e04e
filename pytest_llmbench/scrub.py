"""The one scrubber for secrets: every text that can carry bytes from a server goes through it.

A server (or a proxy, or a model) may echo the API key anywhere: an error body, a header it
quotes back, a stream event, an invalid JSON event quoted in our message. ``scrub(text)``
removes, in any letter case:

* every API key known to this process (``add_secret``; the plugin adds each model's key
  when it reads it from the environment, and the API layer the key of every call), and any
  run of 12 or more characters that is a prefix or a suffix of one (a key cut by a
  truncation, or split across two chunks of which only one is quoted);
* whatever follows ``Bearer`` and an ``api-key``/``api_key``/``x-api-key`` label (in
  error texts and logs; not in a model's answer, where ``api_key = ...`` is code to judge).

Used by the API layer for error texts, by the provider for stored answer fields and by the
runner's log lines; tested by a server that echoes the key every way it can
(``tests/test_secrets.py``).
"""

from __future__ import annotations

import re

__all__ = ["MIN_PART", "add_secret", "scrub"]

MIN_PART = 12
"""A prefix or suffix of a key this long or longer is treated as the key."""
MASK = "***"

_secrets: set[str] = set()
_LABELLED = re.compile(
    r"(?i)(\bbearer\s+|\b(?:x-)?api[-_]?key\b[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}\]]+")


def add_secret(key: str | None) -> None:
    """Remember ``key`` (keys shorter than 8 characters are ignored: they are no secret
    worth hiding, and masking them would mangle ordinary text)."""
    if key and len(key) >= 8:
        _secrets.add(key.lower())


def _mask_key(text: str, low: str, key: str) -> tuple[str, str]:
    """Mask every occurrence of ``key`` and of its 12+-character prefixes/suffixes."""
    if len(key) <= MIN_PART:
        spans = [(m.start(), m.end()) for m in re.finditer(re.escape(key), low)]
    else:
        spans = []
        head, tail = key[:MIN_PART], key[-MIN_PART:]
        start = low.find(head)
        while start >= 0:  # a prefix: extend while the text goes on like the key
            end = start + MIN_PART
            while end < len(low) and end - start < len(key) and low[end] == key[end - start]:
                end += 1
            spans.append((start, end))
            start = low.find(head, end)
        start = low.find(tail)
        while start >= 0:  # a suffix: extend backwards
            end = start + MIN_PART
            begin = start
            while begin > 0 and end - begin < len(key) and low[begin - 1] == key[-(end - begin) - 1]:
                begin -= 1
            spans.append((begin, end))
            start = low.find(tail, end)
    if not spans:
        return text, low
    spans.sort()
    out, lout, pos = [], [], 0
    for begin, end in spans:
        if end <= pos:
            continue
        begin = max(begin, pos)
        out.append(text[pos:begin] + MASK)
        lout.append(low[pos:begin] + MASK)
        pos = end
    out.append(text[pos:])
    lout.append(low[pos:])
    return "".join(out), "".join(lout)


def scrub(text: str, *keys: str | None, labelled: bool = True) -> str:
    """``text`` without the known keys, ``keys`` and (``labelled``) whatever follows
    ``Bearer``/``api-key``. A model's answer is scrubbed with ``labelled=False``: code that
    says ``api_key = ...`` is an answer to judge, not a leak."""
    if not text:
        return text
    low = text.lower()
    extra = {k.lower() for k in keys if k and len(k) >= 8}
    for key in _secrets | extra:
        if key[:MIN_PART] in low or key[-MIN_PART:] in low:
            text, low = _mask_key(text, low, key)
    if labelled and ("bearer" in low or "api" in low):
        text = _LABELLED.sub(lambda m: m.group(1) + MASK, text)
    return text
