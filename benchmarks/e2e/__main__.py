"""python -m benchmarks.e2e: the end-to-end CALM benchmark (see benchmarks/e2e/__init__.py)."""
from .run import main

if __name__ == "__main__":
    main()
