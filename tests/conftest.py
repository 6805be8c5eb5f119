import json
from pathlib import Path

import pytest

import cfm_runtime
from cfm_runtime.loading import default_model_path

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


@pytest.fixture(scope="session")
def hf_reference(model_path):
    """transformers' own fp32 Llama, loaded from the same GGUF (an independent implementation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    return hf.eval(), tok
