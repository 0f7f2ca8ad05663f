"""lazymat reductions as torch custom ops, what ``torch.compile`` sees of lazymat.

One op, ``lazymat::reduce(str key, Tensor[] args, SymInt[] sizes) -> Tensor[]``, runs every
reduction kind: ``key`` names a request of a process-wide table (the formula, reduction,
axis, K, weight and accumulation options, the arguments' names and the backend), registered
at trace time by :func:`register`; ``sizes`` are (M, N) (-1: from the arrays). The key also
*holds* the request (``Sum:`` then the compressed pickle of it), so that a graph compiled
in another process and loaded from inductor's or AOTAutograd's on-disk caches finds its
requests: the first call of a key this process has not seen registers it. The op has

- a fake (meta) rule: output shapes, dtypes and devices from the request, with symbolic
  sizes, so a dynamic N does not recompile;
- an autograd rule whose backward builds the gradient reductions exactly as the eager path
  does (``autograd.gradients``) and runs them through this op again: ``create_graph=True``
  and derivatives of any order, eager and compiled;
- a vmap rule (the mapped dim becomes the outermost batch dim);
- autocast rules (CPU, CUDA): float16/bfloat16 inputs are reduced in float32.

Eager calls keep the direct path (``autograd.run``); only code traced by Dynamo goes
through the op, so eager calls pay nothing for it.

>>> import torch, lazymat as lm
>>> from lazymat.formula import Var, SqDist
>>> req = lm.plan.Request("Sum", SqDist(Var(0, 1, 0), Var(1, 1, 1)), axis=1)
>>> key = register(req, ["x", "y"], "auto")
>>> torch.ops.lazymat.reduce(key, [torch.zeros(2, 1), torch.ones(3, 1)], [-1, -1])[0].ravel()
tensor([3., 3.])
"""

from __future__ import annotations

import base64
import pickle
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import autograd, plan
from ..errors import LazymatError


@dataclass(frozen=True)
class Entry:
    """A registered request: what ``lazymat::reduce`` runs for its key."""

    req: plan.Request  # as asked (its gradient rules)
    forward: plan.Request  # as run: selections also return their indices
    names: tuple[str, ...]
    backend: str

    @property
    def visible(self) -> int:
        """How many of the op's outputs the caller sees (not the selections' indices)."""
        red = self.req.definition
        return len(red.output_kinds) if not red.selects_with or red.selects_with == red.name \
            else 1


_entries: dict[str, Entry] = {}
_keys: dict[tuple, str] = {}


@torch._dynamo.assume_constant_result
def register(req: plan.Request, names: Sequence[str], backend: str) -> str:
    """The key of a request in the table (added on first use; run at trace time)."""
    found = (req, tuple(names), str(backend))
    key = _keys.get(found)
    if key is None:
        plan.check_request(req)
        blob = base64.urlsafe_b64encode(zlib.compress(pickle.dumps(found, protocol=4), 9))
        key = _keys[found] = f"{req.reduction}:{blob.decode('ascii')}"
        _add(key, *found)
    return key


def _add(key: str, req: plan.Request, names: tuple, backend: str) -> Entry:
    e = _entries[key] = Entry(req, autograd.forward_request(req), names, backend)
    return e


def is_registered(key: str) -> bool:
    """Whether this process's table holds ``key`` (a key made by another process is added on
    first use)."""
    return key in _entries


def entry(key: str) -> Entry:
    """The request registered under ``key``; a key made by another process (a compiled graph
    from torch's on-disk caches) is registered here on first use."""
    found = _entries.get(key)
    if found is not None:
        return found
    try:
        req, names, backend = pickle.loads(zlib.decompress(base64.urlsafe_b64decode(
            key.split(":", 1)[1].encode("ascii"))))
        if not isinstance(req, plan.Request):
            raise TypeError(f"a {type(req).__name__}, not a request")
    except Exception as exc:  # noqa: BLE001 - any malformed key is the same error
        raise LazymatError(f"lazymat::reduce: {key[:60]!r} is not a key made by "
                           f"lazymat.torch.ops.register ({type(exc).__name__}: {exc})") from None
    plan.check_request(req)
    _keys[(req, tuple(names), str(backend))] = key
    return _add(key, req, tuple(names), str(backend))


def _sizes(sizes: tuple) -> list:
    return [-1 if s is None else s for s in sizes]


def _from_op(sizes: Sequence[Any]) -> tuple:
    return tuple(None if (isinstance(s, int) and s < 0) else s for s in sizes)


# ---------------------------------------------------------------------- the op

