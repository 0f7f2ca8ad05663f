"""The formula and alias parser: precedence, calls, round trips, errors, safety."""

from __future__ import annotations

import builtins
import os
import re
import warnings
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazymat.errors import FormulaSyntaxError, ShapeError
from lazymat.formula import (
    Const,
    Elem,
    Extract,
    IntInv,
    Node,
    OneHot,
    Pow,
    Scalprod,
    SqDist,
    SqNorm2,
    Var,
    make,
    to_string,
)
from lazymat.formula.parser import parse_alias, parse_formula

x = Var(0, 3, 0)
y = Var(1, 3, 1)
z = Var(2, 3, 1)
b = Var(3, 1, 1)
p = Var(4, 1, 2)
a = Var(5, 1, 1)
s = Var(6, 1, 0)
NAMES = {"x": x, "y": y, "z": z, "b": b, "p": p, "a": a, "s": s}


def op(name: str, *args: Node, params: tuple = ()) -> Node:
    return make(name, args, params)


def parse(text: str) -> Node:
    return parse_formula(text, NAMES)


# --------------------------------------------------------------------------- formulas

CASES = [
    # atoms
    ("x", x),
    ("  x\t", x),
    ("(x)", x),
    ("((((x))))", x),
    ("3", Const(3)),
    ("1.5", Const(1.5)),
    (".5", Const(0.5)),
    ("1e-3", Const(1e-3)),
    ("2.", Const(2)),
    ("1E3", Const(1000)),
    # precedence and associativity (Python's)
    ("x + y", x + y),
    ("x - y - z", (x - y) - z),
    ("x - (y - z)", x - (y - z)),
    ("x / y * z", (x / y) * z),
    ("x * y / z", (x * y) / z),
    ("x + y * z", x + (y * z)),
    ("(x + y) * z", (x + y) * z),
    ("-x**2", -op("Square", x)),
    ("-x * y", (-x) * y),
    ("- - x", x),
    ("+x", x),
    ("2*x**3", Const(2) * Pow(x, 3)),
    ("x**2**3", Pow(x, 8)),
    ("x**-2", Pow(x, -2)),
    ("x**-y**2", op("Powf", x, -op("Square", y))),
    ("x|y * 2", Scalprod(x, y * 2)),
    ("x|y + z", Scalprod(x, y + z)),
    ("(x|y) * 2", Scalprod(x, y) * 2),
    ("x + y < z", op("LessThan", x + y, z)),
    ("x < y", op("LessThan", x, y)),
    ("x > y", op("LessThan", y, x)),
    ("x <= y", op("LessOrEqual", x, y)),
    ("x >= y", op("LessOrEqual", y, x)),
    ("(x < y) < z", op("LessThan", op("LessThan", x, y), z)),
    ("x|y < s", op("LessThan", Scalprod(x, y), s)),
    # powers
    ("x**2", op("Square", x)),
    ("x**1", x),
    ("x**0.5", op("Sqrt", x)),
    ("x**-0.5", op("Rsqrt", x)),
    ("x**(1/2)", op("Sqrt", x)),
    ("x**1.5", op("Powf", x, Const(1.5))),
    ("x**y", op("Powf", x, y)),
    ("2**-1", Const(Fraction(1, 2))),
    ("-2**2", Const(-4)),
    # KeOps-style formulas
    ("Exp(-SqDist(x,y)/IntCst(2)) * b", op("Exp", -SqDist(x, y) / Const(2)) * b),
    ("Square(p-a)*Exp(x+y)", op("Square", p - a) * op("Exp", x + y)),
    ("Sum(Square(x-y))", op("Sum", op("Square", x - y))),
    ("SqNorm2(x - y)", SqNorm2(x - y)),
    ("Elem(x,1)", Elem(x, 1)),
    ("Extract(x,0,2)", Extract(x, 0, 2)),
    ("Extract(x, 0, 2,)", Extract(x, 0, 2)),
    ("Pow(x,3)", Pow(x, 3)),
    ("Pow(x,2)", op("Square", x)),
    ("Pow(x,-3)", Pow(x, -3)),
    ("Pow(x, -(3))", Pow(x, -3)),
    ("Powf(x,y)", op("Powf", x, y)),
    ("Powf(x,2)", op("Powf", x, Const(2))),
    ("IfElse(x,y,z)", op("IfElse", x, y, z)),
    ("Clamp(x, 0, 1)", op("Clamp", x, Const(0), Const(1))),
    ("OneHot(Elem(x,0),4)", OneHot(Elem(x, 0), 4)),
    ("IntInv(3) * x", Const(Fraction(1, 3)) * x),
    ("IntInv(3)", IntInv(3)),
    ("Var(0,3,0) - Var(1,3,1)", x - y),
    ("Vi(0,3)", x),
    ("Vj(1, 3)", y),
    ("Pm(4,1)", p),
    ("Add(x, y)", x + y),
    ("Minus(x)", -x),
    ("Exp(2)", op("Exp", Const(2))),
    ("Scalprod(x, y)", Scalprod(x, y)),
    ("SqDist(x, 1)", SqDist(x, Const(1))),
    ("Concat(x, s)", op("Concat", x, s)),
    ("MatVecMult(Concat(x, Concat(x, x)), x)",
     op("MatVecMult", op("Concat", x, op("Concat", x, x)), x)),
    ("Equal(x, y) + NotEqual(x, y)", op("Equal", x, y) + op("NotEqual", x, y)),
    ("WeightedSqDist(s, x, y)", make("Mult", (s, SqDist(x, y)))),
    # constants
    ("IntCst(-3)", Const(-3)),
    ("RatCst(1,3)", Const(Fraction(1, 3))),
    ("RatCst(-2, 4)", Const(Fraction(-1, 2))),
    ("Zero(3)", Const(0, 3)),
    ("SumT(IntCst(2), 3)", Const(2, 3)),
    ("SumT(-1.5,3)", Const(-1.5, 3)),
    ("SumT(RatCst(1,3),2)", Const(Fraction(1, 3), 2)),
    # ops with integer parameters
    ("Round(x, 2)", op("Round", x, params=(2,))),
    ("Round(x, -1)", op("Round", x, params=(-1,))),
    ("ClampInt(x, -1, 2)", op("ClampInt", x, params=(-1, 2))),
    ("DiffClampInt(x, 0, 1)", op("DiffClampInt", x, params=(0, 1))),
    ("SumT(Elem(x,0), 3)", op("SumT", Elem(x, 0), params=(3,))),
    ("SumT(s, 1)", s),
    ("ElemT(Elem(x,0), 3, 1)", op("ElemT", Elem(x, 0), params=(3, 1))),
    ("ExtractT(x, 1, 5)", op("ExtractT", x, params=(1, 5))),
    ("ExtractT(Zero(3), 1, 5)", Const(0, 5)),
    ("Mod(x, 2, 0.5)", op("Mod", x, Const(2), Const(0.5))),
    ("Atan2(x, y)", op("Atan2", x, y)),
    ("inf", Const(float("inf"))),
    ("-inf", Const(float("-inf"))),
    # whitespace and newlines anywhere
    ("Exp(\n  x\n  + y\n)", op("Exp", x + y)),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0] for c in CASES])
