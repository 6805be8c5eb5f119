import json
from pathlib import Path

import numpy as np
import pytest

import cfm_runtime
from cfm_runtime.loading import default_model_path
from cfm_runtime.tokenizer import quiet_stderr

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path):
    return cfm_runtime.load_model(model_path)


@pytest.fixture(scope="session")
def eval_ids(model) -> dict[str, list[int]]:
    """Varied evaluation texts (prose, code, math, science, a chat) as token ids."""
    d = json.loads((DATA / "eval_texts.json").read_text())
    ids = {k: model.tokenizer.encode(t) for k, t in d["texts"].items()}
    ids["chat"] = model.encode_prompt(d["chat"])
    return ids


def llama_cpp_logits(path: Path, ids: list[int], n_threads: int = 2) -> np.ndarray:
    """llama-cpp-python's logits for every position of ids, evaluated as one batch."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                              n_threads=n_threads, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="session")
def hf_reference(model_path):
    """transformers' own fp32 Llama, loaded from the same GGUF (an independent implementation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    return hf.eval(), tok
