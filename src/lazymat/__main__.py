"""``python -m lazymat COMMAND``: ``precompile`` (kernels into a cache directory ahead of
time, see :mod:`lazymat.precompile`) and ``health`` (what :func:`lazymat.check_health`
reports).

Example::

    $ python -m lazymat precompile kernels.json --cache-dir /opt/lazymat-cache
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "precompile":
        from .precompile import main as precompile_main

        return precompile_main(args[1:])
    if args and args[0] == "health":
        from . import check_health

        check_health()
        return 0
    print("usage: python -m lazymat precompile SPEC [--cache-dir DIR] [--dtype D] "
          "[--backend B] [--grad]\n       python -m lazymat health", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
