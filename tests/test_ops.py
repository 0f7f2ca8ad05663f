"""Every formula op, one table: compiled CPU backend vs reference backend vs dense numpy.

Each row builds a formula from the variables below, gives the domain its data
is drawn from, and the dense float64 oracle of F (shape (M, N, dim)). Every
row is checked through the Sum over j (the simplest reduction), for float32
and float64, on two sizes, plus once with torch inputs.

Adding an op to ``OPS`` or ``MACROS`` without a row here fails
``test_table_covers_every_op``.

Variables (position, dim, category):
    x = Var(0, 3, i)   y = Var(1, 3, j)   s = Var(2, 1, i)   t = Var(3, 1, j)
    p = Var(4, pdim, parameter)           w = Var(5, 9, i)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from conftest import as64, assert_close, check_type, requires_torch, to_lib

from lazymat.formula import MACROS, OPS, Const, Var, apply, make, walk
from lazymat.plan import Request, run

# --------------------------------------------------------------------------- the table

NAMES = ("x", "y", "s", "t", "p", "w")


def variables(pdim: int) -> SimpleNamespace:
    return SimpleNamespace(x=Var(0, 3, 0), y=Var(1, 3, 1), s=Var(2, 1, 0), t=Var(3, 1, 1),
                           p=Var(4, pdim, 2), w=Var(5, 9, 0))


@dataclass
class Row:
    op: str  # the OPS / MACROS name this row exercises
    variant: str
    build: Callable[[SimpleNamespace], object]
    oracle: Callable[[SimpleNamespace], np.ndarray]
    dom: dict = field(default_factory=dict)  # variable name -> domain (default "normal")
    pdim: int = 3
    # Unary math ops: (float64 oracle of the op, of its derivative, (lo, hi)) for the
    # accuracy tests over a wide range (tails, near 0), forward and backward.
    precise: tuple | None = None

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}" if self.variant else self.op


def R(op, build, oracle, variant="", pdim=3, precise=None, **dom):
    return Row(op, variant, build, oracle, dom, pdim, precise)


def _scipy(name):
    """scipy.special's ``name`` (imported when the oracle runs: scipy is a test extra)."""
    def fn(a):
        import scipy.special

        return getattr(scipy.special, name)(a)

    return fn


