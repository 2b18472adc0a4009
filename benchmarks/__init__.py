"""Benchmarks of synthmed; see benchmarks/README.md. Run all: ``python -m benchmarks``."""
