"""Attention and matmul kernels, each beside its plain-JAX reference (owner: runtime/kernels)."""

from __future__ import annotations

import os

from kiln.errors import ConfigError


def requested_impl(impl: str, impls, env: str, what: str) -> str:
    """`impl` checked against `impls`; "auto" defers to the environment variable `env` (checked too)."""
    if impl not in impls:
        raise ConfigError(f"unknown {what} implementation {impl!r}; choose one of {', '.join(impls)}")
    if impl == "auto":
        impl = os.environ.get(env, "auto")
        if impl not in impls:
            raise ConfigError(f"{env}={impl!r} is not one of {', '.join(impls)}; unset it or fix it")
    return impl
