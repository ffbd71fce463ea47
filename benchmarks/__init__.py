"""Benchmarks of calm_fast (ops, end to end, quality); shipped as calm_fast.benchmarks for `calm-fast bench`."""
