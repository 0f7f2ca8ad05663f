"""LazyTensor: a symbolic M×N matrix F(p, x_i, y_j), reduced without being stored.

One class for numpy and torch: results come back in the library, device and
dtype of the inputs.

>>> import numpy as np
>>> x, y = np.random.randn(5, 3), np.random.randn(7, 3)
>>> K = (-Vi(x).sqdist(Vj(y))).exp()       # 5 x 7, symbolic
>>> K.sum(dim=1).shape
(5, 1)
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from . import autograd, config, plan
from .arraylib import is_array, is_dask, is_torch, lib_of
from .errors import DtypeError, ShapeError
from .formula import I_CAT, J_CAT, OPS, P_CAT, Const, Node, Var, apply, substitute, variables, walk

_ROLE = {I_CAT: "Vi", J_CAT: "Vj", P_CAT: "Pm"}
#: what ``LazyTensor(...)`` returns while torch.compile traces: [a function making it]
COMPILED: list = []
_float_uids: dict[float, int] = {}
_float_counter = itertools.count(1)
_ndarray, _np_array = np.ndarray, np.array


class _Leaf:
    """The data behind one variable: an array, or a Python float turned parameter.

    ``source`` keeps the user's object alive: its ``id`` names the variable, so
    the same arrays give the same (interned) formula on every call and every
    per-formula cache hits.
    """

    __slots__ = ("array", "value", "cat", "source", "complex", "symbolic")

    def __init__(self, array: Any, value: float | complex | None, cat: int, source: Any = None,
                 complex: bool = False, symbolic: tuple[int, int] | None = None):
        self.array, self.value, self.cat, self.source = array, value, cat, source
        self.complex = complex  # array holds interleaved (re, im) pairs of complex data
        #: (index, dim) of a symbolic variable, whose array comes when the reduction is called
        self.symbolic = symbolic

    @property
    def rows(self) -> int:
        return int(self.array.shape[-2]) if self.array is not None and self.cat != P_CAT else 1

    @property
    def batch(self) -> tuple[int, ...]:
        if self.array is None:
            return ()
        return tuple(self.array.shape[:-1 if self.cat == P_CAT else -2])


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and (
        is_array(x) or is_dask(x) or type(x).__module__.startswith("numpy"))


class LazyTensor:
    """A symbolic matrix (or, before any i/j variable enters, a symbolic vector).

    Build one with :func:`Vi`, :func:`Vj`, :func:`Pm` or, as in pykeops,
    ``LazyTensor(x[:, None, :])`` (i), ``LazyTensor(y[None, :, :])`` (j),
    ``LazyTensor(p)`` for a 1-D array or a float (parameter).

    >>> import numpy as np
    >>> x, y = np.random.rand(4, 1, 3), np.random.rand(1, 6, 3)
    >>> D_ij = ((LazyTensor(x) - LazyTensor(y)) ** 2).sum(-1)  # pykeops' layout
    >>> D_ij.shape, D_ij.argmin(dim=1).shape
    ((4, 6), (4, 1))
    """

    __array_ufunc__ = None  # numpy operators defer to ours
    __array_priority__ = 1000
    #: runs a reduction (plan.run's signature); a front end for another array library
    #: (lazymat.jax) subclasses LazyTensor and sets its own
    _run = staticmethod(autograd.run)

    def __new__(cls, *args: Any, **kwargs: Any):
        # Inside torch.compile, a trace-friendly LazyTensor (lazymat/torch/traced.py, which
        # lazymat/__init__.py plugs in here: it subclasses this class).
        if cls is LazyTensor and COMPILED and autograd.compiling():
            return COMPILED[0]()
        return object.__new__(cls)

    def __init__(self, x: Any = None, axis: int | None = None, is_complex: bool = False):
        #: block-sparse ranges (KeOps' 6-tuple) used by the reductions, or None
        self.ranges: tuple | None = None
        if isinstance(x, LazyTensor):
            self.formula, self._leaves, self.ranges = x.formula, x._leaves, x.ranges
            self.is_complex = x.is_complex
            self.__class__ = _klass(type(self), self.is_complex)
            return
        node, leaves = _leaf(x, axis)
        self.formula: Node = node
        self._leaves: dict[tuple[int, int], _Leaf] = leaves  # (uid, cat) -> data
        #: complex values: the formula holds D complex numbers as 2D interleaved reals
        self.is_complex = any(leaf.complex for leaf in leaves.values())
        if is_complex and not self.is_complex:  # pykeops' LazyTensor(x, is_complex=True)
            promoted = self.real2complex()
            self.formula, self._leaves, self.is_complex = (promoted.formula, promoted._leaves,
                                                           True)
        self.__class__ = _klass(type(self), self.is_complex)

    @classmethod
    def _make(cls, formula: Node, leaves: dict[int, _Leaf], ranges: tuple | None = None,
              is_complex: bool = False) -> "LazyTensor":
        lt = object.__new__(_klass(cls, is_complex))
        lt.formula, lt._leaves, lt.ranges, lt.is_complex = formula, leaves, ranges, is_complex
        return lt

    # ------------------------------------------------------------------ description
    #: pykeops' duck-typing flag (libraries test ``hasattr(x, "__GenericLazyTensor__")``)
    __GenericLazyTensor__ = True
    #: settable default backend of the reductions (pykeops' ``K.backend = "CPU"``)
    backend: str | None = None

    @property
    def ndim(self) -> int:
        """Number of components of the formula's value (the inner dim), as in pykeops."""
        return self.formula.dim // 2 if self.is_complex else self.formula.dim

    def _size(self, cat: int) -> int:
        return _rows(self._leaves, cat) or 1

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The broadcast batch dims of the operands (empty without batch)."""
        return _batch_shape(self._leaves)

    @property
    def nbatchdims(self) -> int:
        return len(self.batch_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """(..., M, N) or (..., M, N, D): the trailing 1 is dropped, as in pykeops."""
        base = self.batch_shape + (self._size(I_CAT), self._size(J_CAT))
        return base if self.ndim == 1 else base + (self.ndim,)

    @property
    def _shape(self) -> tuple[int, ...]:
        """pykeops' internal shape: batch + (M, N, D), the inner dim D always present."""
        return self.batch_shape + (self._size(I_CAT), self._size(J_CAT), self.ndim)

    def dim(self) -> int:
        """The number of axes of ``_shape`` (as pykeops: nbatchdims + 3)."""
        return len(self._shape)

    @property
    def batchdims(self) -> tuple[int, ...] | None:
        return self.batch_shape or None

    @property
    def ni(self) -> int | None:
        return _rows(self._leaves, I_CAT)

    @property
    def nj(self) -> int | None:
        return _rows(self._leaves, J_CAT)

    def _like(self) -> Any:
        return next((leaf.array for leaf in self._leaves.values() if leaf.array is not None),
                    None)

    @property
    def dtype(self) -> str | None:
        """The dtype name of the data ("float32", "float64", ...), None before any array, as
        in pykeops."""
        like = self._like()
        return None if like is None else str(like.dtype).replace("torch.", "")

    @property
    def tools(self) -> Any:
        """pykeops' array helpers for the library of the data (``torchtools``/``numpytools``)."""
        like = self._like()
        if like is not None and is_torch(like):
            from .torch.utils import torchtools

            return torchtools
        from .numpy.utils import numpytools

        return numpytools

    @property
    def variables(self) -> tuple:
        """The arrays of the formula (pykeops' attribute)."""
        return tuple(leaf.array for leaf in self._leaves.values() if leaf.array is not None)

    @property
    def symbolic_variables(self) -> tuple:
        """(index, dim, cat) of each symbolic variable."""
        return tuple(sorted((*leaf.symbolic, leaf.cat) for leaf in self._leaves.values()
                            if leaf.symbolic))

    def bound(self) -> tuple[Node, list]:
        """The formula with its variables numbered by argument position, and the arrays at
        those positions: what a reduction of this LazyTensor runs.

        >>> import numpy as np
        >>> f, arrays = Vi(np.ones((2, 1))).exp().bound()
        >>> len(arrays)
        1
        """
        f, _, arrays, _ = _bind(self.formula, None, self._leaves)
        return f, arrays

    def dense(self) -> Any:
        """The symbolic matrix as an array of shape ``self.shape`` (for small problems)."""
        from .formula.evaluate import batch_slices, evaluate, stack_batches

        size = math.prod(self.shape)
        if size > 2**27:
            raise ShapeError(f"dense() would build {size:,} numbers (shape {self.shape}); "
                             f"use a reduction instead")
        f, _, arrays, _ = _bind(self.formula, None, self._leaves)
        like = next(leaf.array for leaf in self._leaves.values() if leaf.array is not None)
        xp = lib_of(like)
        M, N, batch = self._size(I_CAT), self._size(J_CAT), self.batch_shape
        values = [xp.broadcast_to(evaluate([f], sliced, slice(None), slice(None), xp, like)[0],
                                  (M, N, f.dim))
                  for sliced in batch_slices([f], arrays, batch)]
        out = stack_batches(xp, values, batch) if batch else values[0]
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, formula={self.formula!r})"

    def __len__(self) -> int:
        return self._size(I_CAT)

    # ------------------------------------------------------------------ building
    def _unary(self, op: str, *params: Any, is_complex: bool = False) -> "LazyTensor":
        if self.is_complex and op not in _COMPLEX_UNARY and not is_complex:
            raise DtypeError(f"{op} is not defined for complex LazyTensors; use .real, .imag, "
                             f".abs(), .angle(), .conj(), .exp() or arithmetic")
        return type(self)._make(_apply(op, (self.formula,), params), self._leaves, self.ranges,
                                _COMPLEX_UNARY.get(op, is_complex) if self.is_complex
                                else is_complex)

    def _combine(self, op: str, *others: Any, params: tuple = (), symbol: str | None = None
                 ) -> "LazyTensor":
        if len(others) == 1 and type(self) is LazyTensor:  # the usual case, made quick
            other = _as_lazy(others[0])
            others = (other,)
            if type(other) is LazyTensor and not (self.is_complex or other.is_complex):
                leaves = _merged_pair(self._leaves, other._leaves)
                if leaves is not None:
                    try:
                        node = _apply(op, (self.formula, other.formula), params)
                    except ShapeError as e:
                        raise ShapeError(f"{symbol or op}: {_describe(self)}, "
                                         f"{_describe(other)}: {e}") from None
                    lt = object.__new__(LazyTensor)
                    lt.formula, lt._leaves, lt.is_complex = node, leaves, False
                    lt.ranges = self.ranges if self.ranges is not None else other.ranges
                    return lt
        operands = [self] + [_as_lazy(o) for o in others]
        leaves = _merge_leaves(operands)
        is_complex = any(o.is_complex for o in operands)
        formulas = tuple([o.formula for o in operands])
        if is_complex:
            op, formulas = _complex_version(op, operands)
        try:
            node = _apply(op, formulas, params)
        except ShapeError as e:
            described = ", ".join(f"{_describe(o)}" for o in operands)
            raise ShapeError(f"{symbol or op}: {described}: {e}") from None
        ranges = next((o.ranges for o in operands if o.ranges is not None), None)
        # The most derived class wins: 1.0 + jax_lazy_tensor stays a jax LazyTensor.
        cls = _klass(type(self), False)
        for o in operands:
            other = _klass(type(o), False)
            if other is not cls and len(other.__mro__) > len(cls.__mro__):
                cls = other
        return cls._make(node, leaves, ranges, is_complex)

    def factorize(self, other: "LazyTensor | None" = None) -> "LazyTensor":
        """KeOps' factorize/auto_factorize: a no-op here, since formulas are hash-consed (a
        repeated sub-formula is one node, computed once per pair)."""
        return self

    auto_factorize = factorize

    # ------------------------------------------------------------------ complex numbers
    @property
    def real(self) -> "LazyTensor":
        return self._unary("ComplexReal") if self.is_complex else self

    @property
    def imag(self) -> "LazyTensor":
        if not self.is_complex:
            return self * 0
        return self._unary("ComplexImag")

    def conj(self) -> "LazyTensor":
        return self._unary("Conj") if self.is_complex else self

    def angle(self) -> "LazyTensor":
        if not self.is_complex:
            raise DtypeError("angle() needs a complex LazyTensor")
        return self._unary("ComplexAngle")

    def exp1j(self) -> "LazyTensor":
        """exp(i·self) for a real LazyTensor: a complex LazyTensor."""
        if self.is_complex:
            raise DtypeError("exp1j() needs a real LazyTensor")
        return self._unary("ComplexExp1j", is_complex=True)

    def real2complex(self) -> "LazyTensor":
        return self._unary("Real2Complex", is_complex=True)

    def imag2complex(self) -> "LazyTensor":
        return self._unary("Imag2Complex", is_complex=True)

    def __add__(self, o): return self._combine("Add", o, symbol="+")
    def __radd__(self, o): return _as_lazy(o)._combine("Add", self, symbol="+")
    def __sub__(self, o): return self._combine("Subtract", o, symbol="-")
    def __rsub__(self, o): return _as_lazy(o)._combine("Subtract", self, symbol="-")
    def __mul__(self, o): return self._combine("Mult", o, symbol="*")
    def __rmul__(self, o): return _as_lazy(o)._combine("Mult", self, symbol="*")
    def __truediv__(self, o): return self._combine("Divide", o, symbol="/")
    def __rtruediv__(self, o): return _as_lazy(o)._combine("Divide", self, symbol="/")
    def __neg__(self): return self._unary("Minus")
    def __abs__(self): return self.abs()

    def __or__(self, o):
        """``x | y``: dot product (dim 1)."""
        return self._combine("Scalprod", o, symbol="|")

    def __ror__(self, o): return _as_lazy(o)._combine("Scalprod", self, symbol="|")

    def __lt__(self, o): return self._combine("LessThan", o, symbol="<")
    def __gt__(self, o): return _as_lazy(o)._combine("LessThan", self, symbol=">")
    def __le__(self, o): return self._combine("LessOrEqual", o, symbol="<=")
    def __ge__(self, o): return _as_lazy(o)._combine("LessOrEqual", self, symbol=">=")
    def __eq__(self, o): return self._combine("Equal", o, symbol="==")  # type: ignore[override]
    def __ne__(self, o): return self._combine("NotEqual", o, symbol="!=")  # type: ignore[override]
    __hash__ = object.__hash__

    def __pow__(self, other: Any) -> "LazyTensor":
        if isinstance(other, int) and not isinstance(other, bool):
            return self._unary("Pow", other)
        if isinstance(other, float) and other == 0.5:
            return self.sqrt()
        if isinstance(other, float) and other == -0.5:
            return self.rsqrt()
        return self._combine("Powf", other, symbol="**")

    def power(self, other: Any) -> "LazyTensor":
        return self ** other

    def exp(self): return self._unary("ComplexExp" if self.is_complex else "Exp")
    def log(self): return self._unary("Log")
    def sqrt(self): return self._unary("Sqrt")
    def rsqrt(self): return self._unary("Rsqrt")
    def inv(self): return self._unary("Inv")
    def sin(self): return self._unary("Sin")
    def cos(self): return self._unary("Cos")
    def acos(self): return self._unary("Acos")
    def asin(self): return self._unary("Asin")
    def atan(self): return self._unary("Atan")
    def atan2(self, other): return self._combine("Atan2", other, symbol="atan2")
    def floor(self): return self._unary("Floor")
    def round(self, d: int = 0): return self._unary("Round", int(d))
    def mod(self, modulus, offset=0): return self._combine("Mod", modulus, offset, symbol="mod")
    def xlogx(self): return self._unary("XLogX")
    def sinxdivx(self): return self._unary("SinXDivX")

    def sinc(self):
        """sin(πx)/(πx), 1 at 0 (the convention of torch.sinc and numpy.sinc)."""
        return (self * math.pi)._unary("SinXDivX")

    # tensor algebra, B-splines and soft-DTW on the inner dim (KeOps names)
    def matvecmult(self, v):
        """Row-major matrix (self, dim m*n) times vector (v, dim n): dim m."""
        return self._combine("MatVecMult", v, symbol="matvecmult")

    def vecmatmult(self, v):
        """Vector (self, dim m) times row-major matrix (v, dim m*n): dim n."""
        return self._combine("VecMatMult", v, symbol="vecmatmult")

    def tensorprod(self, v):
        """Outer product, row-major (dim self.ndim * v.ndim)."""
        return self._combine("TensorProd", v, symbol="tensorprod")

    def keops_tensordot(self, y, dimfa, dimfb, contfa, contfb, *permute):
        """TensorDot(self, y, dimfa, dimfb, contfa, contfb[, permute]): contraction of the
        row-major tensors self (shape dimfa) and y (shape dimfb) over the axes contfa of self
        and contfb of y; kept axis p goes to output axis permute[p] (pykeops passes the
        permutation as one sequence; separate ints are accepted too)."""
        if len(permute) == 1 and not isinstance(permute[0], int):
            permute = () if permute[0] is None else tuple(permute[0])
        params = (dimfa, dimfb, contfa, contfb) + ((permute,) if permute else ())
        return self._combine("TensorDot", y, params=params, symbol="keops_tensordot")

    def keops_kron(self, y, dimfa, dimfb):
        """Kronecker product of the row-major tensors self (shape dimfa) and y (shape dimfb),
        of the same rank (np.kron)."""
        return self._combine("Kron", y, params=(dimfa, dimfb), symbol="keops_kron")

    def bspline(self, x, k: int = 0):
        """The B-spline basis functions of degree k with the knots self (dim K), at the scalar
        x: dim K - k - 1. Not differentiable (as in KeOps)."""
        return self._combine("BSpline", x, params=(int(k),), symbol="bspline")

    def softdtw_sqdist(self, y, gamma):
        """Soft-DTW between the series self and y (squared-difference cost) with smoothing
        gamma > 0 (a scalar): dim 1. Differentiable in self and y, not in gamma."""
        return self._combine("SoftDTW_SqDist", y, gamma, symbol="softdtw_sqdist")

    def abs(self): return self._unary("ComplexAbs" if self.is_complex else "Abs")
    def sign(self): return self._unary("Sign")
    def step(self): return self._unary("Step")
    def relu(self): return self._unary("ReLU")
    def square(self): return self._unary("Square")
    def sqnorm2(self): return self._unary("SqNorm2")
    def norm2(self): return self._unary("Norm2")
    def normalize(self): return self._unary("Normalize")
    def one_hot(self, D: int): return self._unary("OneHot", int(D))

    def norm(self, dim: int = -1) -> "LazyTensor":
        """The Euclidean norm of the components: dim -1 or nbatchdims + 2 (the feature axis)."""
        if not self._inner_axis(dim):
            raise ShapeError(f"norm is over the inner (feature) axis only: dim=-1 or "
                             f"{self.nbatchdims + 2}, got {dim}")
        return self.norm2()

    def sqdist(self, other): return self._combine("SqDist", other, symbol="sqdist")
    def weightedsqnorm(self, s): return _as_lazy(s)._combine("WeightedSqNorm", self)
    def weightedsqdist(self, other, s): return _as_lazy(s)._combine("WeightedSqDist", self, other)
    def clamp(self, lo, hi): return self._combine("Clamp", lo, hi, symbol="clamp")
    def ifelse(self, a, b): return self._combine("IfElse", a, b, symbol="ifelse")
    def concat(self, other): return self._combine("Concat", other, symbol="concat")

    def elem(self, i: int) -> "LazyTensor":
        return self._unary("Elem", _index(i, self.ndim))

    def extract(self, start: int, d: int) -> "LazyTensor":
        return self._unary("Extract", int(start), int(d))

    def __getitem__(self, key: Any) -> "LazyTensor":
        if isinstance(key, tuple):
            if any(k != slice(None) for k in key[:-1]):
                raise ShapeError("only the inner (last) dimension of a LazyTensor can be indexed")
            key = key[-1]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.ndim)
            if step != 1 or stop <= start:
                raise ShapeError(f"slice {key} of a formula of dim {self.ndim} must be non-empty "
                                 f"with step 1")
            return self.extract(start, stop - start)
        return self.elem(key)

    def t(self) -> "LazyTensor":
        """The transposed symbolic matrix (i and j swapped)."""
        mapping = {}
        for v in variables(self.formula):
            uid, dim, cat = v.params
            if cat in (I_CAT, J_CAT):
                mapping[v] = Var(uid, dim, J_CAT if cat == I_CAT else I_CAT)
        swap = {I_CAT: J_CAT, J_CAT: I_CAT, P_CAT: P_CAT}
        leaves = {(uid, swap[cat]): _Leaf(leaf.array, leaf.value, swap[cat], leaf.source,
                                          leaf.complex, leaf.symbolic)
                  for (uid, cat), leaf in self._leaves.items()}
        ranges = None if self.ranges is None else tuple(self.ranges[3:]) + tuple(self.ranges[:3])
        return type(self)._make(substitute(self.formula, mapping), leaves, ranges,
                                self.is_complex)

    @property
    def T(self) -> "LazyTensor":
        return self.t()

    # ------------------------------------------------------------------ symbolic calculus
    def _calculus(self, name: str, v: "LazyTensor", *others: Any) -> "LazyTensor":
        if not isinstance(v, LazyTensor) or v.formula.op != "Var":
            raise ShapeError(f"{name}: differentiate with respect to a variable made by Vi, Vj "
                             f"or Pm, got {v!r}")
        return self._combine(name, v, *others, symbol=name)

    def grad(self, v: "LazyTensor", gradin: Any) -> "LazyTensor":
        """gradinᵀ ∂self/∂v, a new LazyTensor of v's dim: ``K.grad(x_i, b_i)``."""
        return self._calculus("Grad", v, gradin)

    def diff(self, v: "LazyTensor", u: Any) -> "LazyTensor":
        """The directional derivative (∂self/∂v) u."""
        return self._calculus("Diff", v, u)

    def grad_matrix(self, v: "LazyTensor") -> "LazyTensor":
        """The transposed Jacobian ∂self/∂v, flattened (dim self.ndim * v.ndim)."""
        return self._calculus("GradMatrix", v)

    def divergence(self, v: "LazyTensor") -> "LazyTensor":
        return self._calculus("Divergence", v)

    def laplacian(self, v: "LazyTensor") -> "LazyTensor":
        return self._calculus("Laplacian", v)

    # ------------------------------------------------------------------ reductions
    def _reduce(self, name: str, dim: Any, K: Any = None, weight: Any = None,
                backend: str = "auto", out: Any = None, axis: Any = None, ranges: Any = None,
                call: bool = True, other: Any = None, opt_arg: Any = None,
                is_complex: Any = None, **options: Any):
        # Small calls' fast path: this LazyTensor reduced the same way before, on numpy
        # arrays whose layout has not changed since: rerun the bound call.
        bound_key = hit = None
        if (not options and call and weight is None and other is None and out is None
                and axis is None and ranges is None and opt_arg is None and is_complex is None
                and type(dim) is int and (K is None or type(K) is int)
                and self.ranges is None and not self.is_complex
                and type(self)._run is LazyTensor._run):
            bound_key = (name, dim, K, self.backend if backend == "auto" else backend)
            calls = self.__dict__.get("_bound")
            hit = calls.get(bound_key) if calls else None
            if hit is not None and hit is not _SEEN and plan.layout_key(hit[1]) == hit[2]:
                outs = hit[0](hit[1])
                if outs is not None:
                    return outs[0] if len(outs) == 1 else tuple(outs)
        # A LazyTensor built anew for each call (the usual code) finds its bound call among
        # all reductions of the same renumbered formula on arrays of the same layout.
        shared = shared_entry = None
        if bound_key is not None and hit is None:
            shared = _shared_call(self._leaves, self.formula, bound_key)
            if shared is not None:
                shared_entry = _shared_calls.get(shared[0])
                if shared_entry is not None and shared_entry is not _SEEN:
                    outs = shared_entry(shared[1])
                    if outs is not None:
                        return outs[0] if len(outs) == 1 else tuple(outs)
                    _shared_calls.pop(shared[0], None)  # bound for another thread count
                    shared_entry = None
        plan.check_options(name, options)
        if axis is not None:
            dim = axis
        # pykeops' spellings: other= is the weight, opt_arg= is K; is_complex is implied here
        if other is not None:
            if weight is not None:
                raise ShapeError(f"{name}: give the weight once, as weight= or other=")
            weight = other
        K = _as_count(K if K is not None else opt_arg, name)
        operands = [self] + ([_as_lazy(weight)] if weight is not None else [])
        leaves = _merge_leaves(operands)
        if not call or any(leaf.symbolic for leaf in leaves.values()):
            return SymbolicReduction(self, name, dict(
                dim=dim, K=K, weight=operands[1] if weight is not None else None,
                backend=backend, out=out, ranges=ranges, **options))
        nb = len(_batch_shape(leaves))
        if dim is None:
            raise ShapeError(f"{name} needs dim={nb} (reduce over i) or dim={nb + 1} "
                             f"(reduce over j)")
        if isinstance(dim, bool) or not isinstance(dim, int):
            dim = _as_count(dim, name)  # a numpy integer or a 0-d tensor (bools raise)
        if dim not in (nb, nb + 1):
            raise ShapeError(f"{name}: dim must be {nb} (reduce over i) or {nb + 1} (reduce over "
                             f"j) for {'no' if not nb else nb} batch dim{'s' if nb != 1 else ''}"
                             f", got {dim!r}")
        dim -= nb
        formula, weight_f, arrays, names = _bind(self.formula,
                                                 operands[1].formula if weight is not None
                                                 else None, leaves)
        if self.is_complex and name != "Sum":
            raise DtypeError(f"{name} of complex values is not defined: only sums are "
                             f"(take .real, .imag or .abs() first)")
        req = plan.Request(name, formula, axis=dim, K=K, weight=weight_f,
                           **plan.accumulation_options(options))
        sizes = (_rows(leaves, I_CAT), _rows(leaves, J_CAT))
        if backend == "auto" and self.backend is not None:
            backend = self.backend
        like = next(leaf.array for leaf in leaves.values() if leaf.array is not None)
        # Bound on the second such call: a LazyTensor built for one call never pays for it.
        layout = (plan.layout_key(arrays) if hit is _SEEN or shared_entry is _SEEN else None)
        if bound_key is not None and hit is None:
            self.__dict__.setdefault("_bound", {})[bound_key] = _SEEN
            if shared is not None and shared_entry is None:
                _shared_calls[shared[0]] = _SEEN
        if layout is not None:  # numpy arrays (no autograd): prepare, run, keep it bound
            prepared = plan.prepare(req, arrays, names=names, backend=backend, sizes=sizes,
                                    like=like)
            outs = plan.execute(prepared)
            rerun = plan.bind(prepared)
            if rerun is not None:
                if hit is _SEEN:
                    plan.remember(self.__dict__.setdefault("_bound", {}), bound_key,
                                  (rerun, arrays, layout))
                if shared is not None:
                    _shared_calls[shared[0]] = rerun
        else:
            outs = self._run(req, arrays, names=names, backend=backend, out=out, sizes=sizes,
                             like=like, ranges=ranges if ranges is not None else self.ranges)
        if self.is_complex:
            return _to_complex(outs[0])
        return outs[0] if len(outs) == 1 else outs

    def _inner_axis(self, dim: Any) -> bool:
        """Whether ``dim`` names the inner (feature) axis: -1, or nbatchdims + 2 as in pykeops
        (its LazyTensors have the shape batch + (M, N, D))."""
        return dim == -1 or dim == self.nbatchdims + 2

    def _inner_or_reduce(self, inner: str, red: str, dim: Any, kw: dict, default: Any = -1):
        # As in pykeops, the feature axis (-1, the default, or nbatchdims + 2) is the op over
        # the inner vector, not a reduction; nbatchdims + 0 / + 1 reduce over i / j.
        if "axis" in kw:
            axis = kw.pop("axis")
            dim = axis if axis is not None else dim
        if dim is None:
            dim = default
        if self._inner_axis(dim):  # (pykeops ignores reduction options here, and so do we)
            return self._unary("ComplexSum" if self.is_complex and inner == "Sum" else inner)
        return self._reduce(red, dim, **kw)

    def sum(self, axis: Any = -1, dim: Any = None, **kw):
        """The feature axis (``-1``, the default, or nbatchdims + 2): the sum of the
        components (a LazyTensor); nbatchdims + 0 or + 1: the reduction over i or j.

        >>> import numpy as np
        >>> Vi(np.ones((2, 3))).sum().ndim, Vi(np.ones((2, 3))).sum(0).shape
        (1, (1, 3))
        """
        return self._inner_or_reduce("Sum", "Sum", dim if dim is not None else axis, kw)

    def min(self, axis: Any = -1, dim: Any = None, **kw):
        return self._inner_or_reduce("Min", "Min", dim if dim is not None else axis, kw)

    def max(self, axis: Any = -1, dim: Any = None, **kw):
        return self._inner_or_reduce("Max", "Max", dim if dim is not None else axis, kw)

    def argmin(self, axis: Any = -1, dim: Any = None, **kw):
        return self._inner_or_reduce("ArgMin", "ArgMin", dim if dim is not None else axis, kw)

    def argmax(self, axis: Any = -1, dim: Any = None, **kw):
        return self._inner_or_reduce("ArgMax", "ArgMax", dim if dim is not None else axis, kw)

    def min_argmin(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("Min_ArgMin", dim if dim is not None else axis, **kw)

    def max_argmax(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("Max_ArgMax", dim if dim is not None else axis, **kw)

    def Kmin(self, K: Any = None, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("KMin", dim if dim is not None else axis, K=K, **kw)

    def argKmin(self, K: Any = None, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("ArgKMin", dim if dim is not None else axis, K=K, **kw)

    def Kmin_argKmin(self, K: Any = None, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("KMin_ArgKMin", dim if dim is not None else axis, K=K, **kw)

    def logsumexp(self, axis: Any = None, dim: Any = None, weight: Any = None, **kw):
        """log Σ exp(self) (times ``weight``, also spelt ``other=`` as in pykeops)."""
        if dim is not None and not _is_axis(dim):  # lazymat's older (dim, weight) order
            dim, weight = None, dim if weight is None else weight
        return self._reduce("LogSumExp", dim if dim is not None else axis, weight=weight, **kw)

    def sumsoftmaxweight(self, weight: Any = None, axis: Any = None, dim: Any = None, **kw):
        if weight is None and "other" not in kw:
            raise ShapeError("sumsoftmaxweight needs the weight (weight= or other=)")
        return self._reduce("SumSoftMaxWeight", dim if dim is not None else axis,
                            weight=weight, **kw)

    # pykeops' *_reduction spellings: always a reduction over i or j (axis required)
    def sum_reduction(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("Sum", dim if dim is not None else axis, **kw)

    def min_reduction(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("Min", dim if dim is not None else axis, **kw)

    def max_reduction(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("Max", dim if dim is not None else axis, **kw)

    def argmin_reduction(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("ArgMin", dim if dim is not None else axis, **kw)

    def argmax_reduction(self, axis: Any = None, dim: Any = None, **kw):
        return self._reduce("ArgMax", dim if dim is not None else axis, **kw)

    min_argmin_reduction, max_argmax_reduction = min_argmin, max_argmax
    Kmin_reduction, argKmin_reduction, Kmin_argKmin_reduction = Kmin, argKmin, Kmin_argKmin
    logsumexp_reduction, sumsoftmaxweight_reduction = logsumexp, sumsoftmaxweight
    __min__, __max__ = min_reduction, max_reduction

    def __matmul__(self, v: Any, **kw):
        """``K @ v``: Σ_j K_ij v_j for an array v of shape (N,) or (N, E)."""
        calls = self.__dict__.get("_bound")
        if calls and not kw:  # the fast path: a numpy v of a layout seen before
            layout = plan.layout_key((v,))
            hit = calls.get(("@", layout)) if layout is not None else None
            if hit is not None and hit is not _SEEN:
                rerun, template, pos, full_layout, vector = hit
                arrays = list(template)
                arrays[pos] = v.reshape(-1, 1) if vector else v
                if plan.layout_key(arrays) == full_layout:
                    outs = rerun(arrays)
                    if outs is not None:
                        return outs[0].reshape(outs[0].shape[:-1]) if vector else outs[0]
        if self.ndim != 1:
            raise ShapeError(f"K @ v needs a scalar-valued K (inner dim 1), got dim {self.ndim}")
        if not _is_array(v):
            raise ShapeError(f"K @ v needs an array v, got {type(v).__name__}")
        vector = len(v.shape) == 1
        vj = Vj(v.reshape(-1, 1) if vector else v)
        _no_symbolic(self, "K @ v")
        N = _rows(self._leaves, J_CAT)
        if N is not None and vj._size(J_CAT) != N:
            raise ShapeError(f"K @ v: K has N = {N} columns but v has shape "
                             f"{tuple(v.shape)}")
        product = self * vj
        key = ("@", plan.layout_key((v,))) if not kw else None
        seen = self.__dict__.setdefault("_bound", {}).get(key) is _SEEN
        nb = self.nbatchdims
        if seen:  # the second K @ v of this layout: bind it (the product is new each time)
            product.__dict__["_bound"] = {("Sum", nb + 1, None, None): _SEEN}
        result = (product.sum(dim=nb + 1, **kw) if "axis" in kw
                  else product._reduce("Sum", nb + 1, **kw))
        if seen:
            self._bind_matmul(product, vj, v, vector)
        elif key is not None and key[1] is not None:
            self.__dict__["_bound"][key] = _SEEN
        return result.reshape(tuple(result.shape[:-1])) if vector else result

    def _bind_matmul(self, product: "LazyTensor", vj: "LazyTensor", v: Any, vector: bool
                     ) -> None:
        """Keep ``product``'s bound call for the next ``self @ v'`` of v's layout (v' at the
        argument position of v)."""
        calls = product.__dict__.get("_bound")
        hit = calls.get(("Sum", self.nbatchdims + 1, None, None)) if calls else None
        layout = plan.layout_key((v,))
        v_array = next(iter(vj._leaves.values())).array
        if hit is None or hit is _SEEN or layout is None or any(
                a is v_array for a in self.variables):
            return  # (v is also inside K: another v would change the formula)
        rerun, arrays, full_layout = hit
        at = [k for k, a in enumerate(arrays) if a is v_array]
        if len(at) != 1:
            return
        template = list(arrays)
        template[at[0]] = None  # filled by each call (the first v is not kept alive)
        plan.remember(self.__dict__.setdefault("_bound", {}), ("@", layout),
                      (rerun, template, at[0], full_layout, vector))

    def solve(self, b: Any, var: "LazyTensor | None" = None, call: bool = True,
              alpha: float = 1e-10, eps: float = 1e-6, max_iter: int | None = None,
              precond: str | dict | None = "auto", truncate: str | bool = "auto",
              info: dict | None = None, **kw: Any) -> Any:
        """a with (alpha·Id + K) a = b, by conjugate gradient; K (self) must be a symmetric
        positive definite scalar matrix (not checked). b: (N,) or (N, E). Differentiable with
        torch (the backward is another solve). The result meets ‖(alpha·Id + K) a - b‖² <
        N·E·eps² with the exact K, or a ConvergenceWarning says it did not.

        When K is a kernel of points x (Vi(x) and Vj(x) of one array), ``precond="auto"``
        (from N = 2048 on) or ``"schwarz"`` preconditions CG with additive Schwarz on
        overlapping blocks of nearby points (a dict ``{"block_size": 256, "overlap": 0.25}``
        tunes it; None turns it off); for a Gaussian K = w·exp(-γ|x_i - x_j|²),
        ``truncate="auto"`` (from N = 2048 on) or True skips the blocks of K too small to
        matter at this eps. ``info`` (a dict) receives iterations, residual and timings.

        >>> import numpy as np
        >>> x = np.random.rand(3000, 3); b = np.random.rand(3000, 1)
        >>> K = (-Vi(x).sqdist(Vj(x)) * 200).exp()
        >>> a = K.solve(b, alpha=0.1)  # Schwarz-preconditioned, block-sparse
        >>> bool(np.abs(0.1 * a + K @ a - b).max() < 1e-5)
        True
        """
        from .plan import accumulation_options
        from .solve import KernelSystem, solve

        options = dict(alpha=alpha, eps=eps, max_iter=max_iter, precond=precond,
                       truncate=truncate, info=info, **kw)
        if isinstance(b, LazyTensor):  # pykeops' form: K.solve(Vi(b), ...)
            if not call or b.symbolic_variables or (var is None and self.symbolic_variables):
                if var is not None:
                    raise ShapeError("solve(var=...) takes an array right-hand side (or Vi(b) "
                                     "of an array), called at once")
                return SymbolicSolve(self, b, None, options)
            if b.formula.op != "Var" or len(b._leaves) != 1:
                raise ShapeError(f"solve: the right-hand side must be one variable, Vi(b) or "
                                 f"Vj(b), got the formula {b.formula!r}")
            leaf = next(iter(b._leaves.values()))
            if leaf.cat == P_CAT or leaf.array is None:
                raise ShapeError("solve: the right-hand side must be Vi(b) or Vj(b), not a "
                                 "parameter")
            if leaf.cat == J_CAT and var is None:  # Σ_i K_ij a_i = b_j: the transposed system
                return self.t().solve(leaf.array, **options)
            b = leaf.array
        elif not call and var is None:
            return SymbolicSolve(self, b, None, options)
        if var is not None:
            return self._solve_for(var, b, alpha, eps, max_iter, info, kw)
        _no_symbolic(self, "solve")
        if self.ndim != 1:
            raise ShapeError(f"solve needs a scalar-valued K (inner dim 1), got dim {self.ndim}")
        if not _is_array(b):
            raise ShapeError(f"solve needs an array right-hand side, got {type(b).__name__}")
        M, N = self._size(I_CAT), self._size(J_CAT)
        if M != N or b.shape[0] != N:
            raise ShapeError(f"solve needs a square K and b with N rows: K is {M} x {N}, "
                             f"b has shape {tuple(b.shape)}")
        vector = len(b.shape) == 1
        rhs = b.reshape(-1, 1) if vector else b
        params = list({id(leaf.array): leaf.array for leaf in self._leaves.values()
                       if leaf.array is not None and is_torch(leaf.array)}.values())
        system = None
        if is_dask(b) or any(is_dask(leaf.array) for leaf in self._leaves.values()):
            if precond not in ("auto", None, False) or truncate is True:
                raise ShapeError("precond and truncate need the points in one memory; with "
                                 "dask arrays the solve runs plain CG on distributed matvecs")
        elif self.ranges is not None or kw.get("ranges") is not None or self.is_complex:
            if precond not in ("auto", None, False) or truncate is True:
                raise ShapeError("precond and truncate need a real K without ranges")
        elif precond not in (None, False) or truncate not in (False, None):
            f, _, arrays, _ = _bind(self.formula, None, self._leaves)
            system = KernelSystem(f, arrays, alpha, precond, truncate or False,
                                  backend=kw.get("backend", "auto"),
                                  acc=accumulation_options(kw))
            system = system if system.active else None
        a = solve(lambda v: self.__matmul__(v, **kw), rhs, alpha, eps, max_iter, params,
                  system, info)
        return a.reshape(-1) if vector else a

    def _solve_for(self, var: "LazyTensor", b: Any, alpha: float, eps: float,
                   max_iter: int | None, info: dict | None, kw: dict) -> Any:
        """KeOps' ``solve(b, var=Vj(index, dim))``: a with alpha·a + Σ_j self[var = a] = b,
        self being linear in the symbolic j-variable ``var``."""
        from .solve import solve

        found = [leaf for leaf in var._leaves.values() if leaf.symbolic]
        if (not isinstance(var, LazyTensor) or len(var._leaves) != 1 or len(found) != 1
                or found[0].cat != J_CAT or var.formula.op != "Var"):
            raise ShapeError("solve(var=...) needs a symbolic j-variable, Vj(index, dim)")
        index, dim = found[0].symbolic
        others = [leaf.symbolic for leaf in self._leaves.values()
                  if leaf.symbolic and leaf.symbolic != (index, dim)]
        if others or not any(leaf.symbolic == (index, dim) for leaf in self._leaves.values()):
            raise ShapeError(f"solve(var=Vj({index}, {dim})): the formula must use that "
                             f"variable and no other symbolic one (found {sorted(others)})")
        if not _is_array(b) or b.shape[-1] != dim or len(b.shape) != 2:
            raise ShapeError(f"solve(var=Vj({index}, {dim})) needs b of shape (N, {dim}), got "
                             f"{getattr(b, 'shape', type(b).__name__)}")
        reduction = self.sum(dim=1, **kw)
        args: list[Any] = [None] * index
        params = list({id(leaf.array): leaf.array for leaf in self._leaves.values()
                       if leaf.array is not None and is_torch(leaf.array)}.values())
        return solve(lambda v: reduction(*args, v), b, alpha, eps, max_iter, params, None, info)

    def matvec(self, v: Any):
        """K @ v for scipy's ``aslinearoperator(K)``: v is cast to K's library and dtype (scipy
        probes with int8 vectors and passes numpy arrays to torch-backed K), the result comes
        back in v's library.

        >>> import numpy as np, scipy.sparse.linalg as sla
        >>> x = np.random.rand(50, 2)
        >>> K = (-Vi(x).sqdist(Vj(x))).exp()
        >>> sla.aslinearoperator(K).matvec(np.ones(50)).shape
        (50,)
        """
        return _as_operand_of(self, v, lambda w: self @ w)

    def rmatvec(self, v: Any):
        """Kᵀ @ v (cast as in :meth:`matvec`)."""
        return _as_operand_of(self, v, lambda w: self.t() @ w)

    def matmat(self, v: Any):
        """K @ V for an (N, E) V (cast as in :meth:`matvec`)."""
        return _as_operand_of(self, v, lambda w: self @ w)

    def rmatmat(self, v: Any):
        return _as_operand_of(self, v, lambda w: self.t() @ w)


class ComplexLazyTensor(LazyTensor):
    """A LazyTensor of complex values (pykeops' name): built from complex arrays, by
    ``exp1j()``/``real2complex()``, or as ``ComplexLazyTensor(x)`` (real data becomes complex).

    >>> import numpy as np
    >>> z = ComplexLazyTensor(np.ones((3, 1, 2), dtype=complex))
    >>> isinstance(z, ComplexLazyTensor), z.is_complex
    (True, True)
    """

    def __init__(self, x: Any = None, axis: int | None = None, is_complex: bool = True):
        super().__init__(x, axis, is_complex=True)


def _klass(cls: type, is_complex: bool) -> type:
    """The class of a result: ComplexLazyTensor or LazyTensor for lazymat's own classes (by
    the values), a subclass (the JAX front end's) as it is."""
    if cls in (LazyTensor, ComplexLazyTensor):
        return ComplexLazyTensor if is_complex else LazyTensor
    return cls


def _as_operand_of(K: LazyTensor, v: Any, product: Any) -> Any:
    """product(v) with v in K's library, dtype and device; the result back in v's library."""
    like = K._like()
    if like is None or not _is_array(v):
        return product(v)
    if is_torch(like):
        import torch

        if is_torch(v):
            return product(v.to(dtype=like.dtype, device=like.device))
        import numpy as np

        w = torch.as_tensor(np.asarray(v), device=like.device).to(like.dtype)
        with torch.no_grad():
            return product(w).cpu().numpy()
    import numpy as np

    if is_torch(v):
        return product(v.detach().cpu().numpy().astype(like.dtype))
    return product(np.asarray(v, dtype=like.dtype))


# ---------------------------------------------------------------------- construction helpers

def _leaf(x: Any, axis: int | None) -> tuple[Node, dict[int, _Leaf]]:
    if type(x) is _ndarray and x.dtype.kind == "f":  # real numpy data: straight to its layout
        return _array_leaf(x, x, x.shape, axis, False)
    if isinstance(x, bool) or x is None:
        raise ShapeError(f"cannot make a LazyTensor from {x!r}")
    if isinstance(x, int):
        if type(x) is not int:
            return Const(x), {}
        node = _nodes.get(("Const", x))
        if node is None:
            node = _nodes[("Const", x)] = Const(x)
        return node, {}
    if isinstance(x, float):
        # Every Python float is a parameter, integer-valued ones too (2.0 is not folded).
        # Equal floats get one uid (so formulas, and their caches, repeat); the uids are
        # negative (never an id) and never reused, even after the table is cleared.
        return _float_var(x, 1), {(_float_uid(x, 1), P_CAT): _Leaf(None, x, P_CAT)}
    if isinstance(x, complex):
        uid = -next(_float_counter)
        return Var(uid, 2, P_CAT), {(uid, P_CAT): _Leaf(None, x, P_CAT, complex=True)}
    if (isinstance(x, tuple) and len(x) == 3 and all(isinstance(v, int) for v in x)
            and axis is None):
        return _symbolic(*x)
    source = x
    if isinstance(x, (list, tuple)):
        import numpy as np

        x = np.asarray(x, dtype=float)
    if not _is_array(x):
        raise ShapeError(f"cannot make a LazyTensor from a {type(x).__name__}")
    return _array_leaf(source, x, tuple(int(s) for s in x.shape), axis, True)


def _array_leaf(source: Any, x: Any, shape: tuple[int, ...], axis: int | None,
                maybe_complex: bool) -> tuple[Node, dict[int, _Leaf]]:
    """The variable of the array ``x`` made from the user's ``source`` (its id names it):
    its category from ``axis`` or the pykeops layout of ``shape``."""
    if len(shape) == 0:
        return Var(id(source), 1, P_CAT), {(id(source), P_CAT): _Leaf(x.reshape(1), None, P_CAT,
                                                                      source)}
    if len(shape) == 1:
        if axis in (0, 1):
            cat, arr = (I_CAT if axis == 0 else J_CAT), x.reshape(-1, 1)
        else:
            cat, arr = P_CAT, x
    elif axis in (0, 1):  # Vi / Vj of an (..., n, D) array
        cat, arr = (I_CAT if axis == 0 else J_CAT), x
    elif len(shape) == 2:
        raise ShapeError(f"a 2-D array of shape {shape} needs axis=0 (i-variable) or axis=1 "
                         f"(j-variable); or use Vi(x) / Vj(x)")
    else:  # pykeops layout: (..., M, 1, D), (..., 1, N, D) or (..., 1, 1, D)
        lead = shape[:-3]
        if shape[-3] == 1 and shape[-2] == 1:
            cat, arr = P_CAT, x.reshape(lead + (shape[-1],))
        elif shape[-2] == 1:
            cat, arr = I_CAT, x.reshape(lead + (shape[-3], shape[-1]))
        elif shape[-3] == 1:
            cat, arr = J_CAT, x.reshape(lead + (shape[-2], shape[-1]))
        else:
            raise ShapeError(f"an array of shape {shape} must be (..., M, 1, D), "
                             f"(..., 1, N, D) or (..., 1, 1, D)")
    is_complex = maybe_complex and _is_complex_array(arr)
    if is_complex:
        arr = _interleaved(arr)
    dim = int(arr.shape[-1])
    if dim < 1:
        raise ShapeError(f"a variable needs at least one component, got shape {shape}")
    return _var_node(id(source), dim, cat), {(id(source), cat): _Leaf(arr, None, cat, source,
                                                                      is_complex)}


#: Nodes built by the front end: (op, formulas..., params...) -> node. Formula nodes are
#: interned weakly; a LazyTensor built anew on every call would rebuild (and re-simplify)
#: its whole formula each time, this keeps the recent ones.
_nodes = config.memo("lazy_tensor.nodes", maxsize=4096)


def _var_node(uid: int, dim: int, cat: int) -> Node:
    key = ("Var", uid, dim, cat)
    node = _nodes.get(key)
    if node is None:
        node = _nodes[key] = Var(uid, dim, cat)
    return node


def _apply(op: str, formulas: tuple, params: tuple) -> Node:
    """``apply(op, *formulas, *params)``, memoized (unhashable params are not). The params'
    types are part of the key: 1, 1.0 and True are equal dict keys."""
    key = (op, *formulas, *params, *map(type, params)) if params else (op, *formulas)
    try:
        node = _nodes.get(key)
    except TypeError:  # a list parameter
        return apply(op, *formulas, *params)
    if node is None:
        node = _nodes[key] = apply(op, *formulas, *params)
    return node


def _no_symbolic(lazy: LazyTensor, what: str) -> None:
    found = [leaf.symbolic for leaf in lazy._leaves.values() if leaf.symbolic]
    if found:
        raise ShapeError(f"{what} needs arrays for every variable, and {len(found)} are symbolic "
                         f"(index, dim) {sorted(found)}: use a reduction, e.g. (K * Vj(v)).sum"
                         f"(dim=1), and call it with the arrays")


class SymbolicReduction:
    """A reduction waiting for arrays: what a reduction of symbolic variables (``Vi(index,
    dim)``, ``Vj(...)``, ``Pm(...)``) or one asked with ``call=False`` returns. Calling it
    with arrays runs it: argument ``k`` is the array of the variables of index ``k``;
    keyword options (``backend``, ``out``, ``ranges``...) override those of the reduction.

    >>> import numpy as np
    >>> x, y = Vi(0, 2), Vj(1, 2)
    >>> knn = x.sqdist(y).argKmin(2, dim=1)
    >>> knn(np.array([[0.0, 0], [5, 5]]), np.array([[0.0, 0], [1, 1], [4, 4]])).tolist()
    [[0, 1], [2, 1]]
    """

    def __init__(self, lazy: LazyTensor, name: str, options: dict[str, Any]):
        self.lazy, self.name, self.options = lazy, name, options

    def __call__(self, *arrays: Any, **options: Any) -> Any:
        weight = self.options.get("weight")
        bound = [self._bind(o, arrays) if o is not None else None for o in (self.lazy, weight)]
        merged = {**self.options, **options, "weight": bound[1], "call": True}
        return bound[0]._reduce(self.name, **merged)

    def __repr__(self) -> str:
        return f"SymbolicReduction({self.name} of {self.lazy.formula!r})"

    def _bind(self, lazy: LazyTensor, arrays: tuple) -> LazyTensor:
        leaves = dict(lazy._leaves)
        for key, leaf in lazy._leaves.items():
            if not leaf.symbolic:
                continue
            index, dim = leaf.symbolic
            role = f"{_ROLE[leaf.cat]}({index}, {dim})"
            if index >= len(arrays):
                raise ShapeError(f"the reduction uses the symbolic variable {role} but was "
                                 f"called with {len(arrays)} array(s)")
            a = arrays[index]
            if isinstance(a, (int, float)) and not isinstance(a, bool) and leaf.cat == P_CAT:
                if dim != 1:
                    raise ShapeError(f"{role} needs {dim} numbers, got the number {a!r}")
                leaves[key] = _Leaf(None, float(a), P_CAT)
                continue
            if not _is_array(a):
                raise ShapeError(f"{role}: argument {index} must be an array, got "
                                 f"{type(a).__name__}")
            if _is_complex_array(a):
                raise DtypeError(f"{role}: symbolic variables take real arrays")
            shape = tuple(a.shape)
            if leaf.cat != P_CAT and len(shape) == 1 and dim == 1:
                a, shape = a.reshape(-1, 1), shape + (1,)
            if not shape or shape[-1] != dim or (leaf.cat != P_CAT and len(shape) < 2):
                want = f"(..., n, {dim})" if leaf.cat != P_CAT else f"({dim},)"
                raise ShapeError(f"{role}: argument {index} has shape {shape}, expected {want}")
            leaves[key] = _Leaf(a, None, leaf.cat, a)
        return type(lazy)._make(lazy.formula, leaves, lazy.ranges, lazy.is_complex)


class SymbolicSolve:
    """A linear solve waiting for arrays: ``K.solve(Vi(0, 1), ...)`` (a symbolic right-hand
    side) or ``call=False``. Calling it with arrays binds the symbolic variables (argument
    ``k`` for index ``k``), then solves.

    >>> import numpy as np
    >>> x = np.random.rand(30, 2)
    >>> K = (-Vi(x).sqdist(Vj(x))).exp()
    >>> solver = K.solve(Vi(0, 1), alpha=1.0)
    >>> solver(np.ones((30, 1))).shape
    (30, 1)
    """

    def __init__(self, lazy: LazyTensor, other: Any, var: Any, options: dict[str, Any]):
        self.lazy, self.other, self.var, self.options = lazy, other, var, options

    def __call__(self, *arrays: Any, **options: Any) -> Any:
        binder = SymbolicReduction(self.lazy, "Sum", {})
        lazy = binder._bind(self.lazy, arrays) if self.lazy.symbolic_variables else self.lazy
        other = self.other
        if isinstance(other, LazyTensor) and other.symbolic_variables:
            other = binder._bind(other, arrays)
        return lazy.solve(other, **{**self.options, **options})

    def __repr__(self) -> str:
        return f"SymbolicSolve(of {self.lazy.formula!r})"


#: Variable uids of symbolic variables: far from ids (positive) and float parameters (-1, -2...).
_SYMBOLIC_UID = -(1 << 62)


def _symbolic(index: int, dim: int, cat: int) -> tuple[Node, dict]:
    """The variable of KeOps' ``Vi(index, dim)``: its array is argument ``index`` of the call
    of the reduction."""
    if index < 0 or dim < 1 or cat not in (I_CAT, J_CAT, P_CAT):
        raise ShapeError(f"a symbolic variable needs index >= 0, dim >= 1 and category 0, 1 "
                         f"or 2, got ({index}, {dim}, {cat})")
    uid = _SYMBOLIC_UID - index
    return Var(uid, dim, cat), {(uid, cat): _Leaf(None, None, cat, symbolic=(index, dim))}


def _is_complex_array(a: Any) -> bool:
    return bool(a.is_complex()) if is_torch(a) else a.dtype.kind == "c"


def _interleaved(a: Any) -> Any:
    """Complex (..., D) data as real (..., 2D): re_0, im_0, re_1, ... (shares memory when it
    can)."""
    if is_torch(a):
        import torch

        pairs = torch.view_as_real(a.resolve_conj() if a.is_conj() else a)
        return pairs.reshape(tuple(a.shape[:-1]) + (2 * a.shape[-1],))
    import numpy as np

    a = np.ascontiguousarray(a)
    return a.view(a.real.dtype).reshape(a.shape[:-1] + (2 * a.shape[-1],))


def _to_complex(out: Any) -> Any:
    """The inverse of _interleaved for a reduction's output."""
    if is_torch(out):
        import torch

        return torch.view_as_complex(out.reshape(tuple(out.shape[:-1]) + (-1, 2)).contiguous())
    import numpy as np

    out = np.ascontiguousarray(out)
    return out.view(np.complex64 if out.dtype == np.float32 else np.complex128)


# Unary ops that keep (True) or drop (False) complex values, for complex LazyTensors.
_COMPLEX_UNARY = {name: op.complex_result for name, op in OPS.items()
                  if op.complex_result is not None}


def _op_method(op) -> Any:
    def method(self: LazyTensor) -> LazyTensor:
        return self._unary(op.name)

    method.__name__, method.__doc__ = op.method, f"{op.name}: {op.doc}"
    return method


# The methods unary ops declare in their registration (x.tanh() is Tanh(x), ...).
for _op in OPS.values():
    if _op.method is not None and not hasattr(LazyTensor, _op.method):
        setattr(LazyTensor, _op.method, _op_method(_op))
_COMPLEX_BINARY = {"Add": "ComplexAdd", "Subtract": "ComplexSubtract", "Mult": "ComplexMult",
                   "Divide": "ComplexDivide"}


def _complex_version(op: str, operands: list[LazyTensor]) -> tuple[str, list[Node]]:
    """The complex op for a binary op with a complex operand; real operands are promoted."""
    if op not in _COMPLEX_BINARY:
        raise DtypeError(f"{op} is not defined for complex LazyTensors: use + - * /, .exp(), "
                         f".abs(), .conj(), .real, .imag, .angle()")
    if op == "Mult" and len(operands) == 2 and not all(o.is_complex for o in operands):
        real, cplx = (operands[0], operands[1]) if operands[1].is_complex else (operands[1],
                                                                                operands[0])
        return "ComplexRealScal", [real.formula, cplx.formula]
    formulas = [o.formula if o.is_complex else apply("Real2Complex", o.formula)
                for o in operands]
    return _COMPLEX_BINARY[op], formulas


def _as_lazy(x: Any) -> LazyTensor:
    if isinstance(x, LazyTensor):
        return x
    t = type(x)
    if (t is int or t is float) and not (COMPILED and autograd.compiling()):
        node, leaves = _leaf(x, None)  # (what LazyTensor(x) holds, without its checks)
        return LazyTensor._make(node, leaves)
    if _is_array(x) and len(x.shape) == 2:
        raise ShapeError(f"cannot combine a LazyTensor with a 2-D array of shape "
                         f"{tuple(x.shape)}: wrap it with Vi(...) or Vj(...)")
    return LazyTensor(x)


def _describe(lt: LazyTensor) -> str:
    f = lt.formula
    roles = sorted({_ROLE[leaf.cat] for leaf in lt._leaves.values()})
    return f"operand of dim {f.dim} ({'/'.join(roles) or 'constant'}, shape {lt.shape})"


#: A bound-call slot seen once: the next call of that kind binds (plan.bind).
_SEEN = object()

#: Bound calls shared by all LazyTensors: (renumbered formula, reduction, dim, K, backend,
#: layout of the arrays) -> ``rerun`` (plan.bind), or _SEEN after the first such call.
_shared_calls = config.memo("lazy_tensor.shared_calls", maxsize=256)


def _shared_call(leaves: dict[tuple[int, int], _Leaf], formula: Node, how: tuple
                 ) -> tuple[tuple, list] | None:
    """(key in _shared_calls, arrays by argument position) of a reduction ``how`` = (name,
    dim, K, backend) of ``formula``, or None when the call cannot be shared: a leaf the
    formula lost (its rows and batch dims still count), a symbolic leaf, no numpy array.

    The key holds everything the general path's checks and launch depend on: the formula
    up to the numbering of its variables, the reduction, and each array's shape, strides
    and dtype (Python floats become 1-element arrays of the data's dtype, their values are
    read on every call). A call of another layout misses and takes the general path, whose
    checks raise the usual errors.
    """
    f, _, slots = _renumber(formula, None)
    if len(slots) != len(leaves):
        return None
    like = None
    for leaf in leaves.values():
        if leaf.array is not None:
            like = leaf.array
            break
    if type(like) is not _ndarray:
        return None
    arrays, layout = [], []
    for slot in slots:
        leaf = leaves[slot]
        a = leaf.array
        if a is None:
            if leaf.value is None or leaf.complex:
                return None  # symbolic (or complex): the general path
            a = _np_array((leaf.value,), like.dtype)
        elif type(a) is not _ndarray:
            return None
        arrays.append(a)
        layout.append((a.shape, a.strides, a.dtype))
    return (f, *how, tuple(layout)), arrays


def _float_uid(value: float, k: int) -> int:
    """The uid of the k-th distinct Python float equal to ``value`` in one formula."""
    key = value if k == 1 else (value, k)
    uid = _float_uids.get(key)
    if uid is None:
        if len(_float_uids) >= 4096:
            _float_uids.clear()
        uid = _float_uids[key] = -next(_float_counter)
    return uid


def _float_var(value: float, k: int) -> Node:
    return Var(_float_uid(value, k), 1, P_CAT)


def _merge_leaves(operands: list[LazyTensor]) -> dict[tuple[int, int], _Leaf]:
    """The leaves of all operands (checked for M, N and batch dims).

    Two *different* Python floats that happen to be equal (``x.clamp(-1.0, c)`` at
    ``c = -1.0``) stay two parameters: the later operand's float is renamed to the next uid
    of its value, in place in ``operands``. The formula's structure then never depends on
    the floats' values, so no value compiles a new kernel. One float reused (``a = x * c;
    a.exp() + a``) is one ``_Leaf`` and stays one parameter.
    """
    if len(operands) == 1:
        return operands[0]._leaves
    if len(operands) == 2:
        merged = _merged_pair(operands[0]._leaves, operands[1]._leaves)
        if merged is not None:
            return merged
    leaves: dict[int, _Leaf] = {}
    for n, o in enumerate(operands):
        clash = [key for key, leaf in o._leaves.items()
                 if key in leaves and leaves[key] is not leaf and _is_float_leaf(leaf)]
        if clash:
            o = operands[n] = _renamed_floats(o, clash, leaves)
        leaves.update(o._leaves)
    for cat, letter in ((I_CAT, "M"), (J_CAT, "N")):
        sizes = {leaf.rows for leaf in leaves.values() if leaf.cat == cat and not leaf.symbolic}
        if len(sizes) > 1:
            raise ShapeError(f"{_ROLE[cat]} variables with different {letter}: "
                             f"{sorted(sizes)} rows; all {_ROLE[cat]} operands of one formula "
                             f"must have the same number of rows")
    _batch_shape(leaves)  # raises when the batch dims do not broadcast
    return leaves


def _merged_pair(a: dict, b: dict) -> dict | None:
    """The leaves of two operands when merging them needs no renaming and their M, N and
    batch dims plainly agree (no batch dims): the usual case, made quick. Else None (the
    general path renames, checks and raises)."""
    if not b or b is a:
        return a
    if not a:
        return b
    for key, leaf in b.items():
        mine = a.get(key)
        if mine is not None and mine is not leaf:
            return None  # equal floats to tell apart, or the same array in two roles
    merged = {**a, **b}
    rows = [None, None]
    for leaf in merged.values():
        array = leaf.array
        if array is None:
            if leaf.symbolic:
                return None
            continue
        shape = array.shape
        if leaf.cat == P_CAT:
            if len(shape) != 1:
                return None
            continue
        if len(shape) != 2:
            return None
        seen = rows[leaf.cat]
        if seen is None:
            rows[leaf.cat] = shape[0]
        elif seen != shape[0]:
            return None
    return merged


_bind_memo: "OrderedDict[tuple, tuple]" = OrderedDict()
_BIND_MEMO_SIZE = 512


def _renumber(formula: Node, weight: Node | None):
    """Variables renumbered 0..n-1 (so equal formulas share kernels), memoized."""
    key = (formula, weight)
    hit = _bind_memo.get(key)
    if hit is not None:
        _bind_memo.move_to_end(key)
        return hit
    # Positions follow the first appearance in a walk of the formula, which depends on its
    # structure only: the same expression on other arrays gives the same kernel.
    used = [n for root in (formula, weight) if root is not None for n in walk(root)
            if n.op == "Var"]
    position: dict[tuple[int, int], int] = {}
    for v in used:
        position.setdefault((v.params[0], v.params[2]), len(position))
    slots = list(position)
    mapping = {v: Var(position[(v.params[0], v.params[2])], v.params[1], v.params[2])
               for v in used}
    f = substitute(formula, mapping)
    g = substitute(weight, mapping) if weight is not None else None
    hit = _bind_memo[key] = (f, g, slots)
    if len(_bind_memo) > _BIND_MEMO_SIZE:
        _bind_memo.popitem(last=False)
    return hit


def _bind(formula: Node, weight: Node | None, leaves: dict[tuple[int, int], _Leaf]):
    """The renumbered formulas, their arrays by position, and names for error messages."""
    f, g, slots = _renumber(formula, weight)
    chosen = [leaves[slot] for slot in slots]
    # A simplification (x * 0) may have removed every variable: the leaves still give the
    # library, dtype and sizes.
    like = next((leaf.array for leaf in leaves.values() if leaf.array is not None), None)
    if like is None:
        raise ShapeError("this formula has no array variable: nothing to reduce")
    arrays, names = [], []
    for pos, leaf in enumerate(chosen):
        if leaf.symbolic:
            raise ShapeError(f"the symbolic variable {_ROLE[leaf.cat]}{leaf.symbolic} has no "
                             f"array: reduce, then call the result with the arrays")
        if leaf.array is None and leaf.complex:  # a Python complex: (re, im)
            xp = lib_of(like)
            pair = xp.full((2,), leaf.value.real, like=like)
            pair[1] = leaf.value.imag
            arrays.append(pair)
            names.append(f"Pm({leaf.value})")
        elif leaf.array is None:  # a Python float: a parameter in the inputs' dtype and device
            arrays.append(lib_of(like).full((1,), leaf.value, like=like))
            names.append(f"Pm({leaf.value})")
        else:
            arrays.append(leaf.array)
            names.append(f"{_ROLE[leaf.cat]} operand #{pos} (shape {tuple(leaf.array.shape)})")
    return f, g, arrays, names


def _is_float_leaf(leaf: _Leaf) -> bool:
    return leaf.array is None and leaf.value is not None and not leaf.complex


def _renamed_floats(o: LazyTensor, clash: list, taken: dict) -> LazyTensor:
    """``o`` with each float leaf in ``clash`` moved to its value's next free uid."""
    leaves, mapping = dict(o._leaves), {}
    for key in clash:
        leaf = leaves.pop(key)
        k = 2
        while (_float_uid(leaf.value, k), P_CAT) in taken or (
                _float_uid(leaf.value, k), P_CAT) in leaves:
            k += 1
        uid = _float_uid(leaf.value, k)
        leaves[(uid, P_CAT)] = leaf
        mapping[Var(key[0], 1, P_CAT)] = Var(uid, 1, P_CAT)
    return type(o)._make(substitute(o.formula, mapping), leaves, o.ranges, o.is_complex)


def _batch_shape(leaves: dict[tuple[int, int], _Leaf]) -> tuple[int, ...]:
    """numpy broadcast of the leaves' batch dims (an error names them when they clash)."""
    for leaf in leaves.values():  # (quick when no leaf has batch dims: the usual case)
        a = leaf.array
        if a is not None and len(a.shape) > (1 if leaf.cat == P_CAT else 2):
            break
    else:
        return ()
    shapes = [leaf.batch for leaf in leaves.values() if leaf.batch]
    if not shapes:
        return ()
    try:
        import numpy as np

        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"batch dims do not broadcast: {shapes}") from None


def _rows(leaves: dict[tuple[int, int], _Leaf], cat: int) -> int | None:
    """M (cat 0) or N (cat 1) of a set of leaves; None if no leaf has that category."""
    for leaf in leaves.values():
        if leaf.cat == cat:
            return leaf.rows
    return None


def _is_axis(x: Any) -> bool:
    """An int-like axis (int, numpy integer, 0-d integer array or tensor)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    return _is_array(x) and len(x.shape) == 0 and "int" in str(x.dtype)


def _as_count(x: Any, where: str) -> Any:
    """A Python int from an int, a numpy integer or a 0-d tensor/array (pykeops accepts
    ``K=torch.tensor(10)``); None stays None."""
    if x is None or (isinstance(x, int) and not isinstance(x, bool)):
        return x
    if hasattr(x, "shape") and len(x.shape) == 0 or type(x).__module__ == "numpy":
        value = x.item() if hasattr(x, "item") else x
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ShapeError(f"{where}: expected an integer (K or an axis), got {x!r}")


def _index(i: int, dim: int) -> int:
    i = int(i)
    if not -dim <= i < dim:
        raise ShapeError(f"index {i} out of range for a formula of dim {dim}")
    return i % dim


def _variable(x: Any, dim: int | None, cat: int) -> LazyTensor:
    if dim is None and autograd.compiling():  # traced.py's checks: no dict lookups (Dynamo)
        return LazyTensor(x, axis=0 if cat == I_CAT else 1)
    if (dim is None and type(x) is _ndarray and x.ndim == 2 and x.dtype.kind == "f"
            and x.shape[1]):  # the usual Vi(x) of a real (M, D) array: what _leaf makes
        uid = id(x)
        return LazyTensor._make(_var_node(uid, x.shape[1], cat),
                                {(uid, cat): _Leaf(x, None, cat, x)})
    if dim is not None:
        return _symbolic_lazy(x, dim, cat)
    if isinstance(x, int) and not isinstance(x, bool):
        raise ShapeError(f"{_ROLE[cat]}({x}): a symbolic variable needs its dim, "
                         f"{_ROLE[cat]}({x}, dim); data needs an array")
    if isinstance(x, (float, complex)) or (_is_array(x) and len(x.shape) == 0):
        raise ShapeError(f"{_ROLE[cat]} needs an ({'M' if cat == I_CAT else 'N'}, D) or "
                         f"({'M' if cat == I_CAT else 'N'},) array, got a scalar "
                         f"({type(x).__name__}{', shape ()' if _is_array(x) else ''}): "
                         "use Pm(x) for a parameter")
    return LazyTensor(x, axis=0 if cat == I_CAT else 1)


def _symbolic_lazy(index: Any, dim: Any, cat: int) -> LazyTensor:
    if not isinstance(index, int) or not isinstance(dim, int):
        raise ShapeError(f"{_ROLE[cat]}(index, dim) makes a symbolic variable and needs two "
                         f"ints, got ({index!r}, {dim!r})")
    return LazyTensor((index, dim, cat))


def LazyVar(x: Any, dim: int | None = None, cat: int | None = None) -> LazyTensor:
    """pykeops' ``Var`` (exported under that name by lazymat.torch and lazymat.numpy): data
    with a category (0: i, 1: j, 2: parameter), or the symbolic ``Var(index, dim, cat)``.

    >>> import numpy as np
    >>> LazyVar(np.ones((4, 2)), cat=0).ni, LazyVar(0, 2, 1).symbolic_variables
    (4, ((0, 2, 1),))
    """
    if dim is None:
        return Pm(x) if cat == P_CAT else LazyTensor(x, axis=cat)
    return _symbolic_lazy(x, dim, cat) if cat == P_CAT else _variable(x, dim, cat)


def Vi(x: Any, dim: int | None = None) -> LazyTensor:
    """An i-indexed variable from an (M, D) or (M,) array: x_i. ``Vi(index, dim)`` is a
    symbolic one: reductions of it return a function whose argument ``index`` gives x.

    >>> import numpy as np
    >>> gauss = (-Vi(0, 3).sqdist(Vj(1, 3))).exp().sum(dim=1)
    >>> gauss(np.zeros((4, 3)), np.zeros((5, 3))).ravel().tolist()
    [5.0, 5.0, 5.0, 5.0]
    """
    return _variable(x, dim, I_CAT)


def Vj(x: Any, dim: int | None = None) -> LazyTensor:
    """A j-indexed variable from an (N, D) or (N,) array: y_j; ``Vj(index, dim)``: symbolic.

    >>> import numpy as np
    >>> y = np.arange(8.0).reshape(4, 2)
    >>> Vi(np.zeros((3, 2))).sqdist(Vj(y)).min(dim=1).ravel().tolist()
    [1.0, 1.0, 1.0]
    """
    return _variable(x, dim, J_CAT)


def Pm(x: Any, dim: int | None = None) -> LazyTensor:
    """A parameter (same for every i and j) from a float or a 1-D array; ``Pm(index, dim)``:
    symbolic.

    >>> import numpy as np
    >>> x, y = np.zeros((2, 1)), np.ones((3, 1))
    >>> K = (-Pm(0.5) * Vi(x).sqdist(Vj(y))).exp()  # another float: the same kernel
    >>> K.sum(dim=1).ravel().round(4).tolist()
    [1.8196, 1.8196]
    """
    if dim is not None:
        return _symbolic_lazy(x, dim, P_CAT)
    if autograd.compiling():
        return LazyTensor(x.reshape(-1) if hasattr(x, "reshape") else float(x))
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return LazyTensor(float(x))
    if _is_array(x) and len(x.shape) > 1:
        if math.prod(x.shape) != x.shape[-1]:
            raise ShapeError(f"Pm needs a float or a 1-D array, got shape {tuple(x.shape)}")
        x = x.reshape(-1)
    return LazyTensor(x)
