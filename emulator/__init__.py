"""Emulated 2015 nodes for demos, tests and benchmarks."""
