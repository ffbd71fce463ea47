"""python -m benchmarks.ops: the op microbenchmarks (see benchmarks/ops/__init__.py)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
