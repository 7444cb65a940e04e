"""Arithmetic for the rule-based model: find an expression in a question and compute it.

The expression is parsed with ``ast`` and only numeric literals, ``+ - * / // % **`` and
unary signs are evaluated, with bounds on sizes: a prompt can never run code or exhaust the
simulator's memory. Verbal forms (``add 5 to that``, ``the product of 3 and 4``) and
references to the previous answer (``that``, ``it``, ``the result``) make multi-turn
conversations possible.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

__all__ = ["ArithError", "compute", "evaluate", "find_expression", "format_number",
           "last_number"]

Number = int | float


class ArithError(ValueError):
    """Not an expression we evaluate (syntax, disallowed node, too large, division by 0)."""


_BINOPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
MAX_EXPR_CHARS = 200
MAX_INT_BITS = 4096


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        if isinstance(node.value, bool):
            raise ArithError("not a number: a boolean")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        result = _BINOPS[type(node.op)](left, right)
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise ArithError("result too large")
        if isinstance(result, complex):
            raise ArithError("complex result")
        return result
    raise ArithError(f"not allowed in an expression: {type(node).__name__}")


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > 10_000:
        raise ArithError("exponent too large")
    if abs(base) > 1 and abs(exponent) * math.log2(abs(base)) > MAX_INT_BITS:
        raise ArithError("power too large")


def evaluate(expr: str) -> Number:
    """The value of a numeric expression such as ``(2 + 3) * 4.5`` or ``2 ** 10``."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ArithError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _eval(tree.body)
    except (SyntaxError, ZeroDivisionError, OverflowError, TypeError, ValueError) as exc:
        raise ArithError(str(exc)) from None


def format_number(value: Number) -> str:
    """``25`` for 25.0, ``3.5``, ``0.3333333333``: what a careful model would write."""
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(round(value, 10))


_NUMBER = r"-?\d+(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_REFERENCE = (r"(?:your (?:previous |last )?answer|the (?:previous |last )?(?:answer|result)"
              r"|that(?: number| result)?|it|this)")
_REFERENCE_RE = re.compile(rf"\b{_REFERENCE}\b")
_OPERAND = rf"({_NUMBER}|{_REFERENCE})"

_WORD_OPS = [
    (re.compile(r"\bmultiplied by\b"), "*"),
    (re.compile(r"\bdivided by\b"), "/"),
    (re.compile(r"\bto the power of\b"), "**"),
    (re.compile(r"\bplus\b"), "+"),
    (re.compile(r"\bminus\b"), "-"),
    (re.compile(r"\btimes\b"), "*"),
    (re.compile(r"\bmod(?:ulo)?\b"), "%"),
    (re.compile(r"\bsquared\b"), "**2"),
    (re.compile(r"\bcubed\b"), "**3"),
    (re.compile(r"(?<=[\d)])\s*[x×]\s*(?=[\d(])"), "*"),
    (re.compile(r"÷"), "/"),
    (re.compile(r"[−–]"), "-"),
    (re.compile(r"\^"), "**"),
]

_VERBAL: list[tuple[re.Pattern[str], Callable[[Number, Number], Number]]] = [
    (re.compile(rf"\badd {_OPERAND} (?:and|to) {_OPERAND}"), operator.add),
    (re.compile(rf"\bsubtract {_OPERAND} from {_OPERAND}"), lambda a, b: b - a),
    (re.compile(rf"\bmultiply {_OPERAND} (?:by|and|with) {_OPERAND}"), operator.mul),
    (re.compile(rf"\bdivide {_OPERAND} by {_OPERAND}"), operator.truediv),
    (re.compile(rf"\bsum of {_OPERAND} and {_OPERAND}"), operator.add),
    (re.compile(rf"\bproduct of {_OPERAND} and {_OPERAND}"), operator.mul),
    (re.compile(rf"\bdifference (?:between|of) {_OPERAND} and {_OPERAND}"), operator.sub),
    (re.compile(rf"\bquotient of {_OPERAND} and {_OPERAND}"), operator.truediv),
]
_VERBAL_ONE: list[tuple[re.Pattern[str], Callable[[Number], Number]]] = [
    (re.compile(rf"\bdouble {_OPERAND}"), lambda a: a * 2),
    (re.compile(rf"\btriple {_OPERAND}"), lambda a: a * 3),
    (re.compile(rf"\bhalve {_OPERAND}"), lambda a: a / 2),
    (re.compile(rf"\bsquare {_OPERAND}"), lambda a: a * a),
    (re.compile(rf"\bsquare root of {_OPERAND}"), math.sqrt),
]

_TRIGGER_RE = re.compile(
    r"\b(?:what is|what's|whats|compute|calculate|evaluate|how much is|work out|solve)\s*:?\s*"
    r"(.+?)\s*(?:\?|=|\.(?=\s|$)|\n|$)")
_EXPR_CHARS_RE = re.compile(r"[\d\s.+\-*/%()]+")


def last_number(text: str | None) -> Number | None:
    """The last number written in ``text`` (a previous answer), or ``None``."""
    if not text:
        return None
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() and "." not in found[-1] else value


def _operand(token: str, previous: Number | None) -> Number:
    if _REFERENCE_RE.fullmatch(token):
        if previous is None:
            raise ArithError("no previous answer to refer to")
        return previous
    value = float(token)
    return int(value) if "." not in token else value


def _verbal(text: str, previous: Number | None) -> Number | None:
    for pattern, binary in _VERBAL:
        match = pattern.search(text)
        if match:
            try:
                return binary(_operand(match.group(1), previous),
                              _operand(match.group(2), previous))
            except ZeroDivisionError:
                raise ArithError("division by zero") from None
    for pattern, unary in _VERBAL_ONE:
        match = pattern.search(text)
        if match:
            try:
                return unary(_operand(match.group(1), previous))
            except ValueError:
                raise ArithError("square root of a negative number") from None
    return None


def compute(question: str, previous: str | None = None) -> Number | None:
    """The number a question asks for, or ``None`` if it is not an arithmetic question.

    ``previous`` is the model's previous answer, for ``that`` / ``the result`` references.
    Raises ``ArithError`` when it is arithmetic but cannot be computed (``1 / 0``).
    """
    text = question.lower()
    prev = last_number(previous)
    value = _verbal(text, prev)
    if value is not None:
        return value
    expression = find_expression(text, prev)
    return None if expression is None else evaluate(expression)


def find_expression(question: str, previous: Number | None = None) -> str | None:
    """The symbolic expression a question asks for (word operators replaced, references to
    ``previous`` filled in), e.g. ``12 * 7`` for ``What is 12 times 7?``; ``None`` if none."""
    text = question.lower()
    for pattern, symbol in _WORD_OPS:
        text = pattern.sub(symbol, text)
    if previous is not None:
        text = _REFERENCE_RE.sub(f"({format_number(previous)})", text)
    candidates = [m.group(1) for m in _TRIGGER_RE.finditer(text)]
    candidates.append(text.strip().rstrip("?=.! "))
    for candidate in candidates:
        candidate = candidate.strip()
        if (candidate and _EXPR_CHARS_RE.fullmatch(candidate)
                and any(c.isdigit() for c in candidate)):
            return candidate
    return None
