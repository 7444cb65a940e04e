"""``{{ name }}`` placeholders in suite prompts.

The syntax is deliberately tiny: a placeholder is two braces, optional whitespace, an
identifier, optional whitespace, two braces. Everything else is literal text, so single
braces (JSON, code, ``str.format`` examples) and double braces around anything that is not
an identifier (C++ ``{{}}`` initialisers, Jinja expressions) need no escaping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pytest_llmbench.errors import LLMBenchError

__all__ = ["PLACEHOLDER", "TemplateError", "find_placeholders", "render", "to_text"]

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
"""A placeholder; group 1 is the variable name."""


class TemplateError(LLMBenchError, KeyError):
    """A placeholder has no value. A ``KeyError`` too, so ``except KeyError`` keeps working."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        # KeyError.__str__ would print the repr of the argument; say what is wrong instead.
        return f"no value for placeholder {{{{{self.name}}}}}"

    def __reduce__(self) -> tuple[type[TemplateError], tuple[str]]:
        return (type(self), (self.name,))


def find_placeholders(text: str) -> list[str]:
    """The variable names used in ``text``, each once, in order of first use."""
    return list(dict.fromkeys(m.group(1) for m in PLACEHOLDER.finditer(text)))


def to_text(value: object) -> str:
    """A variable's value as inserted into a prompt.

    ``str()``, except booleans, which are written as in TOML (``true``/``false``) so a
    prompt reads the same as the suite file that produced it.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(text: str, variables: Mapping[str, object]) -> str:
    """Replace every placeholder in ``text``; raise ``TemplateError`` for a missing one."""
    if "{{" not in text:
        return text

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        try:
            value = variables[name]
        except KeyError:
            raise TemplateError(name) from None
        return to_text(value)

    return PLACEHOLDER.sub(substitute, text)
