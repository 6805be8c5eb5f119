"""llama-cpp-python as the reference runtime: its logits on a GGUF, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from .tokenizer import quiet_stderr


def llama_cpp_logits(path, ids: list[int], n_threads: int = 2) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for every position of ids, evaluated as one batch."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                              n_threads=n_threads, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out