def test_parse(text, expected):
    assert parse(text) is expected


def test_names_are_optional_and_shadow_nothing_in_calls():
    assert parse_formula("Vi(0,3) + Vj(1,3)") is x + y
    # An alias named like an op is the alias, and the op stays callable.
    assert parse_formula("Exp(Exp)", {"Exp": x}) is op("Exp", x)


def test_number_aliases_become_constants():
    assert parse_formula("x * c", {"x": x, "c": 2}) is x * 2


def test_int_list_arguments_reach_structural_ops(monkeypatch):
    # Lists are for ops like TensorDot: parsed into tuples and passed through.
    seen = {}
    import lazymat.formula.parser as parser_mod

    def fake_apply(name, *args):
        seen[name] = args
        return x

    monkeypatch.setattr(parser_mod, "apply", fake_apply)
    monkeypatch.setitem(parser_mod.OPS, "FakeDot", parser_mod.OPS["Sum"])
    assert parse_formula("FakeDot(x, [2, 3], [], [-1,])", NAMES) is x
    assert seen["FakeDot"] == (x, (2, 3), (), (-1,))


# --------------------------------------------------------------------------- round trips

def _round_trip_formulas() -> list[Node]:
    c = Const(Fraction(2, 7))
    return [
        x, y, p, Const(3), Const(-3), Const(Fraction(-1, 3)), Const(1.5), Const(-2.25),
        Const(1e-300), Const(float("inf")), Const(2, 3), Const(0.25, 4), Const(-1.5, 2),
        x + y, x - y, x * y, x / y, -x, x / s, s / 3, x * c,
        SqDist(x, y), Scalprod(x, y), op("Exp", -SqDist(x, y) * p),
        Pow(x, 3), Pow(x, -1), op("Square", x), op("Powf", x, Const(0.3)),
        Elem(x, 2), Extract(x, 1, 2), OneHot(Elem(x, 0), 5), op("Concat", x, s),
        op("IfElse", s, x, y), op("Clamp", x, Const(-1), Const(1)),
        op("LessThan", x, y), op("LessOrEqual", y, x), op("Equal", x, y), op("NotEqual", x, y),
        op("Sum", x), op("Min", x), op("Max", y), op("ArgMin", x), op("ArgMax", y),
        op("Abs", x), op("Sign", x), op("Step", x), op("ReLU", x), op("Inv", x),
        op("Log", x), op("Sqrt", x), op("Rsqrt", x), op("Sin", x), op("Cos", x),
        op("MatVecMult", op("Concat", x, op("Concat", x, x)), y),
        op("Acos", x), op("Asin", x), op("Atan", x), op("Atan2", x, s), op("Floor", x),
        op("XLogX", x), op("SinXDivX", x), op("Mod", x, s, Const(Fraction(1, 2))),
        op("Round", x, params=(3,)), op("Round", x, params=(-2,)),
        op("ClampInt", x, params=(-1, 2)), op("DiffClampInt", x, params=(-3, -1)),
        op("SumT", s, params=(4,)), op("ElemT", s, params=(3, 2)),
        op("ExtractT", x, params=(2, 6)), op("SumT", Const(2), params=(3,)),
        op("Exp", op("Log", op("Sum", op("Square", x - y)) + 1)) * b,
        op("TensorDot", x, y, params=((3,), (3,), (0,), (0,))),
        op("TensorDot", x * 2, y, params=((3,), (3,), (), (), (1, 0))),
        op("TensorDot", op("TensorProd", x, y), y, params=((3, 3), (3,), (1,), (0,))),
        op("TensorDot", s, y, params=((), (3,), (), ())),
        op("BSpline", op("Concat", x, y), s, params=(2,)),
        op("SoftDTW_SqDist", x, y, p), op("SoftDTW_SqDist", x, y, Const(0.5)),
        op("GradSoftDTW_SqDist", x, op("Concat", y, b), Const(2)),
    ]


