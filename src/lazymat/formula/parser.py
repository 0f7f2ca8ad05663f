"""Read KeOps formula strings and alias strings.

KeOps evaluates its formula strings as Python; this module reads the same
language with a tokenizer and an operator-precedence parser instead, so user
text is never executed (no ``eval``/``exec``), every mistake is reported with
its position, and the parser keeps its own stacks rather than recursing, so the
deep formulas that ``to_string`` prints for large expressions read back too.

>>> from lazymat.formula import Var
>>> x, y = Var(0, 3, 0), Var(1, 3, 1)
>>> parse_formula("Exp(-SqDist(x, y) / 2)", {"x": x, "y": y}).op
'Exp'
>>> parse_alias("x = Vi(0, 3)")
('x', 0, 3, 0)
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Union

from ..errors import FormulaSyntaxError, LazymatError, ShapeError
from .node import (
    I_CAT,
    J_CAT,
    MACROS,
    MAX_DIM,
    OPS,
    P_CAT,
    Const,
    Node,
    Var,
    apply,
    as_node,
    int_param_slots,
)

__all__ = ["parse_formula", "parse_alias", "MAX_POSITION"]

#: The largest argument position a variable may name (Vi(position, dim)): a Genred call with
#: that many arguments is far beyond real use, and a bound keeps a tiny string from asking
#: for a huge argument list. Integer literals that fill an op's integer parameter slots (its
#: ``int_params``) are bounded by the op's registry (MAX_INT_PARAM, MAX_DIM).
MAX_POSITION = 2**16 - 1

# Variable spellings: name -> (category, replacement if deprecated).
_VAR_KINDS: dict[str, tuple[int, str | None]] = {
    "Vi": (I_CAT, None), "Vj": (J_CAT, None), "Pm": (P_CAT, None),
    "Vx": (I_CAT, "Vi"), "Vy": (J_CAT, "Vj"),
}
_CURRENT_VAR_KINDS = [k for k, (_, new) in _VAR_KINDS.items() if new is None]

# Binary operators: precedence and right-associativity, as in Python.
_BINARY: dict[str, tuple[int, bool]] = {
    "<": (1, False), ">": (1, False), "<=": (1, False), ">=": (1, False),
    "|": (2, False),
    "+": (3, False), "-": (3, False),
    "*": (4, False), "/": (4, False),
    "**": (6, True),
}
_UNARY_PREC = 5  # between * / and **: -x**2 is -(x**2), -x*y is (-x)*y
_COMPARISON_PREC = 1

_NUMBER = re.compile(r"(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TWO_CHAR = ("**", "<=", ">=", "==", "!=")
_ONE_CHAR = "+-*/|<>()[],="
_SPACE = " \t\r\n\f\v"
_WINDOW = 60  # characters shown either side of an error in long texts

# A parsed operand: a formula, an integer literal (kept as int so it can fill an
# integer parameter slot) or an integer list literal.
_Value = Union[Node, int, tuple]


# --------------------------------------------------------------------------- errors

def _excerpt(text: str, pos: int) -> str:
    """The text on one line with a caret under ``pos`` (trimmed when long)."""
    start, prefix, suffix = 0, "", ""
    if len(text) > 2 * _WINDOW + 20:
        start = max(0, pos - _WINDOW)
        end = min(len(text), pos + _WINDOW)
        prefix = "..." if start > 0 else ""
        suffix = "..." if end < len(text) else ""
        text = text[start:end]
    # One display character per source character keeps the caret aligned.
    shown = "".join(" " if c in _SPACE else (c if c.isprintable() else "?") for c in text)
    col = len(prefix) + pos - start
    return f"  {prefix}{shown}{suffix}\n  {' ' * col}^"


def _syntax_error(text: str, pos: int, message: str, what: str,
                  hint: str = "") -> FormulaSyntaxError:
    full = f"{message} at position {pos} in {what}:\n{_excerpt(text, pos)}"
    if hint:
        full += f"\n{hint}"
    err = FormulaSyntaxError(full)
    err.position = pos  # type: ignore[attr-defined]
    err.text = text  # type: ignore[attr-defined]
    return err


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(close)}?" if close else ""


# --------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class _Tok:
    kind: str  # "int", "float", "name", "op" or "end"
    text: str
    pos: int

    def is_op(self, *texts: str) -> bool:
        return self.kind == "op" and self.text in texts

    def describe(self) -> str:
        if self.kind == "end":
            return "end of text"
        if self.kind == "name":
            return f"name '{self.text}'"
        if self.kind in ("int", "float"):
            return f"number {self.text}"
        return f"'{self.text}'"


class _Lexer:
    """Tokens on demand, so errors come out in the order they appear in the text."""

    def __init__(self, text: str, what: str):
        self.text, self.what = text, what
        self.i = 0
        self._peeked: _Tok | None = None

    def peek(self) -> _Tok:
        if self._peeked is None:
            self._peeked = self._scan()
        return self._peeked

    def next(self) -> _Tok:
        tok = self.peek()
        self._peeked = None
        return tok

    def error(self, pos: int, message: str, hint: str = "") -> FormulaSyntaxError:
        return _syntax_error(self.text, pos, message, self.what, hint)

    def _scan(self) -> _Tok:
        text, n = self.text, len(self.text)
        i = self.i
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n:
            self.i = n
            return _Tok("end", "", n)
        c = text[i]
        if c.isascii() and (c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit())):
            m = _NUMBER.match(text, i)
            assert m is not None
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] in "_."):
                raise self.error(i, f"invalid number '{text[i:end + 1]}'")
            self.i = end
            literal = m.group()
            is_int = all(ch.isdigit() for ch in literal)
            return _Tok("int" if is_int else "float", literal, i)
        m = _NAME.match(text, i)
        if m is not None:
            self.i = m.end()
            return _Tok("name", m.group(), i)
        if text.startswith(_TWO_CHAR, i):
            self.i = i + 2
            return _Tok("op", text[i:i + 2], i)
        if c in _ONE_CHAR:
            self.i = i + 1
            return _Tok("op", c, i)
        raise self.error(i, f"unexpected character {c!r}")


# --------------------------------------------------------------------------- formulas

@dataclass
class _Call:
    name: str
    pos: int
    open_pos: int  # of its '(' (for "never closed")
    args: list[tuple[_Value, int]] = field(default_factory=list)  # (value, position)


def _reject_equality(lx: _Lexer, tok: _Tok) -> None:
    if tok.is_op("==", "!="):
        op = "Equal" if tok.text == "==" else "NotEqual"
        raise lx.error(tok.pos, f"'{tok.text}' is not a formula operator",
                       f"KeOps strings compare formulas structurally with '{tok.text}'; "
                       f"write {op}(a, b) for the elementwise test")


@functools.lru_cache(maxsize=None)
def _arg_counts(fn: Callable) -> tuple[int, int | None]:
    """(fewest, most) positional arguments a macro accepts; most is None if unbounded."""
    fewest, most = 0, 0
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return fewest, None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            most += 1
            if p.default is p.empty:
                fewest += 1
    return fewest, most


def _plural(n: int, word: str = "argument") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class _FormulaParser:
    def __init__(self, text: str, names: dict[str, Any]):
        self.text = text
        self.names = names
        self.lx = _Lexer(text, "formula")

    def error(self, pos: int, message: str, hint: str = "") -> FormulaSyntaxError:
        return self.lx.error(pos, message, hint)

    def shape_error(self, err: ShapeError, what: str, pos: int) -> ShapeError:
        return ShapeError(f"{err}\nin {what} at position {pos} in formula:\n"
                          f"{_excerpt(self.text, pos)}")

    # ---- the operator-precedence loop

    def parse(self) -> Node:
        lx = self.lx
        if lx.peek().kind == "end":
            raise self.error(0, "empty formula")
        operands: list[tuple[_Value, int]] = []
        # Entries: ("un", tok), ("bin", tok), ("paren", tok) or ("call", _Call).
        pending: list[tuple[str, Any]] = []
        want_operand = True
        prev: _Tok | None = None
        while True:
            tok = lx.next()
            _reject_equality(lx, tok)
            if want_operand:
                if tok.is_op("+", "-"):
                    pending.append(("un", tok))
                elif tok.kind == "int":
                    operands.append((int(tok.text), tok.pos))
                    want_operand = False
                elif tok.kind == "float":
                    operands.append((Const(float(tok.text)), tok.pos))
                    want_operand = False
                elif tok.kind == "name" and lx.peek().is_op("("):
                    self.check_callable(tok)
                    call = _Call(tok.text, tok.pos, lx.next().pos)
                    if lx.peek().is_op(")"):
                        lx.next()
                        operands.append((self.build_call(call), call.pos))
                        want_operand = False
                    else:
                        pending.append(("call", call))
                elif tok.kind == "name":
                    operands.append((self.lookup(tok), tok.pos))
                    want_operand = False
                elif tok.is_op("("):
                    pending.append(("paren", tok))
                elif tok.is_op("["):
                    operands.append((self.int_list(), tok.pos))
                    want_operand = False
                elif (tok.is_op(")") and prev is not None and prev.is_op(",")
                      and pending and pending[-1][0] == "call"):
                    # A trailing comma, as Python allows: Extract(x, 0, 2,)
                    call = pending.pop()[1]
                    operands.append((self.build_call(call), call.pos))
                    want_operand = False
                elif tok.kind == "end":
                    raise self.error(tok.pos, "unexpected end of formula")
                else:
                    raise self.error(tok.pos, f"unexpected {tok.describe()}")
            elif tok.kind == "op" and tok.text in _BINARY:
                prec, right_assoc = _BINARY[tok.text]
                while pending and pending[-1][0] in ("un", "bin"):
                    kind, top = pending[-1]
                    top_prec = _UNARY_PREC if kind == "un" else _BINARY[top.text][0]
                    if top_prec < prec or (top_prec == prec and right_assoc):
                        break
                    if prec == _COMPARISON_PREC and top_prec == _COMPARISON_PREC:
                        raise self.error(tok.pos, "chained comparisons are not supported",
                                         "use parentheses, e.g. (a < b) < c")
                    self.reduce(pending, operands)
                pending.append(("bin", tok))
                want_operand = True
            elif tok.is_op(","):
                self.reduce_to_marker(pending, operands)
                if not pending or pending[-1][0] != "call":
                    raise self.error(tok.pos, "unexpected ','",
                                     "commas only separate the arguments of an op call")
                pending[-1][1].args.append(operands.pop())
                want_operand = True
            elif tok.is_op(")"):
                self.reduce_to_marker(pending, operands)
                if not pending:
                    raise self.error(tok.pos, "unmatched ')'")
                kind, marker = pending.pop()
                if kind == "call":
                    marker.args.append(operands.pop())
                    operands.append((self.build_call(marker), marker.pos))
            elif tok.kind == "end":
                self.reduce_to_marker(pending, operands)
                if pending:
                    marker = pending[-1][1]
                    pos = marker.open_pos if isinstance(marker, _Call) else marker.pos
                    raise self.error(pos, "'(' is never closed")
                value, pos = operands.pop()
                return self.formula(value, pos)
            elif tok.kind in ("name", "int", "float") or tok.is_op("(", "["):
                raise self.error(tok.pos, f"unexpected {tok.describe()}",
                                 "an operator (+ - * / ** | < > <= >=) is missing")
            else:
                raise self.error(tok.pos, f"unexpected {tok.describe()}")
            prev = tok

    def reduce(self, pending: list, operands: list) -> None:
        kind, tok = pending.pop()
        if kind == "un":
            value, pos = operands.pop()
            operands.append((self.unary(tok, value, pos), tok.pos))
        else:
            right = operands.pop()
            left = operands.pop()
            operands.append((self.binary(tok, left, right), left[1]))

    def reduce_to_marker(self, pending: list, operands: list) -> None:
        while pending and pending[-1][0] in ("un", "bin"):
            self.reduce(pending, operands)

    def int_list(self) -> tuple[int, ...]:
        """The rest of ``[i, j, ...]`` (the '[' is read): integer literals only."""
        lx = self.lx
        items: list[int] = []
        while True:
            tok = lx.next()
            if tok.is_op("]"):  # "[]" or a trailing comma, as Python allows
                return tuple(items)
            sign = 1
            if tok.is_op("-", "+"):
                sign = -1 if tok.text == "-" else 1
                tok = lx.next()
            if tok.kind != "int":
                raise self.error(tok.pos, f"unexpected {tok.describe()} in a list",
                                 "lists hold integer literals only, e.g. [0, 2]")
            items.append(sign * int(tok.text))
            tok = lx.next()
            if tok.is_op("]"):
                return tuple(items)
            if not tok.is_op(","):
                raise self.error(tok.pos, f"unexpected {tok.describe()} in a list")

    # ---- operands

    def formula(self, value: _Value, pos: int) -> Node:
        """An operand used as a formula: integer literals become constants."""
        if isinstance(value, Node):
            return value
        if isinstance(value, int):
            return Const(value)
        raise self.error(pos, "a list is not a formula",
                         "integer lists are only allowed as op parameters")

    def lookup(self, tok: _Tok) -> Node:
        name = tok.text
        if name in self.names:
            value = self.names[name]
            return value if isinstance(value, Node) else as_node(value)
        if name in ("inf", "nan"):  # printed by to_string for such constants
            return Const(float(name))
        if name in OPS or name in MACROS or name in _SPECIAL or name in _VAR_KINDS:
            raise self.error(tok.pos, f"'{name}' is an op, not a variable",
                             f"call it: {name}(...)")
        raise self.error(tok.pos, f"unknown variable '{name}'",
                         _did_you_mean(name, self.names))

    def check_callable(self, tok: _Tok) -> None:
        name = tok.text
        if name in _SPECIAL or name in _VAR_KINDS or name in MACROS or name in OPS:
            return
        if name in self.names:
            raise self.error(tok.pos, f"'{name}' is a variable, not an op")
        known = list(OPS) + list(MACROS) + list(_SPECIAL) + _CURRENT_VAR_KINDS
        raise self.error(tok.pos, f"unknown op '{name}'", _did_you_mean(name, known))

    def unary(self, tok: _Tok, value: _Value, pos: int) -> _Value:
        if isinstance(value, int):  # keeps -3 usable as an integer parameter
            return -value if tok.text == "-" else value
        node = self.formula(value, pos)
        return -node if tok.text == "-" else node

    def binary(self, tok: _Tok, left: tuple[_Value, int], right: tuple[_Value, int]) -> Node:
        op = tok.text
        a = self.formula(*left)
        try:
            if op == "**":
                return self.power(a, *right)
            b = self.formula(*right)
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            if op == "/":
                return a / b
            if op == "|":
                return apply("Scalprod", a, b)
            if op == "<":
                return apply("LessThan", a, b)
            if op == ">":
                return apply("LessThan", b, a)
            if op == "<=":
                return apply("LessOrEqual", a, b)
            return apply("LessOrEqual", b, a)  # ">="
        except ShapeError as err:
            raise self.shape_error(err, f"'{op}'", tok.pos) from err

    def power(self, base: Node, exponent: _Value, pos: int) -> Node:
        # Python's LazyTensor.__pow__ rules: integer -> Pow, 0.5 -> Sqrt, -0.5 -> Rsqrt.
        if isinstance(exponent, int):
            return apply("Pow", base, exponent)
        e = self.formula(exponent, pos)
        if e.is_const and e.dim == 1:
            v = e.value
            if isinstance(v, Fraction) and v.denominator == 1:
                return apply("Pow", base, int(v))
            if v == 0.5:
                return apply("Sqrt", base)
            if v == -0.5:
                return apply("Rsqrt", base)
        return apply("Powf", base, e)

    # ---- calls

    def build_call(self, call: _Call) -> Node:
        special = _SPECIAL.get(call.name)
        if special is not None:
            return special(self, call)
        if call.name in _VAR_KINDS:
            return self.short_var(call)
        values = self.op_arguments(call)
        try:
            return apply(call.name, *values)
        except ShapeError as err:
            raise self.shape_error(err, call.name, call.pos) from err
        except LazymatError:
            raise
        except (TypeError, KeyError, ValueError, ArithmeticError) as err:
            raise self.error(call.pos, f"bad arguments for {call.name} "
                             f"({type(err).__name__}: {err})") from err

    def op_arguments(self, call: _Call) -> list:
        """Check the argument count and kinds; turn literals into what apply expects."""
        name, args = call.name, call.args
        slots = int_param_slots(name)
        if name in MACROS:
            fewest, most = _arg_counts(MACROS[name])
            n_formulas = None
        else:
            opdef = OPS[name]
            n_formulas = opdef.arity
            if n_formulas is None:
                fewest, most = 0, None
            elif slots or opdef.elementwise:
                fewest = most = n_formulas + len(slots)
            else:
                # Structural ops may take integer parameters after their formulas;
                # their dim rules check them.
                fewest, most = n_formulas, None
        if len(args) < fewest or (most is not None and len(args) > most):
            expected = (f"{fewest}" if most == fewest
                        else f"at least {fewest}" if most is None else f"{fewest} to {most}")
            raise self.error(call.pos, f"{name} takes {expected} "
                             f"argument{'' if expected == '1' else 's'}, got {len(args)}")
        values = []
        for k, (value, pos) in enumerate(args):
            is_param = k in slots if (slots or n_formulas is None) else k >= n_formulas
            if is_param:
                if isinstance(value, Node):
                    raise self.error(pos, f"{name} expects an integer literal as argument "
                                     f"{k + 1}, got a formula")
                values.append(value)
            else:
                values.append(self.formula(value, pos))
        return values

    def int_args(self, call: _Call, count: int, usage: str) -> list[int]:
        if len(call.args) != count:
            raise self.error(call.pos, f"{call.name} takes {_plural(count)}, "
                             f"got {len(call.args)}", f"usage: {usage}")
        out = []
        for k, (value, pos) in enumerate(call.args):
            if not isinstance(value, int):
                raise self.error(pos, f"{call.name} expects an integer literal as "
                                 f"argument {k + 1}", f"usage: {usage}")
            out.append(value)
        return out

    def make_var(self, call: _Call, index: int, dim: int, cat: int) -> Node:
        _check_var(self.lx, call, index, dim, cat)
        return Var(index, dim, cat)

    def var(self, call: _Call) -> Node:
        index, dim, cat = self.int_args(call, 3, "Var(position, dim, category)")
        return self.make_var(call, index, dim, cat)

    def short_var(self, call: _Call) -> Node:
        cat, new = _VAR_KINDS[call.name]
        if new is not None:
            warnings.warn(f"{call.name} is deprecated, use {new}", DeprecationWarning,
                          stacklevel=5)
        index, dim = self.int_args(call, 2, f"{call.name}(position, dim) inside a formula")
        return self.make_var(call, index, dim, cat)

    def intcst(self, call: _Call) -> Node:
        (n,) = self.int_args(call, 1, "IntCst(n)")
        return Const(n)

    def ratcst(self, call: _Call) -> Node:
        p, q = self.int_args(call, 2, "RatCst(numerator, denominator)")
        if q == 0:
            raise self.error(call.args[1][1], "RatCst denominator is 0")
        return Const(Fraction(p, q))

    def zero(self, call: _Call) -> Node:
        (d,) = self.int_args(call, 1, "Zero(dim)")
        if d < 1:
            raise self.error(call.args[0][1], f"Zero needs a dim >= 1, got {d}")
        if d > MAX_DIM:
            raise self.shape_error(ShapeError(f"Zero: the dim is at most {MAX_DIM:,} "
                                              f"(lazymat.formula.MAX_DIM), got {d:,}"),
                                   "Zero", call.args[0][1])
        return Const(0, d)


def _check_var(lx: _Lexer, call: _Call, index: int, dim: int, cat: int) -> None:
    """Reject impossible variables with the position of the offending number; a position or
    dim beyond lazymat's limits is a ShapeError naming the limit."""
    names = ("position", "dim", "category")
    for k, (value, ok, rule) in enumerate(((index, index >= 0, ">= 0"),
                                           (dim, dim >= 1, ">= 1"),
                                           (cat, cat in (I_CAT, J_CAT, P_CAT), "0, 1 or 2"))):
        pos = call.args[k][1] if k < len(call.args) else call.pos
        if not ok:
            raise lx.error(pos, f"a variable's {names[k]} must be {rule}, got {value}")
        limit = (MAX_POSITION, MAX_DIM, None)[k]
        if limit is not None and value > limit:
            raise _limit_error(lx, pos, names[k], value, limit)