@torch.library.custom_op("lazymat::reduce", mutates_args=())
def reduce(key: str, args: list[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """Run the registered reduction ``key`` on ``args``: its outputs (values, then int64
    indices for the selections)."""
    e = entry(key)
    outs = plan.run(e.forward, [a.detach() for a in args], names=e.names, backend=e.backend,
                    sizes=_from_op(sizes))
    return list(outs)


@reduce.register_fake
def _fake(key: str, args: list[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    e = entry(key)
    shapes, kinds = output_shapes(e, args, sizes)
    like = args[0]
    return [like.new_empty(shape, dtype=torch.int64 if kind == "index" else None)
            for shape, kind in zip(shapes, kinds)]


def output_shapes(e: Entry, args: Sequence[Any], sizes: Sequence[Any]) -> tuple[list, list]:
    """(shapes, kinds) of the op's outputs, from the request and the arrays' (symbolic)
    shapes: the checks of ``plan.validate`` (a clear error before anything runs)."""
    req = e.forward
    M, N, batch, _ = plan.validate(req, args, e.names, _from_op(sizes))
    red = req.definition
    if red.needs_k:
        torch._check(req.K <= (N if req.axis == 1 else M),
                     lambda: f"{red.name}: K = {req.K} is larger than the number reduced")
    lead = tuple(batch) + ((M if req.axis == 1 else N),)
    wdim = None if req.weight is None else req.weight.dim
    shapes, kinds = [], []
    for kind, shape in red.outputs(req.formula.dim, req.K, wdim):
        if red.needs_k and shape[-1] == 1:  # (M, K, D) is (M, K) when D = 1, as in KeOps
            shape = shape[:-1]
        shapes.append(lead + tuple(shape))
        kinds.append(kind)
    return shapes, kinds


def _setup_context(ctx, inputs, output) -> None:
    key, args, sizes = inputs
    ctx.key, ctx.sizes, ctx.n_args = key, tuple(sizes), len(args)
    ctx.save_for_backward(*args, *output)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    args, outs = list(saved[:ctx.n_args]), saved[ctx.n_args:]
    e = entry(ctx.key)
    kinds = e.forward.definition.output_kinds
    values = [o for o, k in zip(outs, kinds) if k == "value"]
    indices = outs[kinds.index("index")] if "index" in kinds else None
    needs = ctx.needs_input_grad[1]
    wanted = [p for p in range(ctx.n_args) if needs[p]]
    G = grads[0]
    if G is None or not wanted or not values:
        return None, [None] * ctx.n_args, None
    M, N, _, _ = plan.validate(e.forward, args, e.names, _from_op(ctx.sizes))
    spec = autograd.gradient_spec(e.req, e.names, e.backend, (M, N), args[0],
                                  _runner(e.backend))
    found = autograd.gradients(spec, args, values, indices, G, wanted)
    return None, [found.get(p) for p in range(ctx.n_args)], None


reduce.register_autograd(_backward, setup_context=_setup_context)


def _runner(backend: str):
    def run_gradient(req: plan.Request, arrays: Sequence[Any], names: Sequence[str],
                     sizes: tuple, ranges: Any = None) -> tuple:
        if ranges is not None:
            raise LazymatError("block-sparse ranges are not supported through torch.compile")
        return call(register(req, names, backend), arrays, sizes)

    return run_gradient


@torch.library.register_vmap("lazymat::reduce")
def _vmap(info, in_dims, key: str, args: list[torch.Tensor], sizes: Sequence[int]):
    moved = autograd.batched(entry(key).forward, args, in_dims[1])
    outs = torch.ops.lazymat.reduce(key, moved, sizes)
    return outs, [0] * len(outs)


for _device in ("cpu", "cuda"):
    if torch._C._is_autocast_available(_device):
        torch.library.register_autocast("lazymat::reduce", _device, torch.float32)


# ---------------------------------------------------------------------- front-end entry

def call(key: str, arrays: Sequence[Any], sizes: tuple = (None, None)) -> tuple:
    """The outputs the caller sees of ``lazymat::reduce(key, arrays, sizes)``."""
    outs = torch.ops.lazymat.reduce(key, list(arrays), _sizes(sizes))
    return tuple(outs[:_visible(key)])


@torch._dynamo.assume_constant_result
def _visible(key: str) -> int:
    # a trace-time constant: Dynamo must not read the table (it grows while Dynamo traces)
    return entry(key).visible


def run(req: plan.Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
        backend: str = "auto", out: Any = None,
        sizes: tuple[int | None, int | None] = (None, None), ranges: Any = None) -> tuple:
    """``autograd.run`` inside torch.compile: the request registered (at trace time), then
    the custom op."""
    if out is not None:
        raise LazymatError("out= is not supported inside torch.compile: use the result")
    if ranges is not None:
        raise LazymatError("block-sparse ranges are not supported inside torch.compile")
    names = list(names) if names is not None else [f"argument {k}" for k in range(len(arrays))]
    return call(register(req, names, backend), arrays, sizes)