@pytest.mark.parametrize("f", _round_trip_formulas(), ids=to_string)
def test_round_trip(f):
    assert parse_formula(to_string(f)) is f


def test_round_trip_deep_formula():
    # Deeper than Python's recursion limit allows for a recursive descent parser.
    f = x
    for k in range(600):
        f = f + Const(k + 1) * y
    assert parse_formula(to_string(f)) is f
    assert parse_formula("(" * 3000 + "x" + ")" * 3000, NAMES) is x
    assert parse_formula("-" * 3001 + "x", NAMES) is -x


_UNARY = ["Minus", "Exp", "Log", "Sqrt", "Rsqrt", "Inv", "Square", "Abs", "Sign", "Step",
          "ReLU", "Sin", "Cos", "Acos", "Asin", "Atan", "Floor", "XLogX", "SinXDivX"]
_BINARY = ["Add", "Subtract", "Mult", "Divide", "Powf", "LessThan", "LessOrEqual", "Equal",
           "NotEqual", "Atan2"]


@st.composite
def formulas(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(["var", "int", "frac", "float", "vec"]))
        if kind == "var":
            return Var(draw(st.integers(0, 3)), draw(st.sampled_from([1, 3])),
                       draw(st.integers(0, 2)))
        if kind == "int":
            return Const(draw(st.integers(-50, 50)))
        if kind == "frac":
            return Const(Fraction(draw(st.integers(-9, 9)), draw(st.integers(1, 9))))
        if kind == "vec":
            return Const(draw(st.integers(-5, 5)), draw(st.integers(1, 4)))
        return Const(draw(st.floats(allow_nan=False, width=64)))
    f = draw(formulas(depth=depth - 1))
    kind = draw(st.sampled_from(["unary", "binary", "pow", "extract", "sum", "onehot",
                                 "sqdist", "concat"]))
    if kind == "unary":
        return make(draw(st.sampled_from(_UNARY)), (f,))
    if kind == "pow":
        return Pow(f, draw(st.integers(-4, 5)))
    if kind == "extract":
        start = draw(st.integers(0, f.dim - 1))
        return Extract(f, start, draw(st.integers(1, f.dim - start)))
    if kind == "sum":
        return make("Sum", (f,))
    if kind == "onehot":
        return OneHot(make("Sum", (f,)), draw(st.integers(1, 4)))
    g = draw(formulas(depth=depth - 1))
    if kind == "concat":
        return make("Concat", (f, g))
    if f.dim != g.dim and 1 not in (f.dim, g.dim):
        g = make("Sum", (g,))
    if kind == "sqdist":
        return SqDist(f, g) if f.dim == g.dim else SqDist(f, make("Sum", (g,)) * Const(1, f.dim))
    return make(draw(st.sampled_from(_BINARY)), (f, g))