def _limit_error(lx: _Lexer, pos: int, what: str, value: int, limit: int) -> ShapeError:
    name = "MAX_POSITION" if what == "position" else "MAX_DIM"
    module = "parser" if what == "position" else ""
    where = f"lazymat.formula.{module + '.' if module else ''}{name}"
    return ShapeError(f"a variable's {what} is at most {limit:,} ({where}), got {value:,}, at "
                      f"position {pos} in {lx.what}:\n{_excerpt(lx.text, pos)}")


_SPECIAL: dict[str, Callable[[_FormulaParser, _Call], Node]] = {
    "Var": _FormulaParser.var,
    "IntCst": _FormulaParser.intcst,
    "RatCst": _FormulaParser.ratcst,
    "Zero": _FormulaParser.zero,
}


def parse_formula(text: str, names: dict[str, Node] | None = None) -> Node:
    """Parse a KeOps formula string into a (hash-consed) formula node.

    ``names`` maps alias names to formulas (usually variables). Python's
    operator precedence applies; ``|`` is the dot product.

    >>> from lazymat.formula import Var
    >>> x = Var(0, 3, 0)
    >>> parse_formula("Sum(Square(x - Vj(1, 3)))", {"x": x})
    Sum(Square(Subtract(Var(0,3,0), Var(1,3,1))))

    Raises FormulaSyntaxError (with the position and a caret) on bad text and
    ShapeError when operand dims do not fit.
    """
    if not isinstance(text, str):
        raise TypeError(f"a formula must be a string, got {type(text).__name__}")
    return _FormulaParser(text, dict(names or {})).parse()


