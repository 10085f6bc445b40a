"""The ``deprecation_filter`` of a backfill, as far as the stand-in Orb evaluates it."""

from __future__ import annotations

import re
from typing import Any

_FILTER_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?)"
    r"|'(?P<str>(?:[^']|'')*)'"
    r"|(?P<op><=|>=|<>|!=|==|=|<|>|\(|\)|,)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"
)
_FILTER_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE"}


class FilterSyntaxError(ValueError):
    """A ``deprecation_filter`` outside the subset the stand-in evaluates."""


def _filter_tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _FILTER_TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise FilterSyntaxError(f"cannot read {text[pos:]!r}")
        pos = m.end()
        if m.group("num") is not None:
            num = m.group("num")
            out.append(("lit", float(num) if "." in num else int(num)))
        elif m.group("str") is not None:
            out.append(("lit", m.group("str").replace("''", "'")))
        elif m.group("op") is not None:
            out.append(("op", "=" if m.group("op") == "==" else m.group("op")))
        else:
            word = m.group("word")
            upper = word.upper()
            if upper in ("TRUE", "FALSE"):
                out.append(("lit", upper == "TRUE"))
            elif upper in _FILTER_KEYWORDS:
                out.append(("kw", upper))
            else:
                out.append(("name", word))
    return out


def _compare(op: str, left: Any, right: Any) -> bool | None:
    """SQL-style: None (unknown) when either side is missing or the types differ."""
    if left is None or right is None:
        return None
    numeric = (int, float)
    if isinstance(left, bool) or isinstance(right, bool):
        if not (isinstance(left, bool) and isinstance(right, bool)) or op not in ("=", "!=", "<>"):
            return None
    elif isinstance(left, numeric) and isinstance(right, numeric):
        pass
    elif not (isinstance(left, str) and isinstance(right, str)):
        return None
    if op == "=":
        return bool(left == right)
    if op in ("!=", "<>"):
        return bool(left != right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


def _and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _or(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


class DeprecationFilter:
    """The part of Orb's boolean computed properties the stand-in evaluates.

    Orb's ``deprecation_filter`` is "a boolean computed property" (``NewBackfill`` in
    Orb's spec; examples ``my_numeric_property > 100 AND my_other_property = 'bar'`` and
    ``my_property = 'foo'``). The stand-in reads comparisons (``= != <> < <= > >=``)
    between event property names and literals (numbers, ``'strings'``, ``true``/``false``),
    ``name IN (literal, ...)``, ``name IS [NOT] NULL``, ``AND``/``OR``/``NOT`` and
    parentheses, with SQL's three-valued logic (a missing property or mismatched types
    is unknown, and only true matches). :meth:`parse` raises :class:`FilterSyntaxError`
    for anything else.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._tokens = _filter_tokens(text)
        self._pos = 0
        self._tree = self._expr()
        if self._pos != len(self._tokens):
            raise FilterSyntaxError(f"unexpected {self._tokens[self._pos][1]!r}")

    @classmethod
    def parse(cls, text: str) -> DeprecationFilter:
        return cls(text)

    # recursive descent ------------------------------------------------

    def _peek(self) -> tuple[str, Any] | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _take(self, kind: str, value: Any = None) -> Any:
        tok = self._peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            want = value if value is not None else kind
            got = "the end" if tok is None else repr(tok[1])
            raise FilterSyntaxError(f"expected {want!r}, got {got}")
        self._pos += 1
        return tok[1]

    def _is(self, kind: str, value: Any) -> bool:
        tok = self._peek()
        return tok is not None and tok[0] == kind and tok[1] == value

    def _expr(self) -> Any:
        node = self._conj()
        while self._is("kw", "OR"):
            self._pos += 1
            node = ("or", node, self._conj())
        return node

    def _conj(self) -> Any:
        node = self._neg()
        while self._is("kw", "AND"):
            self._pos += 1
            node = ("and", node, self._neg())
        return node

    def _neg(self) -> Any:
        if self._is("kw", "NOT"):
            self._pos += 1
            return ("not", self._neg())
        if self._is("op", "("):
            self._pos += 1
            node = self._expr()
            self._take("op", ")")
            return node
        return self._comparison()

    def _operand(self) -> Any:
        tok = self._peek()
        if tok is None or tok[0] not in ("name", "lit"):
            raise FilterSyntaxError(
                "expected a property name or a literal, got "
                + ("the end" if tok is None else repr(tok[1]))
            )
        self._pos += 1
        return tok

    def _comparison(self) -> Any:
        left = self._operand()
        if self._is("kw", "IS"):
            self._pos += 1
            negate = self._is("kw", "NOT")
            if negate:
                self._pos += 1
            self._take("kw", "NULL")
            return ("isnull", left, negate)
        if self._is("kw", "IN"):
            self._pos += 1
            self._take("op", "(")
            items = [self._take("lit")]
            while self._is("op", ","):
                self._pos += 1
                items.append(self._take("lit"))
            self._take("op", ")")
            return ("in", left, items)
        op = self._take("op")
        if op not in ("=", "!=", "<>", "<", "<=", ">", ">="):
            raise FilterSyntaxError(f"expected a comparison operator, got {op!r}")
        return ("cmp", op, left, self._operand())

    # evaluation ---------------------------------------------------------

    def matches(self, properties: dict[str, Any]) -> bool:
        """Whether an event with these properties is one the filter deprecates."""
        return self._eval(self._tree, properties) is True

    def _value(self, operand: tuple[str, Any], props: dict[str, Any]) -> Any:
        return props.get(operand[1]) if operand[0] == "name" else operand[1]

    def _eval(self, node: Any, props: dict[str, Any]) -> bool | None:
        kind = node[0]
        if kind == "or":
            return _or(self._eval(node[1], props), self._eval(node[2], props))
        if kind == "and":
            return _and(self._eval(node[1], props), self._eval(node[2], props))
        if kind == "not":
            inner = self._eval(node[1], props)
            return None if inner is None else not inner
        if kind == "isnull":
            missing = self._value(node[1], props) is None
            return not missing if node[2] else missing
        if kind == "in":
            value = self._value(node[1], props)
            result: bool | None = False
            for item in node[2]:
                result = _or(result, _compare("=", value, item))
            return result
        return _compare(node[1], self._value(node[2], props), self._value(node[3], props))
