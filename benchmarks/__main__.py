"""Run every benchmark: ``python -m benchmarks [--full]``."""

import sys

from . import engine, sparse_batch_solve, suite

if __name__ == "__main__":
    full = "--full" in sys.argv[1:]
    engine.main(full=full)
    suite.main(full=full)
    sparse_batch_solve.main(full=full)
    try:
        import torch
    except ImportError:
        print("\n(torch is not installed: autodiff benchmark skipped)")
    else:
        from . import autodiff

        autodiff.main(full=full)
        if torch.cuda.is_available():  # the CUDA backend against torch (and pykeops)
            from . import gpu

            gpu.main(quick=not full)
