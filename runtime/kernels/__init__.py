"""Attention and matmul kernels, each beside its plain-JAX reference (owner: runtime/kernels)."""
