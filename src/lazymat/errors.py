"""Exceptions raised by lazymat.

Every user mistake raises a subclass of :class:`LazymatError` that is also a
``ValueError`` or ``TypeError``, so ``except ValueError`` keeps working.
"""


class LazymatError(Exception):
    """Base class of every error lazymat raises on purpose.

    >>> import numpy as np, lazymat as lm
    >>> try:
    ...     lm.Vi(np.ones((3, 2))) + lm.Vi(np.ones((4, 2)))
    ... except lm.LazymatError as e:
    ...     print(type(e).__name__, isinstance(e, ValueError))
    ShapeError True
    """


class ShapeError(LazymatError, ValueError):
    """Operands whose dims, sizes, axes or batch shapes do not fit together.

    >>> import numpy as np, lazymat as lm
    >>> lm.Vi(np.ones((3, 2))).sqdist(lm.Vj(np.ones((5, 3))))
    Traceback (most recent call last):
    lazymat.errors.ShapeError: sqdist: operand of dim 2 ...
    """


class DtypeError(LazymatError, TypeError):
    """Unsupported or mixed dtypes, libraries or devices.

    >>> import numpy as np, lazymat as lm
    >>> x, y = np.ones((3, 2), np.float32), np.ones((4, 2), np.float64)
    >>> lm.Vi(x).sqdist(lm.Vj(y)).sum(dim=1)
    Traceback (most recent call last):
    lazymat.errors.DtypeError: ...
    """


class FormulaSyntaxError(LazymatError, ValueError):
    """A formula or alias string that cannot be parsed; the message gives the position.

    >>> import lazymat as lm
    >>> lm.Genred("Exp(-SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"])
    Traceback (most recent call last):
    lazymat.errors.FormulaSyntaxError: ...
    """


class NonFiniteError(LazymatError, ValueError):
    """NaN or inf where a finite number is needed (a solve's right-hand side or residual).

    >>> import numpy as np, lazymat as lm
    >>> x = np.random.rand(20, 2)
    >>> (-lm.Vi(x).sqdist(lm.Vj(x))).exp().solve(np.full((20, 1), np.nan), alpha=1.0)
    Traceback (most recent call last):
    lazymat.errors.NonFiniteError: ...
    """


class CompileError(LazymatError, RuntimeError):
    """The system compiler failed; the message shows the command and the source path.

    >>> import lazymat as lm
    >>> issubclass(lm.CompileError, RuntimeError)  # except RuntimeError catches it too
    True
    """


class CudaUnavailableError(LazymatError, RuntimeError):
    """The CUDA backend was asked for but cannot run here; the message says what is missing
    (torch with CUDA, a GPU, cuda-bindings, the driver or NVRTC)."""
