"""Text form of a formula, in the syntax the Genred parser reads back.

>>> from lazymat.formula import Var, SqDist
>>> to_string(SqDist(Var(0, 3, 0), Var(1, 3, 1)))
'Sum(Square(Subtract(Var(0,3,0), Var(1,3,1))))'
"""

from __future__ import annotations

from fractions import Fraction

from .node import Node, walk


def const_to_string(value, dim: int) -> str:
    if isinstance(value, Fraction):
        text = (f"IntCst({value.numerator})" if value.denominator == 1
                else f"RatCst({value.numerator},{value.denominator})")
    else:
        text = repr(float(value))
    return text if dim == 1 else f"SumT({text},{dim})"


def _param_to_string(p) -> str:
    """An integer parameter, or a list parameter (TensorDot's shapes) as ``[2, 3]``."""
    if isinstance(p, tuple):
        return "[" + ", ".join(str(v) for v in p) + "]"
    return str(p)


def to_string(root: Node) -> str:
    texts: dict[int, str] = {}
    for node in walk(root):
        if node.op == "Var":
            i, d, c = node.params
            texts[id(node)] = f"Var({i},{d},{c})"
        elif node.op == "Const":
            texts[id(node)] = const_to_string(node.params[0], node.params[1])
        else:
            parts = [texts[id(a)] for a in node.args] + [_param_to_string(p)
                                                         for p in node.params]
            texts[id(node)] = f"{node.op}({', '.join(parts)})"
    return texts[id(root)]