@settings(max_examples=150, deadline=None)
@given(formulas())
def test_round_trip_random(f):
    assert parse_formula(to_string(f)) is f


# --------------------------------------------------------------------------- errors

ERRORS = [
    # (text, fragment of the message, position)
    ("", "empty formula", 0),
    ("   ", "empty formula", 0),
    ("Exp(x+))", "unexpected ')'", 6),
    ("x)", "unmatched ')'", 1),
    ("Exp(x", "'(' is never closed", 3),
    ("((x)", "'(' is never closed", 0),
    ("x +", "unexpected end of formula", 3),
    ("Exq(x)", "did you mean Exp", 0),
    ("SqDst(x, y)", "did you mean SqDist", 0),
    ("x + w", "unknown variable 'w'", 4),
    ("xx + y", "did you mean x", 0),
    ("Exp", "'Exp' is an op, not a variable", 0),
    ("x(2)", "'x' is a variable, not an op", 0),
    ("Exp(x, y)", "Exp takes 1 argument, got 2", 0),
    ("Exp()", "Exp takes 1 argument, got 0", 0),
    ("Add(x)", "Add takes 2 arguments, got 1", 0),
    ("SqDist(x)", "SqDist takes 2 arguments, got 1", 0),
    ("Elem(x)", "Elem takes 2 arguments, got 1", 0),
    ("Pow(x, 0.5)", "integer literal", 7),
    ("Pow(x, y)", "integer literal", 7),
    ("Extract(x, 0, y)", "integer literal", 14),
    ("Round(x)", "Round takes 2 arguments, got 1", 0),
    ("Round(x, 0.5)", "integer literal", 9),
    ("ClampInt(x, 0, y)", "integer literal", 15),
    ("Sum([1, 2])", "a list is not a formula", 4),
    ("TensorDot(x, y, [3], [3], [0])", "TensorDot takes 6 to 7 arguments, got 5", 0),
    ("TensorDot(x, y, x, [3], [0], [0])", "integer literal", 16),
    ("TensorDot(x, y, [3], [3], [0], [0.5])", "integer literals only", 32),
    ("Kron(x, y, [3])", "Kron takes 4 arguments, got 3", 0),
    ("BSpline(x, s)", "BSpline takes 3 arguments, got 2", 0),
    ("BSpline(x, s, s)", "integer literal", 14),
    ("SoftDTW_SqDist(x, y, [1])", "a list is not a formula", 21),
    ("x + [1]", "a list is not a formula", 4),
    ("[1, x]", "integer literals only", 4),
    ("IntInv(0)", "IntInv", 0),
    ("IntCst(x)", "integer literal", 7),
    ("IntCst(1.5)", "integer literal", 7),
    ("RatCst(1, 0)", "denominator is 0", 10),
    ("Zero(0)", "dim >= 1", 5),
    ("SumT(2, x)", "integer literal", 8),
    ("Var(0, 3)", "Var takes 3 arguments", 0),
    ("Var(0, 0, 0)", "dim must be >= 1", 7),
    ("Var(-1, 3, 0)", "position must be >= 0", 4),
    ("Var(0, 3, 5)", "category must be 0, 1 or 2", 10),
    ("Vi(3)", "Vi takes 2 arguments", 0),
    ("x; y", "unexpected character ';'", 1),
    ("x.__class__", "unexpected character '.'", 1),
    ("x @ y", "unexpected character '@'", 2),
    ("x % y", "unexpected character '%'", 2),
    ("x // y", "unexpected '/'", 3),
    ("'x'", "unexpected character", 0),
    ("x == y", "Equal(a, b)", 2),
    ("x != y", "NotEqual(a, b)", 2),
    ("x = y", "unexpected '='", 2),
    ("x < y < z", "chained comparisons", 6),
    ("x y", "unexpected name 'y'", 2),
    ("2 x", "unexpected name 'x'", 2),
    ("2x", "invalid number", 0),
    ("1e", "invalid number", 0),
    ("1.2.3", "invalid number", 0),
    ("(x, y)", "unexpected ','", 2),
    ("Exp(,x)", "unexpected ','", 4),
    ("*x", "unexpected '*'", 0),
    ("x + * y", "unexpected '*'", 4),
    ("Exp(x) Exp(y)", "unexpected name 'Exp'", 7),
    ("Extract(x, 0, 2) junk", "unexpected name 'junk'", 17),
    ("__import__", "unknown variable '__import__'", 0),
    ("Exp(x, y=1)", "unexpected '='", 8),
    ("x é", "unexpected character", 2),
]


