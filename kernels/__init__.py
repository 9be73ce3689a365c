"""Triton kernels for the hot paths, each beside its pure-torch reference (added with the GPU work)."""
