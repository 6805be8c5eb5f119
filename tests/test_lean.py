"""The lean default: an int4 GGUF run without torch, on the file's own blocks, equal to the torch form's path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cfm_runtime import RunOptions, load_model
from cfm_runtime.kernels import native
from cfm_runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(native.load() is None, reason=f"no native kernel here: {native.failure()}")

CHILD = """
import json, sys
from cfm_runtime import RunOptions, load_model
from cfm_runtime.sampling import SamplingParams
m = load_model(sys.argv[1])
gen = m.new_generator(RunOptions())
chunks = list(gen.stream(m.encode_prompt([{"role": "user", "content": "Name a colour."}]),
                         SamplingParams(max_tokens=12, temperature=0)))
print(json.dumps({"tokens": [c.token for c in chunks if c.token is not None], "backend": m.backend.name,
                  "torch": "torch" in sys.modules, "onnxruntime": "onnxruntime" in sys.modules,
                  "stats": chunks[-1].stats.to_dict()}))
"""


def test_a_default_run_imports_no_torch_and_answers_as_the_torch_form(model_path):
    """A fresh process loads and answers on the native backend without importing torch or onnxruntime, and
    its greedy answer is the one the torch form (quantized modules, fused backend, same kernel) gives."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["backend"] == "native" and not child["torch"] and not child["onnxruntime"]
    stats = child["stats"]
    assert stats["rss_file_mb"] > 0 and stats["rss_anon_mb"] > 0 and stats["backend"] == "native"
    assert stats["speculative"]["mode"] == "auto"  # speculation (prompt lookup) runs on the lean path too

    torch_form = load_model(model_path)
    torch_form.transformer  # built on first use: the quantized modules, then the fused backend over them
    assert torch_form.backend.name == "fused"
    gen = torch_form.new_generator(RunOptions())
    ids = torch_form.encode_prompt([{"role": "user", "content": "Name a colour."}])
    tokens = [c.token for c in gen.stream(ids, SamplingParams(max_tokens=12, temperature=0)) if c.token is not None]
    assert torch_form.backend.report()["decode_path"] == "native"
    assert tokens == child["tokens"]


def test_lean_logits_equal_the_fused_native_path_and_stay_close_to_llama_cpp(model, model_path, eval_ids):
    """Every position's logits on the lean backend equal the fused backend's (the same kernel over the same
    blocks), bit for bit, before and after the torch form is built; and they are as close to llama.cpp's as
    llama.cpp's own int8-activation rounding allows (bound from llama.cpp vs the fp32 model, same text)."""
    from cfm_runtime.reference import llama_cpp_logits

    ids = eval_ids["prose"][:64]
    m = load_model(model_path)
    assert m.backend.name == "native" and not m.has_torch_form()
    lean = m.logits(ids)
    m.transformer
    assert m.backend.name == "fused"
    np.testing.assert_array_equal(m.logits(ids), lean)
    ref = llama_cpp_logits(model_path, ids)
    fp32 = model.logits(ids)  # the fp32 reference
    assert np.abs(lean - ref).max() <= 2 * np.abs(ref - fp32).max()
    assert np.mean(lean.argmax(-1) == ref.argmax(-1)) >= 0.9


CLI_CHILD = """
import sys
from cfm_cli.main import main
code = main(["generate", "--model", sys.argv[1], "--chat", "--prompt", "Name a colour.", "--max-tokens", "4",
             "--temperature", "0", *sys.argv[2:]])
print("heavy:", sorted(m for m in ("torch", "onnxruntime", "fastapi", "grpc", "llama_cpp") if m in sys.modules), code)
"""


@pytest.mark.parametrize("extra", [[], ["--sparse", "--density-plan", "uniform", "--json"]], ids=["dense", "sparse"])
def test_cfm_generate_imports_no_torch(model_path, extra):
    """The command a user runs (`cfm generate`, its parser holding every subcommand's options) stays lean too:
    subcommands import their machinery (bricks, packs, servers) when they run, not when the parser is built;
    the embedded model's tokenizer runs without llama.cpp; the sparse FFN on int4 runs in the kernel."""
    out = subprocess.run([sys.executable, "-c", CLI_CHILD, str(model_path), *extra], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "heavy: [] 0", out.stdout[-2000:]
    if "--sparse" in extra:  # and the answer came from the kernel's sparse FFN
        assert json.loads(out.stdout.strip().splitlines()[-2])["sparse_ffn"]["layers_sparse"] == 30
