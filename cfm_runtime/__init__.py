"""cfm-runtime: configurable foundation models on small machines, locally or split with a center."""

from .config import ModelConfig
from .errors import CfmError, ContextOverflowError, ModelFileError
from .generate import GenerationChunk, GenerationStats, Generator, LocalRunner
from .loading import default_model_path
from .model import KVCache, SpanCache, Transformer
from .runtime import Model, load_model
from .sampling import SamplingParams

__all__ = [
    "CfmError", "ContextOverflowError", "GenerationChunk", "GenerationStats", "Generator", "KVCache",
    "LocalRunner", "Model", "ModelConfig", "ModelFileError", "SamplingParams", "SpanCache", "Transformer",
    "default_model_path", "load_model",
]
