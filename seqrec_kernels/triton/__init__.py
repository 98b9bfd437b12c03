"""Triton kernels and their launchers (imported lazily: Triton is optional on CPU)."""