@pytest.mark.parametrize("text,fragment,pos", ERRORS, ids=[e[0] or "<empty>" for e in ERRORS])
def test_syntax_errors(text, fragment, pos):
    with pytest.raises(FormulaSyntaxError) as info:
        parse(text)
    message = str(info.value)
    assert fragment in message
    assert f"at position {pos} " in message
    assert info.value.position == pos
    # The caret sits under the offending character.
    lines = message.splitlines()
    caret = next(k for k, line in enumerate(lines) if line.strip() == "^")
    assert lines[caret].index("^") == pos + 2
    assert lines[caret - 1][2:].rstrip() == text.replace("\n", " ").rstrip()


def test_syntax_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse("x +")


def test_long_text_errors_show_a_window():
    text = "x + " * 200 + "w"
    with pytest.raises(FormulaSyntaxError) as info:
        parse(text)
    message = str(info.value)
    assert f"position {len(text) - 1}" in message
    assert len(message) < 400
    shown, caret = message.splitlines()[1:3]
    assert shown[caret.index("^")] == "w"


def test_dim_mismatch_stays_a_shape_error():
    v2 = Var(7, 2, 0)
    with pytest.raises(ShapeError) as info:
        parse_formula("Exp(x + v)", {"x": x, "v": v2})
    assert not isinstance(info.value, FormulaSyntaxError)
    assert "position 6" in str(info.value) and "'+'" in str(info.value)
    with pytest.raises(ShapeError, match=r"(?s)Scalprod.*position 0"):
        parse_formula("Scalprod(x, v)", {"x": x, "v": v2})
    with pytest.raises(ShapeError, match=r"(?s)Extract.*position 0"):
        parse("Extract(x, 2, 2)")
    with pytest.raises(ShapeError, match="OneHot"):
        parse("OneHot(x, 3)")
    with pytest.raises(ShapeError, match=r"(?s)SumT needs a scalar.*position 0"):
        parse("SumT(x, 3)")
    with pytest.raises(ShapeError, match="ElemT"):
        parse("ElemT(s, 3, 3)")
    with pytest.raises(ShapeError, match="ExtractT"):
        parse("ExtractT(x, 1, 3)")
    with pytest.raises(ShapeError, match=r"(?s)TensorDot: axis 0 of a \(size 3\).*position 0"):
        parse("TensorDot(x, y, [3], [2, 2], [0], [0])")
    with pytest.raises(ShapeError, match="same rank"):
        parse("Kron(x, y, [3], [3, 1])")
    with pytest.raises(ShapeError, match=r"(?s)Scalprod.*position 2"):
        parse_formula("x | v", {"x": x, "v": v2})


