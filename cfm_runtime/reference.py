"""llama-cpp-python as the reference runtime: its logits on a GGUF, for tests and benchmarks.

`open_llama` is how every test and benchmark opens a llama.cpp model for evaluation. On CPUs with AMX
(Sapphire Rapids and later), llama.cpp moves Q4/Q8 weights into its AMX buffer, whose matrix product
crashes the process with SIGSEGV (`ggml_backend_amx_mul_mat`, llama.cpp issue #20824; reproduced here with
llama-cpp-python 0.3.36 on the embedded model, on its first evaluation). There it is opened with llama.cpp's
extra buffer types off (`use_extra_bufts`, the `--no-repack` of llama.cpp's tools): plain mmapped weights and
the AVX-512/AVX2 kernels. Elsewhere it opens as llama.cpp's defaults would.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from .tokenizer import quiet_stderr

_params_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def open_llama(path, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)`, with extra buffer types off on AMX CPUs (see the module's docstring)."""
    import llama_cpp
    from llama_cpp import llama as high_level

    if not cpu_has_amx():
        return llama_cpp.Llama(str(path), **kwargs)
    low_level = high_level.llama_cpp  # Llama.__init__ takes its model parameters from this module's defaults
    defaults = low_level.llama_model_default_params

    def no_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _params_lock:
        low_level.llama_model_default_params = no_extra_buffers
        try:
            return llama_cpp.Llama(str(path), **kwargs)
        finally:
            low_level.llama_model_default_params = defaults


def llama_cpp_logits(path, ids: list[int], n_threads: int = 2) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for every position of ids, evaluated as one batch."""
    with quiet_stderr():
        llm = open_llama(path, n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True, n_threads=n_threads,
                         verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out
