import json
import os
from pathlib import Path

import pytest


MACHINE_CORES = frozenset(os.sched_getaffinity(0))  # before a worker keeps to one of them


def _one_core_per_worker() -> None:
    """Under pytest-xdist with a worker per core (the README's `-n 2` on a 2-core machine), each worker keeps to
    its own core, so the runtimes default to one thread there. Two workers each running 2-thread kernels (torch,
    onnxruntime, the native kernel, llama.cpp, whose idle workers spin) on 2 cores fought over them: a test file
    measured 5-6x slower beside the other worker than alone. Subprocesses inherit the core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    cores = sorted(MACHINE_CORES)
    if worker.startswith("gw") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) >= len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_one_core_per_worker()

import cfm_runtime
from cfm_bench.split import EVAL_TEXTS
from cfm_runtime.loading import default_model_path



@pytest.fixture(scope="session")
def whole_machine():
    """A `preexec_fn` that gives a subprocess every core back: for a child that measures latency with several
    processes and threads of its own (a center, an edge, link emulators), which one core would serialise."""
    return lambda: os.sched_setaffinity(0, MACHINE_CORES)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path):
    """The fp32 reference model (shared by the session: tests put bricks on it and take them off, never
    leave it changed)."""
    return cfm_runtime.load_model(model_path, weights="fp32")


@pytest.fixture(scope="module")
def own_model(model_path):
    """A model of the test module's own (fp32), for tests that put bricks on a model or train them."""
    return cfm_runtime.load_model(model_path, weights="fp32")


@pytest.fixture(scope="session")
def eval_ids(model) -> dict[str, list[int]]:
    """Varied evaluation texts (prose, code, math, science, a chat) as token ids."""
    d = json.loads(EVAL_TEXTS.read_text())
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


@pytest.fixture(scope="session")
def pack_root(model, model_path, tmp_path_factory) -> Path:
    """One small neuron pack for the session (sparse and prefetch tests): 1,200 calibration tokens."""
    from cfm_runtime.sparse.pack import source_digest
    from cfm_runtime.sparse.profile import build_pack

    root = tmp_path_factory.mktemp("packs") / "smollm2"
    return build_pack(model, root, source_digest=source_digest(model_path), chat_answers=0, max_tokens=1200,
                      sens_tokens=64, levels=(0.5, 0.6), progress=False)
