"""Benchmarks that print Kiln against a peer measured in the same run."""
