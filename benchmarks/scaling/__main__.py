"""python -m benchmarks.scaling: how the cost grows (see benchmarks/scaling/__init__.py)."""
from .run import main

if __name__ == "__main__":
    main()
