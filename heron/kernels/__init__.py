"""Compiled kernels: a leaf of the tree (imports nothing from heron but heron.cache)."""
