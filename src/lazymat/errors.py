"""Exceptions raised by lazymat.

Every user mistake raises a subclass of :class:`LazymatError` that is also a
``ValueError`` or ``TypeError``, so ``except ValueError`` keeps working.
"""


class LazymatError(Exception):
    """Base class of every error lazymat raises on purpose."""


class ShapeError(LazymatError, ValueError):
    """Operands whose dims, sizes, axes or batch shapes do not fit together."""


class DtypeError(LazymatError, TypeError):
    """Unsupported or mixed dtypes, libraries or devices."""


class FormulaSyntaxError(LazymatError, ValueError):
    """A formula or alias string that cannot be parsed; the message gives the position."""


class NonFiniteError(LazymatError, ValueError):
    """NaN or inf where a finite number is needed (a solve's right-hand side or residual)."""


class CompileError(LazymatError, RuntimeError):
    """The system compiler failed; the message shows the command and the source path."""


class CudaUnavailableError(LazymatError, RuntimeError):
    """The CUDA backend was asked for but cannot run here; the message says what is missing
    (torch with CUDA, a GPU, cuda-bindings, the driver or NVRTC)."""
