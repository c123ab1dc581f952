"""Architecture definitions, HF config and weight mapping, checkpoint loading (owner: models)."""

from kiln.models.config import ModelConfig
from kiln.models.registry import ModelFamily, WeightRule, build_graph, get_family, register, supported

__all__ = ["ModelConfig", "ModelFamily", "WeightRule", "build_graph", "get_family", "register", "supported"]
