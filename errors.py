"""Typed errors. Every error a user can cause is a `KilnError` whose message is one line
that names the problem and the fix; the CLI prints it and exits with code 2."""


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""


class GraphError(KilnError):
    """An ill-typed or malformed graph (names the node)."""


class ConfigError(KilnError):
    """A missing, malformed or unsupported model configuration (names the file or field)."""


class CheckpointError(KilnError):
    """Missing or malformed weights (names the file or tensor)."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one Kiln knows (lists the supported ones)."""


class RequestError(KilnError, ValueError):
    """A generation request Kiln cannot serve (bad parameter, prompt too long)."""
