"""Benchmarks: measured, never timed tests."""