def _matvec(a, b):
    n = b.shape[-1]
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a = np.broadcast_to(a, shape + a.shape[-1:])
    b = np.broadcast_to(b, shape + b.shape[-1:])
    mat = a.reshape(shape + (a.shape[-1] // n, n))
    return (mat * b[..., None, :]).sum(-1)


def _sqn(f):
    return (f * f).sum(-1, keepdims=True)


def _symsqnorm(a, f):
    return (_matvec(a, f) * f).sum(-1, keepdims=True)


def _onehot(a, D):
    return (np.rint(a) == np.arange(D)).astype(np.float64)


def _normalize(f):
    n2 = _sqn(f)
    return np.where(n2 == 0, 0.0, f / np.sqrt(np.where(n2 == 0, 1.0, n2)))


def _placed(f, start, dim):
    """f at components [start:start+f.dim] of zeros of length dim."""
    out = np.zeros(f.shape[:-1] + (dim,))
    out[..., start:start + f.shape[-1]] = f
    return out


def _argfirst(fn, f):
    return fn(f, -1)[..., None].astype(np.float64)


ROWS = [
    # ---------------------------------------------------------------- arithmetic
    R("Add", lambda v: v.x + v.y, lambda a: a.x + a.y),
    R("Add", lambda v: apply("Add", v.s, v.y), lambda a: a.s + a.y, "bcast"),
    R("Add", lambda v: apply("Add", v.x - v.y, v.p), lambda a: a.x - a.y + a.p, "param"),
    R("Subtract", lambda v: v.x - v.y, lambda a: a.x - a.y),
    R("Subtract", lambda v: apply("Subtract", v.x, v.t), lambda a: a.x - a.t, "bcast"),
    R("Mult", lambda v: v.x * v.y, lambda a: a.x * a.y),
    R("Mult", lambda v: apply("Mult", v.s, v.y), lambda a: a.s * a.y, "bcast_i"),
    R("Mult", lambda v: apply("Mult", v.x, v.t), lambda a: a.x * a.t, "bcast_j"),
    R("Divide", lambda v: v.x / v.y, lambda a: a.x / a.y, y="nonzero"),
    R("Divide", lambda v: apply("Divide", v.s, v.y), lambda a: a.s / a.y, "bcast",
      y="nonzero"),
    R("Divide", lambda v: apply("Divide", v.x, v.t), lambda a: a.x / a.t, "bcast_j",
      t="nonzero"),
    R("Minus", lambda v: -(v.x - v.y), lambda a: -(a.x - a.y)),
    # ---------------------------------------------------------------- unary math
    R("Exp", lambda v: apply("Exp", v.x - v.y), lambda a: np.exp(a.x - a.y)),
    R("Exp", lambda v: apply("Exp", v.p) * apply("SqNorm2", v.x) + apply("Sin", v.y) * v.s,
      lambda a: np.exp(a.p) * _sqn(a.x) + np.sin(a.y) * a.s, "levels"),  # nodes per p, i, j
    R("Exp", lambda v: apply("Exp", apply("Sum", v.p) * apply("Sum", v.y - v.p)) * v.x,
      lambda a: np.exp(a.p.sum(-1, keepdims=True) * (a.y - a.p).sum(-1, keepdims=True)) * a.x,
      "param_j", p="small", y="small"),
    R("Log", lambda v: apply("Log", v.x * v.t), lambda a: np.log(a.x * a.t), x="pos", t="pos"),
    R("Sqrt", lambda v: apply("Sqrt", v.x * v.t), lambda a: np.sqrt(a.x * a.t),
      x="posz", t="pos"),
    R("Rsqrt", lambda v: apply("Rsqrt", v.x * v.t),
      lambda a: np.where(a.x * a.t == 0, 0.0, 1 / np.sqrt(np.where(a.x == 0, 1, a.x * a.t))),
      x="posz", t="pos"),
    R("Inv", lambda v: apply("Inv", v.x * v.y), lambda a: 1 / (a.x * a.y),
      x="nonzero", y="nonzero"),
    R("Square", lambda v: apply("Square", v.x - v.y), lambda a: (a.x - a.y) ** 2),
    R("Abs", lambda v: apply("Abs", v.x - v.y), lambda a: np.abs(a.x - a.y)),
    R("Sign", lambda v: apply("Sign", v.x - v.y), lambda a: np.sign(a.x - a.y),
      x="int", y="int"),
    R("Step", lambda v: apply("Step", v.x - v.y), lambda a: (a.x - a.y >= 0) * 1.0,
      x="int", y="int"),
    R("ReLU", lambda v: apply("ReLU", v.x - v.y), lambda a: np.maximum(a.x - a.y, 0)),
    R("ReLU", lambda v: apply("ReLU", v.x - v.y), lambda a: np.maximum(a.x - a.y, 0), "int",
      x="int", y="int"),
    R("Sin", lambda v: apply("Sin", v.x * v.y), lambda a: np.sin(a.x * a.y)),
    R("Cos", lambda v: apply("Cos", v.x + v.y), lambda a: np.cos(a.x + a.y)),
    R("Sinh", lambda v: apply("Sinh", v.x - v.y), lambda a: np.sinh(a.x - a.y),
      precise=(np.sinh, np.cosh, (-80, 80))),
    R("Cosh", lambda v: apply("Cosh", v.x * v.y), lambda a: np.cosh(a.x * a.y),
      precise=(np.cosh, np.sinh, (-80, 80))),
    R("Tanh", lambda v: apply("Tanh", v.x - v.y), lambda a: np.tanh(a.x - a.y),
      precise=(np.tanh, lambda a: 1 / np.cosh(a) ** 2, (-100, 100))),
    R("Expm1", lambda v: apply("Expm1", v.x * v.y), lambda a: np.expm1(a.x * a.y),
      precise=(np.expm1, np.exp, (-100, 80))),
    R("Log1p", lambda v: apply("Log1p", v.x * v.t), lambda a: np.log1p(a.x * a.t),
      precise=(np.log1p, lambda a: 1 / (1 + a), (-0.999, 1e3)), x="pos", t="pos"),
    R("Sigmoid", lambda v: apply("Sigmoid", v.x * v.y), lambda a: 1 / (1 + np.exp(-a.x * a.y)),
      precise=(_scipy("expit"), lambda a: _scipy("expit")(a) * _scipy("expit")(-a),
               (-100, 100))),
    R("Softplus", lambda v: apply("Softplus", v.x * v.y), lambda a: np.logaddexp(a.x * a.y, 0),
      precise=(lambda a: np.logaddexp(a, 0), _scipy("expit"), (-100, 1e3))),
    R("Erf", lambda v: apply("Erf", v.x - v.y), lambda a: _scipy("erf")(a.x - a.y),
      precise=(_scipy("erf"), lambda a: 2 / np.sqrt(np.pi) * np.exp(-a * a), (-10, 10))),
    R("Powf", lambda v: apply("Powf", v.x, v.y), lambda a: a.x ** a.y, x="pos", y="small"),
    R("Powf", lambda v: apply("Powf", v.x, v.t), lambda a: a.x ** a.t, "bcast",
      x="pos", t="small"),
    R("Powf", lambda v: apply("Powf", v.s, v.y), lambda a: a.s ** a.y, "bcast_base",
      s="pos", y="small"),
    R("Pow", lambda v: make("Pow", (v.x - v.y,), (3,)), lambda a: (a.x - a.y) ** 3),
    R("Pow", lambda v: make("Pow", (v.x * v.y,), (-3,)), lambda a: (a.x * a.y) ** -3.0, "neg",
      x="nonzero", y="nonzero"),
    R("Pow", lambda v: make("Pow", (v.x * v.y,), (0,)), lambda a: (a.x * a.y) ** 0, "zero"),
    R("Pow", lambda v: apply("Pow", v.x - v.y, 5), lambda a: (a.x - a.y) ** 5, "macro5",
      x="small", y="small"),
    R("Pow", lambda v: apply("Pow", v.x - v.y, 2), lambda a: (a.x - a.y) ** 2, "macro2"),
    # inverse trigonometric: (x - y) * 0.3 stays in (-0.9, 0.9) for "small" data
    R("Acos", lambda v: apply("Acos", (v.x - v.y) * Fraction(3, 10)),
      lambda a: np.arccos((a.x - a.y) * 0.3), x="small", y="small"),
    R("Asin", lambda v: apply("Asin", (v.x - v.y) * Fraction(3, 10)),
      lambda a: np.arcsin((a.x - a.y) * 0.3), x="small", y="small"),
    R("Atan", lambda v: apply("Atan", v.x * v.y), lambda a: np.arctan(a.x * a.y)),
    R("Atan2", lambda v: apply("Atan2", v.x, v.y), lambda a: np.arctan2(a.x, a.y)),
    R("Atan2", lambda v: apply("Atan2", v.s, v.y - v.x), lambda a: np.arctan2(a.s, a.y - a.x),
      "bcast"),
    R("XLogX", lambda v: apply("XLogX", v.x * v.t),
      lambda a: np.where(a.x * a.t == 0, 0.0, a.x * a.t * np.log(a.x * a.t)),
      x="posz", t="pos"),
    R("SinXDivX", lambda v: apply("SinXDivX", v.x - v.y), lambda a: np.sinc((a.x - a.y) / np.pi)),
    R("SinXDivX", lambda v: apply("SinXDivX", v.x - v.y), lambda a: np.sinc((a.x - a.y) / np.pi),
      "zeros", x="int", y="int"),
    # piecewise constant: "frac" data stays away from the jumps (float32 = float64 there)
    R("Floor", lambda v: apply("Floor", v.x - v.y), lambda a: np.floor(a.x - a.y),
      x="frac", y="int"),
    R("Round", lambda v: apply("Round", v.x - v.y, 1), lambda a: np.round(a.x - a.y, 1),
      x="frac", y="int"),
    R("Round", lambda v: apply("Round", v.x - v.y, 0), lambda a: np.round(a.x - a.y), "0",
      x="frac", y="int"),
    R("Round", lambda v: apply("Round", (v.x - v.y) * 10, -1),
      lambda a: np.round((a.x - a.y) * 10, -1), "neg", x="frac", y="int"),
    R("Mod", lambda v: apply("Mod", v.x, v.t, v.s),
      lambda a: a.x - a.t * np.floor((a.x - a.s) / a.t), t="pos"),
    R("Mod", lambda v: apply("Mod", v.x - v.y, Const(2), Const(Fraction(-1, 2))),
      lambda a: a.x - a.y - 2 * np.floor((a.x - a.y + 0.5) / 2), "const", x="frac", y="int"),
    R("ClampInt", lambda v: apply("ClampInt", v.x - v.y, -1, 1),
      lambda a: np.clip(a.x - a.y, -1, 1)),
    R("ClampInt", lambda v: apply("ClampInt", v.x - v.y, -1, 1),
      lambda a: np.clip(a.x - a.y, -1, 1), "int", x="int", y="int"),
    R("DiffClampInt", lambda v: apply("DiffClampInt", v.x - v.y, -1, 1),
      lambda a: ((a.x - a.y >= -1) & (a.x - a.y <= 1)) * 1.0, x="int", y="int"),
    # ---------------------------------------------------------------- ternary
    R("Clamp", lambda v: apply("Clamp", v.x - v.y, Const(-0.5), Const(0.75)),
      lambda a: np.clip(a.x - a.y, -0.5, 0.75)),
    R("Clamp", lambda v: apply("Clamp", v.x, v.s, v.t), lambda a: np.minimum(
        np.maximum(a.x, a.s), a.t), "bcast"),
    R("IfElse", lambda v: apply("IfElse", v.x - v.y, v.x, v.y),
      lambda a: np.where(a.x - a.y >= 0, a.x, a.y)),
    R("IfElse", lambda v: apply("IfElse", v.x - v.y, v.s, v.t),
      lambda a: np.where(a.x - a.y >= 0, a.s, a.t), "int_bcast", x="int", y="int"),
    R("IfElse", lambda v: apply("IfElse", v.s, v.x, v.y),
      lambda a: np.where(a.s >= 0, a.x, a.y), "bcast_cond", s="int"),
    # ---------------------------------------------------------------- comparisons (ties)
    *[R(name, (lambda n: lambda v: apply(n, v.x, v.y))(name),
        (lambda f: lambda a: f(a.x, a.y) * 1.0)(fn), x="int", y="int")
      for name, fn in (("LessThan", np.less), ("LessOrEqual", np.less_equal),
                       ("Equal", np.equal), ("NotEqual", np.not_equal))],
    *[R(name, (lambda n: lambda v: apply(n, v.s, v.y))(name),
        (lambda f: lambda a: f(a.s, a.y) * 1.0)(fn), "bcast", s="int", y="int")
      for name, fn in (("LessThan", np.less), ("LessOrEqual", np.less_equal),
                       ("Equal", np.equal), ("NotEqual", np.not_equal))],
    R("LessThan", lambda v: apply("LessThan", v.x, v.t), lambda a: (a.x < a.t) * 1.0,
      "bcast_j", x="int", t="int"),
    R("Equal", lambda v: apply("Equal", v.x - v.y, v.p), lambda a: (a.x - a.y == a.p) * 1.0,
      "param", x="int", y="int", p="int"),
    # ---------------------------------------------------------------- structural
    R("Sum", lambda v: apply("Sum", v.x * v.y), lambda a: (a.x * a.y).sum(-1, keepdims=True)),
    R("Min", lambda v: apply("Min", v.x - v.y), lambda a: (a.x - a.y).min(-1, keepdims=True)),
    R("Max", lambda v: apply("Max", v.x * v.y), lambda a: (a.x * a.y).max(-1, keepdims=True)),
    R("ArgMin", lambda v: apply("ArgMin", v.x - v.y),
      lambda a: _argfirst(np.argmin, np.broadcast_to(a.x - a.y, np.broadcast_shapes(
          a.x.shape, a.y.shape))), x="int", y="int"),
    R("ArgMax", lambda v: apply("ArgMax", v.x - v.y),
      lambda a: _argfirst(np.argmax, np.broadcast_to(a.x - a.y, np.broadcast_shapes(
          a.x.shape, a.y.shape))), x="int", y="int"),
    R("ArgMin", lambda v: apply("ArgMin", v.x * v.y),
      lambda a: _argfirst(np.argmin, a.x * a.y), "normal"),
    R("Concat", lambda v: apply("Concat", v.x, v.t),
      lambda a: np.concatenate([np.broadcast_to(a.x, (a.x.shape[0], a.t.shape[1], 3)),
                                np.broadcast_to(a.t, (a.x.shape[0], a.t.shape[1], 1))], -1)),
    R("Concat", lambda v: apply("Concat", v.t, v.x * v.y),
      lambda a: np.concatenate([np.broadcast_to(a.t, (a.x.shape[0], a.y.shape[1], 1)),
                                a.x * a.y], -1), "ji"),
    R("Extract", lambda v: apply("Extract", v.x * v.y, 1, 2), lambda a: (a.x * a.y)[..., 1:3]),
    R("Extract", lambda v: apply("Extract", v.w * v.t, 4, 5), lambda a: (a.w * a.t)[..., 4:9],
      "tail"),
    R("OneHot", lambda v: apply("OneHot", v.s + v.t, 5), lambda a: _onehot(a.s + a.t, 5),
      s="onehot", t="onehot"),
    R("SumT", lambda v: apply("SumT", apply("Sum", v.x * v.y), 4),
      lambda a: np.repeat((a.x * a.y).sum(-1, keepdims=True), 4, -1)),
    R("SumT", lambda v: apply("SumT", v.s * v.t, 3) * (v.x - v.y),
      lambda a: a.s * a.t * (a.x - a.y), "inline"),
    R("ElemT", lambda v: apply("ElemT", apply("Sum", v.x * v.y), 4, 2),
      lambda a: _placed((a.x * a.y).sum(-1, keepdims=True), 2, 4)),
    R("ElemT", lambda v: apply("ElemT", v.s * v.t, 3, 0) + v.x,
      lambda a: _placed(a.s * a.t, 0, 3) + a.x, "first"),
    R("ExtractT", lambda v: apply("ExtractT", v.x * v.y, 1, 5),
      lambda a: _placed(a.x * a.y, 1, 5)),
    R("ExtractT", lambda v: apply("ExtractT", v.x - v.y, 0, 4), lambda a: _placed(a.x - a.y, 0, 4),
      "start"),
    R("ExtractT", lambda v: apply("ExtractT", v.s * v.t, 2, 3), lambda a: _placed(a.s * a.t, 2, 3),
      "end"),
    R("MatVecMult", lambda v: apply("MatVecMult", v.p, v.x - v.y),
      lambda a: _matvec(a.p, a.x - a.y), pdim=9),
    R("MatVecMult", lambda v: apply("MatVecMult", v.w, v.y), lambda a: _matvec(a.w, a.y), "ij"),
    R("MatVecMult", lambda v: apply("MatVecMult", v.x, v.t), lambda a: _matvec(a.x, a.t),
      "col"),
    # ---------------------------------------------------------------- composites (MACROS)
    R("SqNorm2", lambda v: apply("SqNorm2", v.x - v.y), lambda a: _sqn(a.x - a.y)),
    R("Scalprod", lambda v: apply("Scalprod", v.x, v.y), lambda a: (a.x * a.y).sum(-1)[..., None]),
    R("SqDist", lambda v: apply("SqDist", v.x, v.y), lambda a: _sqn(a.x - a.y)),
    R("Norm2", lambda v: apply("Norm2", v.x - v.y), lambda a: np.sqrt(_sqn(a.x - a.y))),
    R("Norm2", lambda v: apply("Norm2", v.x - v.y), lambda a: np.sqrt(_sqn(a.x - a.y)), "int",
      x="int1", y="int1"),
    R("Normalize", lambda v: apply("Normalize", v.x - v.y), lambda a: _normalize(a.x - a.y)),
    R("Normalize", lambda v: apply("Normalize", v.x - v.y), lambda a: _normalize(a.x - a.y),
      "zeros", x="int1", y="int1"),
    R("SqNormIso", lambda v: apply("SqNormIso", v.s, v.x - v.y),
      lambda a: a.s * _sqn(a.x - a.y)),
    R("SqNormDiag", lambda v: apply("SqNormDiag", v.p, v.x - v.y),
      lambda a: (a.p * (a.x - a.y) ** 2).sum(-1, keepdims=True)),
    R("SymSqNorm", lambda v: apply("SymSqNorm", v.p, v.x - v.y),
      lambda a: _symsqnorm(a.p, a.x - a.y), pdim=9),
    R("SymSqNorm", lambda v: apply("SymSqNorm", v.w, v.x - v.y),
      lambda a: _symsqnorm(a.w, a.x - a.y), "i"),
    R("WeightedSqNorm", lambda v: apply("WeightedSqNorm", v.p, v.x - v.y),
      lambda a: a.p * _sqn(a.x - a.y), "iso", pdim=1, p="pos"),
    R("WeightedSqNorm", lambda v: apply("WeightedSqNorm", v.p, v.x - v.y),
      lambda a: (a.p * (a.x - a.y) ** 2).sum(-1, keepdims=True), "diag", pdim=3),
    R("WeightedSqNorm", lambda v: apply("WeightedSqNorm", v.p, v.x - v.y),
      lambda a: _symsqnorm(a.p, a.x - a.y), "sym", pdim=9),
    R("WeightedSqDist", lambda v: apply("WeightedSqDist", v.p, v.x, v.y),
      lambda a: (a.p * (a.x - a.y) ** 2).sum(-1, keepdims=True), pdim=3),
    R("WeightedSqDist", lambda v: apply("WeightedSqDist", v.s, v.x, v.y),
      lambda a: a.s * _sqn(a.x - a.y), "iso_i"),
    R("Elem", lambda v: apply("Elem", v.x * v.y, 2), lambda a: (a.x * a.y)[..., 2:3]),
    R("Elem", lambda v: apply("Elem", v.y - v.s, 0), lambda a: (a.y - a.s)[..., 0:1], "first"),
    R("Factorize", lambda v: apply("Factorize", apply("Exp", -apply("SqDist", v.x, v.y)) * apply(
        "SqDist", v.x, v.y), apply("SqDist", v.x, v.y)),
      lambda a: np.exp(-_sqn(a.x - a.y)) * _sqn(a.x - a.y)),
    R("IntInv", lambda v: apply("Mult", apply("IntInv", 3), v.x - v.y),
      lambda a: (a.x - a.y) / 3),
    R("VecMatMult", lambda v: apply("VecMatMult", v.x - v.y, v.p),
      lambda a: _vecmat(a.x - a.y, a.p), pdim=9),
    R("VecMatMult", lambda v: apply("VecMatMult", v.y, v.w), lambda a: _vecmat(a.y, a.w), "ij"),
    R("TensorProd", lambda v: apply("TensorProd", v.x, v.y - v.t),
      lambda a: _tensorprod(a.x, a.y - a.t)),
    # ---------------------------------------------------------------- tensor algebra
    R("TensorDot", lambda v: apply("TensorDot", v.w, v.y, [3, 3], [3], [1], [0]),
      lambda a: np.einsum("...ab,...b->...a", _sh(a.w, 3, 3), a.y)),
    R("TensorDot", lambda v: apply("TensorDot", v.w, v.y, [3, 3], [3], [], [], [2, 0, 1]),
      lambda a: _flat(np.einsum("...ij,...k->...jki", _sh(a.w, 3, 3), a.y), 3), "perm"),
    R("TensorDot", lambda v: apply("TensorDot", v.w, apply("TensorProd", v.y, v.y), [3, 3],
                                   [3, 3], [0, 1], [1, 0]),
      lambda a: np.einsum("...ab,...ba->...", _sh(a.w, 3, 3),
                          _sh(_tensorprod(a.y, a.y), 3, 3))[..., None], "full"),
    R("TensorDot", lambda v: apply("TensorDot", v.p, apply("TensorProd", v.y, v.x), [2, 3, 4],
                                   [3, 3], [1], [1], [1, 2, 0]),
      lambda a: _flat(np.einsum("...ick,...jc->...jik", _sh(a.p, 2, 3, 4),
                                _sh(_tensorprod(a.y, a.x), 3, 3)), 3), "3d", pdim=24),
    R("TensorDot", lambda v: apply("TensorDot", v.s, v.y, [], [3], [], []),
      lambda a: a.s * a.y, "scalar"),
    R("Kron", lambda v: apply("Kron", v.x, v.y, [3], [3]),
      lambda a: _kron(a.x, a.y, (3,), (3,))),
    R("Kron", lambda v: apply("Kron", v.p, apply("TensorProd", v.x, apply("Extract", v.y, 0, 2)),
                              [2, 3], [3, 2]),
      lambda a: _kron(a.p, _tensorprod(a.x, a.y[..., :2]), (2, 3), (3, 2)), "rank2", pdim=6),
    # ---------------------------------------------------------------- B-splines
    R("BSpline", lambda v: apply("BSpline", v.w, v.t, 3), lambda a: _bspline(a.w, a.t, 3),
      w="sorted"),
    R("BSpline", lambda v: apply("BSpline", v.w, v.t, 0), lambda a: _bspline(a.w, a.t, 0),
      "order0", w="sorted"),
    R("BSpline", lambda v: apply("BSpline", v.p, v.t, 2) + v.s,
      lambda a: _bspline(a.p, a.t, 2) + a.s, "param", pdim=8, p="sorted"),
    R("BSpline", lambda v: apply("BSpline", v.p, v.t, 2) + v.s,
      lambda a: _bspline(a.p, a.t, 2) + a.s, "repeated_knots", pdim=8, p="sorted_int",
      t="frac"),
    # ---------------------------------------------------------------- soft-DTW
    R("SoftDTW_SqDist", lambda v: apply("SoftDTW_SqDist", v.x, v.y, Fraction(1, 2)),
      lambda a: _softdtw(a.x, a.y, 0.5)),
    R("SoftDTW_SqDist", lambda v: apply("SoftDTW_SqDist", v.y, v.w, Const(1)),
      lambda a: _softdtw(a.y, a.w, 1.0), "len"),
    R("SoftDTW_SqDist", lambda v: apply("SoftDTW_SqDist", v.w, v.y, v.s),
      lambda a: _softdtw(a.w, a.y, a.s), "gamma_i", s="pos"),
    R("GradSoftDTW_SqDist", lambda v: apply("GradSoftDTW_SqDist", v.x, v.y, Fraction(1, 2)),
      lambda a: _softdtw_grad(a.x, a.y, 0.5)),
    R("GradSoftDTW_SqDist", lambda v: apply("GradSoftDTW_SqDist", v.w, v.y, v.s),
      lambda a: _softdtw_grad(a.w, a.y, a.s), "len", s="pos"),
    # ---------------------------------------------------------------- symbolic calculus
    # of g(x, y) = exp(-|x - y|^2) s_i t_j, whose derivatives are written by hand here
    R("Grad", lambda v: apply("Grad", _gauss(v), v.x, v.t),
      lambda a: -2 * (a.x - a.y) * _gauss_np(a) * a.t),
    R("Grad", lambda v: apply("Grad", _gauss(v), v.y, Const(1)),
      lambda a: 2 * (a.x - a.y) * _gauss_np(a), "j"),
    R("Diff", lambda v: apply("Diff", _gauss(v), v.x, v.y),
      lambda a: -2 * ((a.x - a.y) * a.y).sum(-1, keepdims=True) * _gauss_np(a)),
    R("GradMatrix", lambda v: apply("GradMatrix", apply("Exp", v.x - v.y), v.x),
      lambda a: _diag_rows(np.exp(a.x - a.y))),
    R("Divergence", lambda v: apply("Divergence", (v.x - v.y) * _gauss(v), v.x),
      lambda a: (3 - 2 * _sqn(a.x - a.y)) * _gauss_np(a)),
    R("Laplacian", lambda v: apply("Laplacian", _gauss(v), v.x),
      lambda a: (4 * _sqn(a.x - a.y) - 6) * _gauss_np(a)),
]


def _gauss(v):
    return apply("Exp", -apply("SqDist", v.x, v.y)) * v.s


def _gauss_np(a):
    return np.exp(-_sqn(a.x - a.y)) * a.s


def _diag_rows(e):
    """GradMatrix of an elementwise map: row k = e_k on the k-th basis vector."""
    out = np.zeros(e.shape[:-1] + (9,))
    for k in range(3):
        out[..., 4 * k] = e[..., k]
    return out


def _vecmat(b, a):
    m = b.shape[-1]
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a = np.broadcast_to(a, shape + a.shape[-1:])
    b = np.broadcast_to(b, shape + b.shape[-1:])
    return (a.reshape(shape + (m, a.shape[-1] // m)) * b[..., :, None]).sum(-2)


def _tensorprod(a, b):
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a = np.broadcast_to(a, shape + a.shape[-1:])
    b = np.broadcast_to(b, shape + b.shape[-1:])
    return (a[..., :, None] * b[..., None, :]).reshape(shape + (a.shape[-1] * b.shape[-1],))


def _sh(a, *shape):
    """The inner dim of ``a`` as a row-major tensor of ``shape``."""
    return a.reshape(a.shape[:-1] + shape)


def _flat(a, rank):
    """The last ``rank`` axes flattened (row-major) into one."""
    return a.reshape(a.shape[:a.ndim - rank] + (-1,))


def _lead(*arrays):
    """The arrays broadcast over all axes but the last."""
    lead = np.broadcast_shapes(*[a.shape[:-1] for a in arrays])
    return lead, [np.broadcast_to(a, lead + a.shape[-1:]) for a in arrays]


def _kron(a, b, da, db):
    """np.kron of the tensors a (shape da) and b (shape db), pair by pair."""
    lead, (a, b) = _lead(a, b)
    out = np.empty(lead + (a.shape[-1] * b.shape[-1],))
    for idx in np.ndindex(*lead):
        out[idx] = np.kron(a[idx].reshape(da), b[idx].reshape(db)).ravel()
    return out


def _ratio(num, den):
    """num / den, 0 where den = 0 (the B-spline convention 0/0 = 0)."""
    return np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))


def _bspline(t, x, order):
    """Textbook Cox-de Boor: B_i,0 = 1 on [t_i, t_i+1); B_i,k = (x - t_i)/(t_i+k - t_i) B_i,k-1
    + (t_i+k+1 - x)/(t_i+k+1 - t_i+1) B_i+1,k-1."""
    lead, (t, x) = _lead(t, x)
    x = x[..., 0]
    K = t.shape[-1]
    B = [((t[..., i] <= x) & (x < t[..., i + 1])).astype(np.float64) for i in range(K - 1)]
    for k in range(1, order + 1):
        B = [_ratio(x - t[..., i], t[..., i + k] - t[..., i]) * B[i]
             + _ratio(t[..., i + k + 1] - x, t[..., i + k + 1] - t[..., i + 1]) * B[i + 1]
             for i in range(K - 1 - k)]
    return np.stack(B, -1)


def _softdtw_value(x, y, gamma):
    """Soft-DTW by its definition: R[0][0] = 0, R[i][j] = cost + softmin over the existing
    predecessors (the others are +inf); complex inputs allowed (for complex-step gradients)."""
    n, m = x.shape[-1], y.shape[-1]
    R = {(0, 0): 0.0}
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            preds = [R[q] for q in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if q in R]
            shift = np.min(np.stack([np.real(r) * np.ones(x.shape[:-1]) for r in preds]), 0)
            total = sum(np.exp(-(r - shift) / gamma) for r in preds)
            R[i, j] = (x[..., i - 1] - y[..., j - 1]) ** 2 + shift - gamma * np.log(total)
    return R[n, m]


def _softdtw(x, y, gamma):
    lead, (x, y) = _lead(x, y)
    gamma = np.broadcast_to(gamma, lead + (1,))[..., 0] if np.ndim(gamma) else gamma
    return _softdtw_value(x, y, gamma)[..., None]


def _softdtw_grad(x, y, gamma, h=1e-30):
    """The gradient in (x, y) by complex steps (exact to rounding, no subtraction)."""
    lead, (x, y) = _lead(x, y)
    gamma = np.broadcast_to(gamma, lead + (1,))[..., 0] if np.ndim(gamma) else gamma
    out = []
    for which, k in [(0, k) for k in range(x.shape[-1])] + [(1, k) for k in range(y.shape[-1])]:
        xc, yc = x.astype(complex), y.astype(complex)
        (xc if which == 0 else yc)[..., k] += 1j * h
        out.append(np.imag(_softdtw_value(xc, yc, gamma)) / h)
    return np.stack(out, -1)

# Ops that appear in both tables (Extract, OneHot, Pow) are covered by one name.
# Complex ops have their own table in tests/test_complex.py (which checks it covers them all).
COMPLEX = {n for n in set(OPS) | set(MACROS) if n.startswith("Complex")
           or n in ("Conj", "Real2Complex", "Imag2Complex")}
ALL_NAMES = sorted((set(OPS) | set(MACROS)) - COMPLEX)


def test_factorize_is_hash_consing():
    """A repeated sub-formula is one node: rendered and computed once (what KeOps' Factorize
    does by hand)."""
    from lazymat.codegen.c_like import Emitter

    x, y = Var(0, 3, 0), Var(1, 3, 1)
    d = apply("SqDist", x, y)
    f = apply("Exp", -d) * apply("Sin", d) + d
    assert apply("Factorize", f, d) is f
    em = Emitter([f], "float", lambda v, k: f"v{v.params[0]}[{k}]")
    assert sum(1 for n in em.nodes if n is d) == 1 and id(d) in em.materialized
    import lazymat as lm

    K = lm.Vi(np.ones((2, 3)))
    assert K.factorize() is K and K.auto_factorize() is K


def test_table_covers_every_op():
    covered = {r.op for r in ROWS}
    missing = [n for n in ALL_NAMES if n not in covered]
    assert not missing, f"ops without a row in tests/test_ops.py: {missing}"
    unknown = covered - set(ALL_NAMES)
    assert not unknown, f"rows naming no op: {unknown}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row_uses_its_op(row):
    """A primitive op's row keeps that op in its formula (no simplification ate it)."""
    f = row.build(variables(row.pdim))
    assert f.deps == 3, "each row's F must depend on both i and j (else M or N is 1)"
    if row.op in OPS and row.variant not in ("macro2",):
        assert any(n.op == row.op for n in walk(f)), f"{row.op} not in {f}"


# --------------------------------------------------------------------------- data

def _draw(rng: np.random.Generator, kind: str, shape: tuple) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "int":
        return rng.integers(-2, 3, shape).astype(float)
    if kind == "int1":
        return rng.integers(-1, 2, shape).astype(float)
    if kind == "pos":
        return rng.uniform(0.5, 2.0, shape)
    if kind == "posz":
        a = rng.uniform(0.5, 2.0, shape)
        a[rng.random(shape) < 0.2] = 0.0
        return a
    if kind == "nonzero":
        return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    if kind == "small":
        return rng.uniform(-1.5, 1.5, shape)
    if kind == "frac":  # k/20 + (0.005 .. 0.045): 0.005 away from multiples of 0.05
        return rng.integers(-40, 41, shape) / 20 + rng.uniform(0.005, 0.045, shape)
    if kind == "onehot":  # near the integers -1..5, never near a .5 rounding boundary
        return rng.integers(-1, 4, shape) + rng.uniform(-0.2, 0.2, shape)
    if kind == "sorted":  # non-decreasing along the inner dim (B-spline knots)
        return np.sort(rng.uniform(-1.5, 1.5, shape), -1)
    if kind == "sorted_int":  # knots with repeats
        return np.sort(rng.integers(-2, 3, shape), -1).astype(float)
    raise ValueError(kind)


def make_data(row: Row, M: int, N: int, dtype: str, seed: int = 0) -> dict:
    """numpy arrays of the row's variables in ``dtype``, with repeated rows (ties)."""
    rng = np.random.default_rng(seed)
    shapes = {"x": (M, 3), "y": (N, 3), "s": (M, 1), "t": (N, 1), "p": (row.pdim,),
              "w": (M, 9)}
    data = {}
    for name in NAMES:
        a = _draw(rng, row.dom.get(name, "normal"), shapes[name])
        if a.ndim == 2 and a.shape[0] > 2:
            a[1] = a[0]  # a repeated row
        data[name] = a.astype(dtype)
    return data


def oracle_sum(row: Row, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_j F_ij, Σ_j |F_ij|) in float64 from the (possibly float32) inputs."""
    a = SimpleNamespace(
        x=as64(data["x"])[:, None, :], y=as64(data["y"])[None, :, :],
        s=as64(data["s"])[:, None, :], t=as64(data["t"])[None, :, :],
        p=as64(data["p"])[None, None, :], w=as64(data["w"])[:, None, :])
    M, N = data["x"].shape[0], data["y"].shape[0]
    with np.errstate(all="ignore"):
        F = np.asarray(row.oracle(a), dtype=np.float64)
    F = np.broadcast_to(F, (M, N, F.shape[-1]))
    assert np.isfinite(F).all(), f"row {row.id}: the oracle is not finite on its domain"
    return F.sum(1), np.abs(F).sum(1)


def reduce_sum(row: Row, data: dict, backend: str, lib: str = "numpy", dtype: str = "float64"):
    f = row.build(variables(row.pdim))
    arrays = [to_lib(data[n], lib, dtype) for n in NAMES]
    (out,) = run(Request("Sum", f, axis=1), arrays, backend=backend)
    return out


SIZES = [(7, 1000), (13, 33)]


@pytest.mark.parametrize("M,N", SIZES, ids=[f"{m}x{n}" for m, n in SIZES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_op_sum_cpu_reference_dense(row, dtype, M, N):
    data = make_data(row, M, N, dtype, seed=M * 7 + N)
    want, mag = oracle_sum(row, data)
    cpu = reduce_sum(row, data, "cpu", dtype=dtype)
    ref = reduce_sum(row, data, "reference", dtype=dtype)
    check_type(cpu, "numpy", dtype)
    check_type(ref, "numpy", dtype)
    assert cpu.shape == want.shape == ref.shape, (cpu.shape, ref.shape, want.shape)
    assert_close(ref, want, dtype, mag=mag, err_msg=f"reference vs dense, {row.id}")
    assert_close(cpu, want, dtype, mag=mag, err_msg=f"cpu vs dense, {row.id}")
    assert_close(cpu, ref, dtype, mag=mag, err_msg=f"cpu vs reference, {row.id}")


@requires_torch
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_op_sum_torch(row):
    dtype = "float32"
    data = make_data(row, 9, 70, dtype, seed=3)
    want, mag = oracle_sum(row, data)
    for backend in ("cpu", "reference"):
        out = reduce_sum(row, data, backend, lib="torch", dtype=dtype)
        check_type(out, "torch", dtype)
        assert_close(out, want, dtype, mag=mag, err_msg=f"torch {backend}, {row.id}")


# --------------------------------------------------------------------------- precise math ops

PRECISE_ROWS = [r for r in ROWS if r.precise is not None]


def _wide_grid(lo: float, hi: float) -> np.ndarray:
    """0, ±1e-10 .. ±1e3 (log-spaced), and the ends, clipped to [lo, hi]."""
    mags = np.logspace(-10, 3, 261)
    pts = np.concatenate([[0.0, lo, hi], mags, -mags, np.linspace(lo, hi, 101)])
    return np.unique(pts[(pts >= lo) & (pts <= hi)])


# float32: within 16 ulps of the float64 truth of the float32 input (libmvec's vector
# functions are within 4); results below float32's smallest normal may be flushed to 0.
# float64: within 64 ulps (our lm_exp, libm, and the few roundings of Sigmoid/Softplus).
_PRECISE_TOL = {"float32": (16 * 2.0**-23, 1.2e-38), "float64": (64 * 2.0**-52, 2.3e-308)}


def _precise_data(row, dtype):
    lo, hi = row.precise[2]
    s = _wide_grid(lo, hi).astype(dtype)
    return s, np.asarray(row.precise[0](s.astype(np.float64)), dtype=np.float64)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("row", PRECISE_ROWS, ids=[r.id for r in PRECISE_ROWS])
def test_precise_ops_match_numpy_and_scipy(row, dtype, backend):
    """Forward: op(s_i) on a wide grid (tails, near 0) to within a few ulps, per point."""
    s, want = _precise_data(row, dtype)
    f = apply(row.op, Var(0, 1, 0)) * Var(1, 1, 1)
    (got,) = run(Request("Sum", f, axis=1), [s[:, None], np.ones((1, 1), dtype)],
                 backend=backend)
    got = got[:, 0].astype(np.float64)
    want = np.where(np.abs(want) > np.finfo(dtype).max, np.copysign(np.inf, want), want)
    rtol, atol = _PRECISE_TOL[dtype]
    err = np.abs(got - want)
    bad = ~((err <= rtol * np.abs(want) + atol) | (got == want))
    assert not bad.any(), (f"{row.op} {dtype} {backend}: at s = {s[bad][:5]} got {got[bad][:5]}"
                           f", want {want[bad][:5]}")


# The gradient formula is a product of a few rounded factors: a few times the tolerance.
_PRECISE_GRAD_TOL = {"float32": (32 * 2.0**-23, 1.2e-38), "float64": (256 * 2.0**-52, 2.3e-308)}


@requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("row", PRECISE_ROWS, ids=[r.id for r in PRECISE_ROWS])
def test_precise_ops_gradients(row, dtype):
    """Backward: d/ds Σ_j op(s_i) t_j by torch autograd through the compiled kernels (the
    LazyTensor method the op registers, its VJP) against the float64 derivative, per point,
    in the tails too (where 1 - tanh² would be 0)."""
    import torch

    import lazymat as lm

    s, _ = _precise_data(row, dtype)
    with np.errstate(all="ignore"):
        want = np.asarray(row.precise[1](s.astype(np.float64)), dtype=np.float64)
    si = torch.tensor(s[:, None], requires_grad=True)
    t = torch.ones((2, 1), dtype=getattr(torch, dtype))
    out = (getattr(lm.Vi(si), row.op.lower())() * lm.Vj(t)).sum(dim=1)
    assert out.dtype == getattr(torch, dtype)
    (got,) = torch.autograd.grad(out.sum(), si)
    got = got[:, 0].double().numpy() / 2  # two columns t_j = 1
    rtol, atol = _PRECISE_GRAD_TOL[dtype]
    big = np.finfo(dtype).max
    want = np.where(np.abs(want) > big, np.copysign(np.inf, want), want)  # overflows in dtype
    err = np.abs(got - want)
    bad = ~((err <= rtol * np.abs(want) + atol) | (got == want))
    assert not bad.any(), (f"{row.op} {dtype}: d/ds at s = {s[bad][:5]} got {got[bad][:5]}, "
                           f"want {want[bad][:5]}")


def test_erf_reference_without_scipy(monkeypatch):
    """scipy is optional at run time: the reference backend's numpy Erf falls back to
    math.erf per element."""
    import sys

    monkeypatch.setitem(sys.modules, "scipy.special", None)  # import fails
    s = np.linspace(-4, 4, 17)[:, None]
    f = apply("Erf", Var(0, 1, 0)) * Var(1, 1, 1)
    (got,) = run(Request("Sum", f, axis=1), [s, np.ones((1, 1))], backend="reference")
    np.testing.assert_allclose(got[:, 0], [math.erf(v) for v in s[:, 0]], rtol=1e-15)


# --------------------------------------------------------------------------- C helpers

def test_op_helpers_are_target_neutral_and_complete():
    """Each op's C helper is written once for every target (math through the target's
    macros, no __builtin_/__device__/OpenMP), calls only helpers registered before it, and
    lists the libm functions it calls (the CPU declares them for libmvec)."""
    import re

    from lazymat.codegen.c_like import TARGET_MACROS, helpers, libm_functions, prelude

    text = helpers()
    for word in ("__builtin", "__device__", "#pragma", "__float_as_int"):
        assert word not in text, word
    defined: set[str] = set()
    for op in OPS.values():
        new = set(re.findall(r"\b(?:float|double|F|void)\s+(lm_\w+)\s*\(", op.c_helper))
        used = set(re.findall(r"\b(lm_\w+)\s*\(", op.c_helper + (op.c or ""))) - new
        assert used <= defined, f"{op.name} calls {sorted(used - defined)} before their helper"
        libm = set(re.findall(r"LM_[FD]\((\w+)\)", op.c_helper)) - {"exp"}  # LM_NATIVE_EXP
        assert libm <= {name for name, _ in op.libm}, op.name
        defined |= new
    assert {"tanh", "erf", "expm1", "log1p", "sinh", "cosh"} <= {n for n, _ in libm_functions()}
    cuda = prelude(target="cuda")
    assert "__builtin" not in cuda and TARGET_MACROS["cuda"] in cuda
    for name in re.findall(r"\b(LM_[A-Z0-9_]+)\b", text):
        assert f"#define {name}" in TARGET_MACROS["cpu"] + TARGET_MACROS["cuda"] + prelude(True)
    with pytest.raises(ValueError, match="unknown target"):
        prelude(target="metal")


def test_cpu_prelude_compiles_warning_free():
    import shutil
    import subprocess

    from lazymat.codegen.c_like import prelude

    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for vector_math in (False, True):
        src = prelude(vector_math) + "\nfloat lm_use(float x) { return lm_sigmoid(x); }\n"
        run_ = subprocess.run([cxx, "-x", "c++", "-std=c++17", "-fsyntax-only", "-Wall",
                               "-Wextra", "-Werror", "-"], input=src, text=True,
                              capture_output=True, timeout=120)
        assert run_.returncode == 0, run_.stderr[-3000:]


# --------------------------------------------------------------------------- deep formulas

def test_deep_and_long_formulas_never_recurse():
    """Building, hashing, pickling, printing and differentiating Sin nested 3000 deep (beyond
    Python's recursion limit) and a sum of 2000 terms: no step recurses per level."""
    import pickle

    from lazymat.formula import grad, to_string

    x, y = Var(0, 1, 0), Var(1, 1, 1)
    deep = x
    for _ in range(3000):
        deep = apply("Sin", deep)
    long = Const(0)
    for k in range(2000):
        long = long + apply("Exp", -(x - y) * (k + 1))
    for f in (deep, long):
        assert {f: 1}[f] == 1 and hash(f) == hash(f)
        assert pickle.loads(pickle.dumps(f)) is f
        assert len(to_string(f)) < 100 * len(walk(f))  # linear: no text copied per level
        d = grad(f, x, Const(1))
        assert d.dim == 1 and len(walk(d)) < 4 * len(walk(f))
        assert pickle.loads(pickle.dumps(d)) is d


# --------------------------------------------------------------------------- simplifications

X = Var(0, 3, 0)
Y = Var(1, 3, 1)
S = Var(2, 1, 0)


def test_mult_by_zero_is_zero_constant_of_the_right_dim():
    z = X * 0
    assert z.is_const and z.value == 0 and z.dim == 3
    z = 0 * S
    assert z.is_const and z.value == 0 and z.dim == 1
    z = S * Const(0, 3)  # broadcast: the zero keeps dim 3
    assert z.is_const and z.value == 0 and z.dim == 3
    assert (X * 0) is Const(0, 3)


def test_neutral_elements_return_the_operand():
    assert (X * 1) is X
    assert (1 * X) is X
    assert (X + 0) is X
    assert (0 + X) is X
    assert (X - 0) is X
    assert (X / 1) is X
    assert (-(-X)) is X
    assert (0 - X) is (-X)


def test_neutral_elements_never_change_the_dim():
    # s (dim 1) * Const(1, 3) has dim 3: it cannot simplify to s.
    f = S * Const(1, 3)
    assert f.dim == 3 and f is not S
    g = S + Const(0, 3)
    assert g.dim == 3 and g is not S


def test_constant_folding():
    assert apply("Exp", Const(0)) is Const(1)
    assert Const(2) + Const(3) is Const(5)
    assert Const(2) * Const(3) is Const(6)
    assert apply("Sqrt", Const(4)) is Const(2)
    assert Const(1) / Const(3) is Const(Fraction(1, 3))
    assert apply("Cos", Const(0)) is Const(1)
    c = apply("Exp", Const(1))
    assert c.is_const and math.isclose(float(c.value), math.e, rel_tol=1e-15)
    # Not foldable (log of a negative): left as a node, not an exception
    f = apply("Log", Const(-1))
    assert f.op == "Log"


def test_constant_folding_of_the_keops_math_ops():
    assert apply("Floor", Const(2.5)) is Const(2)
    assert apply("Floor", Const(Fraction(-1, 3))) is Const(-1)
    assert apply("Round", Const(Fraction(5, 4)), 1) is Const(Fraction(6, 5))  # ties to even
    assert apply("Round", Const(1234), -2) is Const(1200)
    assert apply("Mod", Const(7), Const(3), Const(0)) is Const(1)
    assert apply("Mod", Const(-1), Const(3), Const(Fraction(1, 2))) is Const(2)
    assert apply("ClampInt", Const(5), 0, 2) is Const(2)
    assert apply("DiffClampInt", Const(2), 0, 2) is Const(1)
    assert apply("DiffClampInt", Const(3), 0, 2) is Const(0)
    assert apply("XLogX", Const(0)) is Const(0)
    assert apply("SinXDivX", Const(0)) is Const(1)
    assert apply("Atan2", Const(0), Const(1)) is Const(0)
    assert apply("Acos", Const(2)).op == "Acos"  # outside the domain: not folded
    # the transposes: constants stay constants (a constant vector prints as SumT(c, d))
    assert apply("SumT", Const(2), 3) is Const(2, 3)
    assert apply("SumT", S, 1) is S
    assert apply("ElemT", Const(0), 3, 1) is Const(0, 3)
    assert apply("ExtractT", X, 0, 3) is X
    assert apply("ExtractT", Const(0, 3), 1, 5) is Const(0, 5)


def test_transposes_are_the_adjoints_of_sum_elem_extract():
    from lazymat.formula import grad

    e1, e5 = Var(9, 1, 0), Var(9, 5, 0)
    assert grad(apply("SumT", S, 3), S, Const(1, 3)) is Const(3)
    assert grad(apply("ElemT", S, 4, 2), S, Var(9, 4, 0)) is apply("Elem", Var(9, 4, 0), 2)
    assert grad(apply("ExtractT", X, 1, 5), X, e5) is apply("Extract", e5, 1, 3)
    assert grad(apply("Sum", X), X, e1).dim == 3


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sinxdivx_derivatives_are_finite_at_zero(backend):
    from lazymat.formula import grad

    s, t = Var(0, 1, 0), Var(1, 1, 1)
    d1 = grad(apply("SinXDivX", s * t), s, Const(1))  # t * sinc'(s t)
    d2 = grad(d1, s, Const(1))
    xs = np.array([[0.0], [1e-3], [0.5], [-2.0]])
    (g1, g2) = (run(Request("Sum", f, axis=1), [xs, np.ones((1, 1))], backend=backend)[0]
                for f in (d1, d2))
    z = xs[:, 0]
    with np.errstate(all="ignore"):
        want = np.where(z == 0, 0.0, (np.cos(z) - np.sin(z) / z) / z)
    np.testing.assert_allclose(g1[:, 0], want, rtol=1e-7, atol=1e-9)
    assert np.isfinite(g2).all()


def test_lazytensor_keops_math_methods():
    import lazymat as lm

    rng = np.random.default_rng(4)
    x, y = rng.uniform(-0.9, 0.9, (6, 1)), rng.uniform(0.5, 2.0, (8, 1))
    x[0] = 0.0  # sinc, sinxdivx and xlogx at 0
    X, Y = lm.Vi(x), lm.Vj(y)
    a, b = x[:, None, :], y[None, :, :]
    ax = np.abs(a)
    pairs = [
        (X.acos() * Y, np.arccos(a) * b), (X.asin() * Y, np.arcsin(a) * b),
        (X.atan() * Y, np.arctan(a) * b), (X.atan2(Y), np.arctan2(a, b)),
        ((X * Y * 10).floor(), np.floor(a * b * 10)), ((X * Y).round(1), np.round(a * b, 1)),
        ((X * Y * 10).round(), np.round(a * b * 10)), ((X - Y).mod(0.7), (a - b) % 0.7),
        (X.mod(Y, 0.25), a - b * np.floor((a - 0.25) / b)),
        (abs(X).xlogx() * Y, np.where(ax == 0, 0, ax * np.log(np.where(ax == 0, 1, ax))) * b),
        ((X * Y).sinxdivx(), np.sinc(a * b / np.pi)), ((X * Y).sinc(), np.sinc(a * b)),
    ]
    f = pairs[0][0]
    for lazy, _ in pairs[1:]:
        f = f.concat(lazy)
    dense = np.concatenate([np.broadcast_to(w, (6, 8, 1)) for _, w in pairs], -1)
    np.testing.assert_allclose(f.sum(dim=1), dense.sum(1), rtol=1e-10, atol=1e-10)


def test_exact_constant_divisor_becomes_multiplier():
    assert (X / 2) is (Const(Fraction(1, 2)) * X)


def test_hash_consing():
    assert (X + Y) is (X + Y)
    assert Var(0, 3, 0) is X
    assert Var(0, 2, 0) is not X
    assert apply("SqDist", X, Y) is apply("SqDist", X, Y)
    assert apply("Exp", -apply("SqDist", X, Y)) is apply("Exp", -apply("SqDist", X, Y))
    assert (X + Y) is not (Y + X)
    assert hash(X + Y) == hash(X + Y)
    d = {X + Y: 1}
    assert d[X + Y] == 1


# --------------------------------------------------------------------------- tensor algebra,
# B-splines, soft-DTW: what the table does not show

TENSOR_ROWS = [r for r in ROWS if r.op in ("TensorDot", "Kron")]


@pytest.mark.parametrize("row", TENSOR_ROWS, ids=[r.id for r in TENSOR_ROWS])
def test_tensordot_loops_match_the_unrolled_sums(row, monkeypatch):
    """Above TENSORDOT_UNROLL_LIMIT products, TensorDot's C code loops over the axes."""
    from lazymat.backends import cpu
    from lazymat.formula.ops import tensordot

    monkeypatch.setattr(tensordot, "TENSORDOT_UNROLL_LIMIT", 0)
    monkeypatch.setattr(cpu, "kernels", {})
    data = make_data(row, 13, 33, "float64", seed=5)
    want, mag = oracle_sum(row, data)
    assert_close(reduce_sum(row, data, "cpu"), want, "float64", mag=mag, err_msg=row.id)


def test_tensordot_parameters_are_canonical():
    a, b = Var(0, 6, 0), Var(1, 3, 1)
    f = apply("TensorDot", a, b, [2, 3], [3], [1], [0])
    assert f.params == ((2, 3), (3,), (1,), (0,)) and f.dim == 2
    assert apply("TensorDot", a, b, (2, 3), 3, 1, 0) is f  # a lone int is a list of one
    assert apply("TensorDot", a, b, [2, 3], [3], [1], [0], [0, 1]) is f  # identity: dropped
    assert make("TensorDot", (a, b), ((2, 3), (3,), (1,), (0,), (0, 1))) is f
    assert apply("Kron", X, Y, [3], [3]) is apply("TensorDot", X, Y, [3], [3], [], [])
    assert apply("TensorDot", a, Const(0, 3), [2, 3], [3], [1], [0]) is Const(0, 2)
    assert apply("TensorDot", Const(2, 6), Const(Fraction(1, 2), 3), [2, 3], [3], [1],
                 [0]) is Const(3, 2)


@pytest.mark.parametrize("args,fragment", [
    (([2, 3], [3], [0], [0]), "axis 0 of a \\(size 2\\) cannot be contracted"),
    (([3, 3], [3], [1], [0]), "a has dim 6 but its shape \\[3, 3\\]"),
    (([2, 3], [3], [1], []), "same length"),
    (([2, 3], [3], [2], [0]), "distinct axes"),
    (([2, 3], [3], [], [], [0, 0, 1]), "permutation of 0..2"),
    (([2, 3], [3], [1], [0], [1]), "permutation of 0..0"),
    (([2, 3], [3], [1.5], [0]), "list of integers"),
])
def test_tensordot_shape_errors(args, fragment):
    import lazymat as lm

    with pytest.raises(lm.ShapeError, match=fragment):
        apply("TensorDot", Var(0, 6, 0), Var(1, 3, 1), *args)
    with pytest.raises(lm.ShapeError, match="4 or 5 integer lists"):
        make("TensorDot", (Var(0, 6, 0), Var(1, 3, 1)), ((2, 3), (3,), (1,)))


def test_kron_and_bspline_and_softdtw_shape_errors():
    import lazymat as lm

    with pytest.raises(lm.ShapeError, match="same rank"):
        apply("Kron", Var(0, 6, 0), Y, [2, 3], [3])
    with pytest.raises(lm.ShapeError, match="at least 5 knots"):
        apply("BSpline", Var(0, 4, 0), Var(1, 1, 1), 3)
    with pytest.raises(lm.ShapeError, match="scalar"):
        apply("BSpline", Var(0, 6, 0), Y, 1)
    with pytest.raises(lm.ShapeError, match=">= 0"):
        apply("BSpline", Var(0, 6, 0), Var(1, 1, 1), -1)
    with pytest.raises(lm.ShapeError, match="gamma must be a scalar"):
        apply("SoftDTW_SqDist", X, Y, Var(2, 2, 2))
    with pytest.raises(lm.ShapeError, match="no integer parameters"):
        apply("GradSoftDTW_SqDist", X, Y, S, 2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bspline_matches_scipy(backend):
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(6)
    knots = np.sort(rng.uniform(-2, 2, 9))
    knots[4] = knots[3]  # a double knot
    xs = rng.uniform(-2.5, 2.5, (40, 1))
    for order in (0, 1, 3):
        f = apply("BSpline", Var(0, 9, 2), Var(1, 1, 0), order) * Var(2, 1, 1)
        (got,) = run(Request("Sum", f, axis=1), [knots, xs, np.ones((1, 1))], backend=backend)
        want = np.stack([np.nan_to_num(interpolate.BSpline.basis_element(
            knots[i:i + order + 2], extrapolate=False)(xs[:, 0])) for i in range(8 - order)], -1)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        if order > 0:  # a partition of unity inside [t_order, t_{K-1-order})
            inside = (xs[:, 0] >= knots[order]) & (xs[:, 0] < knots[8 - order])
            np.testing.assert_allclose(got[inside].sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch)])
def test_lazytensor_tensor_algebra_methods(lib):
    import lazymat as lm

    rng = np.random.default_rng(7)
    M, N = 5, 6
    a, b = rng.standard_normal((M, 6)), rng.standard_normal((N, 6))
    A, B = lm.Vi(to_lib(a, lib)), lm.Vj(to_lib(b, lib))
    ai, bj = a[:, None, :], b[None, :, :]
    kron2 = np.stack([[np.kron(a[i].reshape(2, 3), b[j].reshape(3, 2)).ravel()
                       for j in range(N)] for i in range(M)])
    kron3 = np.stack([[np.kron(a[i].reshape(1, 2, 3), b[j].reshape(3, 1, 2)).ravel()
                       for j in range(N)] for i in range(M)])
    c = rng.standard_normal((M, 3 * 4 * 2))  # shape (3, 4, 2) contracted with b (2, 3)
    C = lm.Vi(to_lib(c, lib))
    pairs = [
        (A.keops_kron(B, (2, 3), (3, 2)), kron2),
        (A.keops_kron(B, [1, 2, 3], [3, 1, 2]), kron3),
        (A.tensorprod(B), (ai[..., :, None] * bj[..., None, :]).reshape(M, N, 36)),
        (A.matvecmult(B.extract(0, 3)), np.einsum("...ab,...b->...a", ai.reshape(M, 1, 2, 3),
                                                  bj[..., :3])),
        (B.extract(0, 2).vecmatmult(A), np.einsum("...a,...ab->...b", bj[..., :2],
                                                  ai.reshape(M, 1, 2, 3))),
        # b as (2, 3): its axis 1 pairs with c's axis 0; kept (c1, c2, b0) go to (1, 2, 0)
        (C.keops_tensordot(B, (3, 4, 2), (2, 3), (0,), (1,), (1, 2, 0)),
         np.einsum("...iak,...bi->...bak", c.reshape(M, 1, 3, 4, 2),
                   b.reshape(1, N, 2, 3)).reshape(M, N, 16)),
        (C.keops_tensordot(B, (3, 4, 2), (2, 3), (0, 2), (1, 0)),
         np.einsum("...iak,...ki->...a", c.reshape(M, 1, 3, 4, 2), b.reshape(1, N, 2, 3))),
    ]
    for lazy, dense in pairs:
        got = lazy.sum(dim=1)
        assert lazy.ndim == dense.shape[-1]
        np.testing.assert_allclose(as64(got), dense.sum(1), rtol=1e-10, atol=1e-10)


def test_lazytensor_bspline_and_softdtw_methods():
    import lazymat as lm

    rng = np.random.default_rng(8)
    knots, x = np.sort(rng.uniform(-1, 1, (6, 7)), -1), rng.uniform(-1.2, 1.2, (5, 1))
    got = lm.Vj(knots).bspline(lm.Vi(x), 2).sum(dim=1)
    np.testing.assert_allclose(got, _bspline(knots[None], x[:, None], 2).sum(1), rtol=1e-12)
    assert lm.Vj(knots).bspline(lm.Vi(x)).ndim == 6  # k = 0 by default
    u, v = rng.standard_normal((5, 4)), rng.standard_normal((6, 3))
    for gamma in (0.3, 1):
        got = lm.Vi(u).softdtw_sqdist(lm.Vj(v), gamma).sum(dim=1)
        want = _softdtw(u[:, None], v[None], float(gamma)).sum(1)
        np.testing.assert_allclose(got, want, rtol=1e-10)
