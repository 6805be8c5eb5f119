"""cfm-runtime: configurable foundation models on small machines, locally or split with a center."""

from .config import ModelConfig
from .errors import CfmError, ContextOverflowError, ModelFileError
from .generate import GenerationChunk, GenerationStats, Generator
from .loading import default_model_path
from .model import KVCache, SpanCache, Transformer
from .options import CenterOptions, LoadOptions, RunOptions, SparseOptions
from .runners import LocalRunner, Runner
from .runtime import Model, load_model
from .sampling import SamplingParams

__all__ = [
    "CenterOptions", "CfmError", "ContextOverflowError", "GenerationChunk", "GenerationStats", "Generator",
    "KVCache", "LoadOptions", "LocalRunner", "Model", "ModelConfig", "ModelFileError", "RunOptions", "Runner",
    "SamplingParams", "SparseOptions", "SpanCache", "Transformer", "default_model_path", "load_model",
]
