"""Run every benchmark: ``python -m benchmarks [--full]``."""

import sys

from . import engine

if __name__ == "__main__":
    engine.main(full="--full" in sys.argv[1:])