def test_tensordot_and_kron_take_python_lists():
    f = parse("TensorDot(x, y, [3], [3], [0], [0])")
    assert f.op == "TensorDot" and f.dim == 1
    assert f is parse("TensorDot(x, y, [3,], [3], [0], [0], [])")  # identity permute dropped
    assert to_string(f) == "TensorDot(Var(0,3,0), Var(1,3,1), [3], [3], [0], [0])"
    assert parse(to_string(f)) is f
    g = parse("TensorDot(x, y, [3], [3], [], [], [1, 0])")
    assert g.dim == 9 and to_string(g).endswith("[3], [3], [], [], [1, 0])")
    k = parse("Kron(x, y, [3], [3])")
    assert k is parse("TensorDot(x, y, [3], [3], [], [])")
    assert parse("Kron(Concat(x, y), Concat(x, y), [2, 3], [3, 2])").params[-1] == (0, 2, 1, 3)
    assert parse("BSpline(Concat(x, y), s, 3)").dim == 2
    assert parse("SoftDTW_SqDist(x, y, 0.5)").dim == 1


def test_malicious_strings_run_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    for text in ["__import__('os').system('echo hi')",
                 "__import__ ( 'os' ) . system ( 'echo hi' )",
                 "x.__class__.__bases__[0].__subclasses__()",
                 "eval('1')", "exec('x=1')", "lambda: 0", "[c for c in ()]",
                 "Exp(x).__init__", "globals()"]:
        with pytest.raises(FormulaSyntaxError, match="position"):
            parse(text)
    assert calls == []


