"""The `cfm` command as a user runs it: real processes, real exit codes, no tracebacks for user errors."""

import json
import subprocess
import sys

import pytest


def cfm(*args, input=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "cfm_cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


def test_generate_json():
    # not France: there the first answer token is a 0.08-logit near-tie ("The" -> Paris vs "L" -> "L'Étoile");
    # fp32 says Paris, llama.cpp and the int4 CLI default say "L'Étoile". Tokyo is what all three answer.
    r = cfm("generate", "--chat", "--prompt", "What is the capital of Japan?", "--temperature", "0",
            "--max-tokens", "20", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"text", "tokens", "prompt_tps", "decode_tps", "peak_rss_mb"} <= set(out)
    assert "Tokyo" in out["text"] and out["tokens"] > 0


def test_chat_keeps_conversation():
    # fp32: the reference weights; the 135M model's recall of the name is what the mechanism is checked by
    r = cfm("chat", "--weights", "fp32", "--temperature", "0", "--max-tokens", "25", "--stats",
            input="My name is Ada. Please remember it.\nWhat is my name?\n")
    assert r.returncode == 0, r.stderr
    assert "Ada" in r.stdout.split("\n", 1)[1]
    assert r.stderr.count("cached") == 2


def test_info():
    r = cfm("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["n_layers"] == 30 and info["parameters"] > 100e6


@pytest.mark.parametrize("args,needle", [
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "--prompt", "hi", "--model", "/nope/model.gguf"], "does not exist"),
    (["generate", "--prompt", "word " * 9000], "context holds"),
    (["generate", "--prompt", "hi", "--temperature", "-2"], "temperature"),
])
def test_user_errors_are_clear(args, needle):
    r = cfm(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_foreign_gguf_is_refused(tmp_path):
    import gguf
    import numpy as np

    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = cfm("generate", "--prompt", "hi", "--model", str(p))
    assert r.returncode == 2 and "architecture 'bert'" in r.stderr and "Traceback" not in r.stderr


def test_flags_become_the_library_options():
    """The CLI only converts flags into LoadOptions/RunOptions; every rule is the library's (load_model,
    new_generator), so a Python caller with the same options gets the same run."""
    from cfm_cli.common import load_options, run_options
    from cfm_cli.main import build_parser
    from cfm_runtime import CenterOptions, LoadOptions, RunOptions, SparseOptions

    args = build_parser().parse_args([
        "generate", "--prompt", "hi", "--threads", "1", "--weights", "fp32", "--ram-budget", "48", "--sparse",
        "--density", "0.5", "--predictor", "lowrank", "--bricks", "a:0.5,b", "--center", "h:1", "--split", "2:20",
        "--wire", "fp16", "--center-timeout", "3", "--min-edge-layers", "2"])
    assert load_options(args) == LoadOptions(threads=1, weights="fp32", sparse=SparseOptions(
        ram_budget_mb=48, sparse=True, density=0.5, predictor="lowrank"))
    run = run_options(args)
    assert run.center == CenterOptions("h:1", (2, 20), wire="fp16", timeout=3.0, min_edge_layers=2)
    assert run.bricks == (("a", 0.5), ("b", 1.0))
    assert RunOptions(center=run.center, bricks="auto").bricks == "auto"
    defaults = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert load_options(defaults).resolved().weights == "int4" and run_options(defaults).center is None
