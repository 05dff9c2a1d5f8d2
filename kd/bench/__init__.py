"""Benchmarks behind ``kd bench``."""
