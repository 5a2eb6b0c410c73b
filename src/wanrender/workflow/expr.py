"""A tiny arithmetic evaluator for math-expression nodes (frames = floor(a * b + 1)).

Workflow files come from strangers: an expression is parsed by hand, never given to
``eval``. Grammar: numbers, the variables a, b, c (d too), + - * / // % **, unary
minus, parentheses and the calls floor, ceil, round, min, max, abs, int, float.
"""

from __future__ import annotations

import math
import re

from wanrender.errors import WanrenderError

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|([A-Za-z_]\w*)|(\*\*|//|[-+*/%(),]))")
_FUNCS = {
    "floor": (1, 1, math.floor), "ceil": (1, 1, math.ceil), "round": (1, 2, round), "abs": (1, 1, abs),
    "min": (1, 8, min), "max": (1, 8, max), "int": (1, 1, int), "float": (1, 1, float),
}  # fmt: skip
_MAX_POWER = 64  # keeps a hostile 9**9**9 from taking the CPU for minutes


class ExprError(WanrenderError):
    pass


def evaluate(text: str, variables: dict[str, float | int]) -> float | int:
    """The value of ``text`` with ``variables``; ExprError (one line) when it is not valid."""
    tokens = _tokenize(text)
    parser = _Parser(tokens, variables, text)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise ExprError(f"expression {text!r}: unexpected {tokens[parser.pos][1]!r} — use arithmetic on a, b, c")
    return value


def _tokenize(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, text = 0, str(text).replace("\n", " ")
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(f"expression {text!r}: cannot read {text[pos:].strip()[:10]!r} — use + - * / // % ** and "
                            "floor/ceil/round/min/max on a, b, c")  # fmt: skip
        num, name, op = m.groups()
        out.append(("num", num) if num else ("name", name) if name else ("op", op))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent; precedence: + - < * / // % < unary - < ** (right-assoc)."""

    def __init__(self, tokens: list[tuple[str, str]], variables: dict, text: str) -> None:
        self.tokens, self.vars, self.text, self.pos = tokens, variables, text, 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def _take(self, op: str) -> bool:
        if self.pos < len(self.tokens) and self.tokens[self.pos] == ("op", op):
            self.pos += 1
            return True
        return False

    def _fail(self, what: str) -> ExprError:
        return ExprError(f"expression {self.text!r}: {what} — use arithmetic on a, b, c")

    def expr(self):
        value = self.term()
        while True:
            if self._take("+"):
                value = value + self.term()
            elif self._take("-"):
                value = value - self.term()
            else:
                return value

    def term(self):
        value = self.unary()
        while True:
            op = next((o for o in ("*", "//", "/", "%") if self._take(o)), None)
            if op is None:
                return value
            rhs = self.unary()
            if op != "*" and rhs == 0:
                raise self._fail("division by zero")
            if op == "*":
                value = value * rhs
            elif op == "//":
                value = value // rhs
            elif op == "/":
                value = value / rhs
            else:
                value = value % rhs

    def unary(self):
        if self._take("-"):
            return -self.unary()
        if self._take("+"):
            return self.unary()
        return self.power()

    def power(self):
        base = self.atom()
        if self._take("**"):
            exponent = self.unary()
            if abs(exponent) > _MAX_POWER:
                raise self._fail(f"exponent {exponent} is too large")
            return base**exponent
        return base

    def atom(self):
        if self.pos >= len(self.tokens):
            raise self._fail("it ends early")
        kind, text = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "op" and text == "(":
            value = self.expr()
            if not self._take(")"):
                raise self._fail("a parenthesis is not closed")
            return value
        if kind == "name" and self._peek() == "(":
            if text not in _FUNCS:
                raise self._fail(f"unknown function {text!r}")
            self.pos += 1
            args = [self.expr()]
            while self._take(","):
                args.append(self.expr())
            if not self._take(")"):
                raise self._fail("a call is not closed")
            lo, hi, fn = _FUNCS[text]
            if not lo <= len(args) <= hi:
                raise self._fail(f"{text} takes {lo}..{hi} arguments")
            return fn(*args)
        if kind == "name":
            if text not in self.vars or self.vars[text] is None:
                raise self._fail(f"{text!r} has no value (connect it, or use a number)")
            return self.vars[text]
        raise self._fail(f"unexpected {text!r}")