# --------------------------------------------------------------------------- aliases

def parse_alias(text: str) -> tuple[str | None, int | None, int, int]:
    """Parse an alias string into ``(name, position or None, dim, category)``.

    >>> parse_alias("x = Vi(3)")
    ('x', None, 3, 0)
    >>> parse_alias("Var(0, 3, 1)")
    (None, 0, 3, 1)
    """
    if not isinstance(text, str):
        raise TypeError(f"an alias must be a string, got {type(text).__name__}")
    lx = _Lexer(text, "alias")
    tok = lx.next()
    if tok.kind == "end":
        raise lx.error(0, "empty alias")
    name = None
    if tok.kind == "name" and lx.peek().is_op("="):
        name = tok.text
        lx.next()
        tok = lx.next()
    kinds = list(_VAR_KINDS) + ["Var"]
    if tok.kind != "name":
        raise lx.error(tok.pos, f"unexpected {tok.describe()}",
                       "an alias reads like 'x = Vi(3)', 'y = Vj(1, 3)' or 'Var(0, 3, 1)'")
    kind = tok.text
    if kind not in kinds:
        if name is None and not lx.peek().is_op("("):
            raise lx.error(lx.peek().pos, f"expected '=' after the alias name, "
                           f"got {lx.peek().describe()}")
        raise lx.error(tok.pos, f"unknown variable kind '{kind}'",
                       _did_you_mean(kind, _CURRENT_VAR_KINDS + ["Var"])
                       or "use Vi, Vj, Pm or Var")
    paren = lx.next()
    call = _Call(kind, tok.pos, paren.pos)
    if not paren.is_op("("):
        raise lx.error(paren.pos, f"expected '(' after {kind}, got {paren.describe()}")
    while True:
        tok = lx.next()
        sign = 1
        if tok.is_op("-", "+"):
            sign = -1 if tok.text == "-" else 1
            tok = lx.next()
        if tok.kind != "int":
            raise lx.error(tok.pos, f"expected an integer, got {tok.describe()}")
        call.args.append((sign * int(tok.text), tok.pos))
        tok = lx.next()
        if tok.is_op(")"):
            break
        if not tok.is_op(","):
            raise lx.error(tok.pos, f"expected ',' or ')', got {tok.describe()}")
    tok = lx.next()
    if tok.kind != "end":
        raise lx.error(tok.pos, f"unexpected {tok.describe()} after the alias")
    ints = [v for v, _ in call.args]
    if kind == "Var":
        if len(ints) != 3:
            raise lx.error(call.pos, f"Var takes 3 arguments, got {len(ints)}",
                           "usage: Var(position, dim, category)")
        index, dim, cat = ints
        _check_var(lx, call, index, dim, cat)
        return name, index, dim, cat
    cat, new = _VAR_KINDS[kind]
    if new is not None:
        warnings.warn(f"{kind} is deprecated, use {new}", DeprecationWarning, stacklevel=2)
    if len(ints) not in (1, 2):
        raise lx.error(call.pos, f"{kind} takes 1 or 2 arguments, got {len(ints)}",
                       f"usage: {kind}(dim) or {kind}(position, dim)")
    if len(ints) == 1:
        (dim,) = ints
        if dim < 1:
            raise lx.error(call.args[0][1], f"a variable's dim must be >= 1, got {dim}")
        if dim > MAX_DIM:
            raise _limit_error(lx, call.args[0][1], "dim", dim, MAX_DIM)
        return name, None, dim, cat
    index, dim = ints
    _check_var(lx, call, index, dim, cat)
    return name, index, dim, cat
