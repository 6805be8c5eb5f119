"""cfm-runtime: configurable foundation models on small machines, locally or split with a center.

The names below are imported on first use, so that a process that needs one part (the protocol stubs in a
proxy, the options in a CLI parser) does not pay for the rest (torch, onnxruntime).
"""

from importlib import import_module

_WHERE = {
    "CenterOptions": "options", "LoadOptions": "options", "RunOptions": "options", "SparseOptions": "options",
    "CfmError": "errors", "ContextOverflowError": "errors", "ModelFileError": "errors",
    "GenerationChunk": "generate", "GenerationStats": "generate", "Generator": "generate",
    "KVCache": "cache", "SpanCache": "cache", "Transformer": "model",
    "LocalRunner": "runners", "Runner": "runners",
    "Model": "runtime", "load_model": "runtime",
    "ModelConfig": "config", "SamplingParams": "sampling", "default_model_path": "loading",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'cfm_runtime' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
