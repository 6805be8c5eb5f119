"""cfm-runtime: configurable foundation models on small machines, locally or split with a center.

The names below are imported on first use, so that a process that needs one part (the protocol stubs in a
proxy, the options in a CLI parser) does not pay for the rest (torch, onnxruntime).
"""

from ._lazy import lazy_names

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

__getattr__, __dir__ = lazy_names(__name__, _WHERE)
