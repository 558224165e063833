from .cache import InferenceCache
from .layers import LayerFactory
from .lm import HybridLM

__all__ = ["HybridLM", "InferenceCache", "LayerFactory"]