def test_parser_never_evaluates(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the parser must not evaluate text")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, forbidden)
    assert parse("Exp(-SqDist(x,y)/IntCst(2)) * b") is op("Exp", -SqDist(x, y) / 2) * b


def test_not_a_string():
    with pytest.raises(TypeError):
        parse_formula(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_alias(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- aliases

ALIASES = [
    ("x = Vi(3)", ("x", None, 3, 0)),
    ("x=Vi(2,3)", ("x", 2, 3, 0)),
    ("y = Vj(1)", ("y", None, 1, 1)),
    ("p = Pm(2)", ("p", None, 2, 2)),
    ("Vi(3)", (None, None, 3, 0)),
    ("Var(0,3,1)", (None, 0, 3, 1)),
    ("g = Var(2,1,2)", ("g", 2, 1, 2)),
    ("  long_name_2  =  Vj ( 4 , 5 )  ", ("long_name_2", 4, 5, 1)),
    ("\tb=\nPm(0,1)\n", ("b", 0, 1, 2)),
]


@pytest.mark.parametrize("text,expected", ALIASES, ids=[t for t, _ in ALIASES])
def test_parse_alias(text, expected):
    assert parse_alias(text) == expected


@pytest.mark.parametrize("text,expected", [("x = Vx(3)", ("x", None, 3, 0)),
                                           ("y = Vy(1, 2)", ("y", 1, 2, 1))])
def test_old_alias_spellings_warn(text, expected):
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert parse_alias(text) == expected


def test_new_alias_spellings_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_alias("x = Vi(3)")
        parse_formula("Vi(0, 3)")


ALIAS_ERRORS = [
    ("", "empty alias", 0),
    ("x = ", "expected", 4),
    ("x = Vk(3)", "did you mean Vj or Vi", 4),
    ("x = Foo(3)", "unknown variable kind 'Foo'", 4),
    ("x Vi(3)", "expected '='", 2),
    ("x == Vi(3)", "expected '=' after the alias name, got '=='", 2),
    ("x = Vi 3", "expected '('", 7),
    ("x = Vi(3", "expected ',' or ')'", 8),
    ("x = Vi(3))", "unexpected ')'", 9),
    ("x = Vi(3) + 1", "unexpected '+'", 10),
    ("x = Vi()", "expected an integer", 7),
    ("x = Vi(1.5)", "expected an integer", 7),
    ("x = Vi(y)", "expected an integer", 7),
    ("x = Vi(1,2,3)", "Vi takes 1 or 2 arguments", 4),
    ("x = Vi(0)", "dim must be >= 1", 7),
    ("x = Vi(-1, 3)", "position must be >= 0", 8),
    ("Var(0,3)", "Var takes 3 arguments", 0),
    ("Var(0,3,3)", "category must be 0, 1 or 2", 8),
    ("x = Vi(3); import os", "unexpected character ';'", 9),
]


@pytest.mark.parametrize("text,fragment,pos", ALIAS_ERRORS,
                         ids=[e[0] or "<empty>" for e in ALIAS_ERRORS])
def test_alias_errors(text, fragment, pos):
    with pytest.raises(FormulaSyntaxError) as info:
        parse_alias(text)
    message = str(info.value)
    assert fragment in message
    assert re.search(rf"at position {pos} in alias:", message)
    assert info.value.position == pos


# --------------------------------------------------------------------------- limits (issue 11.5)

def test_tiny_strings_cannot_ask_for_huge_positions_or_dims(no_compile):
    """A position or dim beyond lazymat's limits is a ShapeError naming the limit, raised
    before anything is allocated (a list of 2**40 labels) or compiled (a C CompileError)."""
    import tracemalloc

    import numpy as np

    import lazymat as lm
    from lazymat.formula import MAX_DIM
    from lazymat.formula.parser import MAX_POSITION

    tracemalloc.start()
    try:
        with pytest.raises(ShapeError, match="MAX_POSITION"):
            lm.Genred("x", ["x = Vi(1099511627776, 1)"])
        with pytest.raises(ShapeError, match="MAX_POSITION"):
            lm.Genred("x * Vj(1099511627776, 1)", ["x = Vi(0, 1)"])
        with pytest.raises(ShapeError, match="MAX_DIM"):
            lm.Genred("x", ["x = Vi(0, 1099511627776)"])
        with pytest.raises(ShapeError, match="MAX_DIM"):
            lm.Genred("Zero(4611686018427387904) + x", ["x = Vi(0, 1)"])
        for text in ("SumT(x, 4611686018427387904)", "OneHot(x, 4611686018427387904)",
                     "ElemT(x, 4611686018427387904, 0)", "Pow(x, 4611686018427387904)",
                     "Round(x, 4611686018427387904)"):
            with pytest.raises(ShapeError, match="out of range|MAX_DIM"):
                lm.Genred(text, ["x = Vi(0, 1)"])
        with pytest.raises(ShapeError, match="MAX_DIM"):  # a product of two fine dims
            lm.Genred("TensorProd(x, y)", [f"x = Vi(0, {2**13})", f"y = Vj(1, {2**12})"])
        with pytest.raises(ShapeError, match="MAX_DIM"):
            lm.Vi(np.ones((2, 1))).one_hot(2**30)
        assert tracemalloc.get_traced_memory()[1] < 50e6
    finally:
        tracemalloc.stop()
    no_compile.assert_none()
    # The limits themselves are fine.
    assert parse_alias(f"x = Vi({MAX_POSITION}, {MAX_DIM})") == ("x", MAX_POSITION, MAX_DIM, 0)
    assert parse_formula(f"SumT(s, {MAX_DIM})", NAMES).dim == MAX_DIM


# --------------------------------------------------------------------------- deep formulas (11.4)

def test_deep_and_long_formulas_print_and_parse_back():
    """Sin nested 3000 deep (beyond Python's recursion limit) and a sum of 2000 terms read back
    as the same nodes: the printer and the parser keep their own stacks."""
    deep = s
    for _ in range(3000):
        deep = make("Sin", (deep,))
    long = Const(0)
    for k in range(2000):
        long = long + make("Exp", (-(s - b) * (k + 1),))
    for f in (deep, long):
        text = to_string(f)
        assert parse_formula(text, NAMES) is f
        assert repr(f) == text
