"""Benchmark harness: emrdr's backup engine against pgBackRest (see benchmarks/README.md)."""
