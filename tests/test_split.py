"""Edge–center split against a real center on 127.0.0.1: identity, fp16 agreement, fallback, reconnection, load."""

import json
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest

from center.server import CenterLimits, CenterServer
from cfm_cli import main as cli
from cfm_runtime import CenterOptions, RunOptions
from cfm_runtime.errors import CfmError
from cfm_runtime.split.client import CenterClient
from cfm_runtime.split.planner import Measurements, choose, plan
from cfm_runtime.split.runner import SplitRunner

GREEDY = dict(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def center(model):
    s = CenterServer(model, span=(2, 28)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat(eval_ids):
    return eval_ids["chat"]


@pytest.fixture(scope="module")
def local_answer(model, chat):
    return [c.token for c in model.new_generator().stream(chat, _params(**GREEDY))]


def split_generator(model, address, split=None, **options):
    """A split generator through the library's composition point (split None: the center's whole span)."""
    return model.new_generator(RunOptions(center=CenterOptions(address, split or "center", **options)))


def split_runner(model, address, split, **options):
    return SplitRunner(model, CenterOptions(address, split, **options), split)


def _params(**kw):
    from cfm_runtime import SamplingParams

    return SamplingParams(**kw)


def tokens(generator, ids, **kw):
    chunks = list(generator.stream(ids, _params(**{**GREEDY, **kw})))
    return [c.token for c in chunks], chunks[-1].stats


def test_fp32_split_equals_local_greedy(model, center, chat, local_answer):
    gen = split_generator(model, center.address, split=(3, 25))
    got, stats = tokens(gen, chat)
    assert got == local_answer
    r = stats.extra["split"]
    assert r["positions_local"] == 0 and r["fallbacks"] == []
    assert r["positions_center"] == len(chat) + stats.decode_steps
    assert r["layers"] == {"edge": "0:3 + 25:30", "center": "3:25"}


def test_second_turn_rewinds_the_center_cache(model, center):
    def turns(gen):
        first = model.encode_prompt([{"role": "user", "content": "Name a color."}])
        a, _ = tokens(gen, first, max_tokens=6)
        second = model.encode_prompt([{"role": "user", "content": "Name a fruit."}])  # shares the template prefix
        b, stats = tokens(gen, second, max_tokens=6)
        return a, b, stats

    *local, _ = turns(model.new_generator())
    *split, stats = turns(split_generator(model, center.address))
    assert split == local
    r = stats.extra["split"]
    assert stats.cached_tokens > 0 and r["positions_local"] == 0
    assert r["positions_center"] == stats.prompt_tokens - stats.cached_tokens + stats.decode_steps  # this answer's


def test_fp16_wire_top1_agreement_and_chunked_prefill(model, eval_ids):
    ids = (eval_ids["prose"] + eval_ids["code"] + eval_ids["math"])[:300]
    assert len(ids) == 300
    ref = model.logits(ids)
    small = CenterServer(model, span=(2, 28), limits=CenterLimits(max_step_positions=128)).start()
    try:
        runner = split_runner(model, small.address, (2, 28), wire="fp16")
        got = runner.forward(ids, all_logits=True)
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        assert agree >= 0.99, agree
        assert runner.log.round_trips == 3  # 300 positions in steps of at most 128
        exact = split_runner(model, small.address, (2, 28), wire="fp32").forward(ids, all_logits=True)
        np.testing.assert_allclose(exact, ref, atol=1e-3)
        assert runner.split_report()["wire"] == "fp16"
    finally:
        small.stop()


def start_center_process(port: int = 0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cfm_cli", "center", "serve", "--port", str(port),
                             "--layers", "2:28", "--threads", "1", "--weights", "fp32"],  # the edge's arithmetic
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("listening "):
            return proc, line.split()[1]
    proc.kill()
    raise AssertionError("the center process exited before listening")


def test_center_killed_mid_answer_finishes_locally(model, chat, local_answer):
    proc, address = start_center_process()
    try:
        gen = split_generator(model, address, split=(2, 28), reconnect_interval=3600)
        got = []
        for i, chunk in enumerate(gen.stream(chat, _params(**GREEDY))):
            got.append(chunk.token)
            if i == 8:
                proc.kill()
                proc.wait()
    finally:
        proc.kill()
    assert got == local_answer
    r = chunk.stats.extra["split"]
    assert len(r["fallbacks"]) == 1 and r["positions_center"] > len(chat) and r["positions_local"] > 0
    assert [w for _, _, w in r["segments"]] == ["center", "local"]


def test_reconnects_when_the_center_comes_back(model, chat, local_answer):
    first = CenterServer(model, span=(2, 28)).start()
    port = first.port
    gen = split_generator(model, first.address, split=(2, 28), reconnect_interval=0)
    got, second = [], None
    try:
        for i, chunk in enumerate(gen.stream(chat, _params(**GREEDY))):
            got.append(chunk.token)
            if i == 4:
                first.stop()
            if i == 10:
                second = CenterServer(model, span=(2, 28), port=port).start()
    finally:
        if second:
            second.stop()
    assert got == local_answer
    r = chunk.stats.extra["split"]
    assert [w for _, _, w in r["segments"]] == ["center", "local", "center"]
    assert r["reconnects"] == 1 and len(r["fallbacks"]) == 1


def test_unreachable_center_at_start_runs_locally(model, chat, local_answer):
    gen = split_generator(model, "127.0.0.1:1", split=(2, 28), reconnect_interval=3600, timeout=2)
    got, stats = tokens(gen, chat)
    assert got == local_answer
    r = stats.extra["split"]
    assert r["positions_center"] == 0 and "unreachable at start" in r["fallbacks"][0]["reason"]


def test_fingerprint_mismatch_is_refused_before_sending(model, model_path, tmp_path):
    from tiny_models import write_tiny_gguf

    import cfm_runtime

    other = cfm_runtime.load_model(write_tiny_gguf(tmp_path / "other.gguf", model_path, "llama", n_layers=30))
    s = CenterServer(other, span=(2, 28)).start()
    try:
        with pytest.raises(CfmError, match="different weights"):
            split_runner(model, s.address, (2, 28))
        assert s.servicer.table.sessions == {} and s.servicer.engine.batches == 0
    finally:
        s.stop()


def test_split_outside_the_center_span_is_refused(model, center):
    with pytest.raises(CfmError, match="not inside the center's span 2:28"):
        split_runner(model, center.address, (1, 20))


def test_sixteen_concurrent_sessions(model, center):
    prompts = [model.encode_prompt([{"role": "user", "content": f"Count to {i}."}]) for i in range(16)]
    firsts = [int(model.logits(p)[-1].argmax()) for p in prompts]
    results, errors = [None] * 16, []

    def work(i):
        try:
            results[i] = tokens(split_generator(model, center.address, split=(2, 28)), prompts[i], max_tokens=5)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, (got, stats) in enumerate(results):
        r = stats.extra["split"]
        assert r["fallbacks"] == [] and r["positions_local"] == 0
        assert got[0] == firsts[i]  # the prefill step runs unbatched: exactly the local first token


def test_planner_choices():
    base = dict(rtt_ms=1.0, up_mbps=10.0, down_mbps=10.0, local_layer_ms=2.0, local_head_ms=5.0,
                span=(2, 28), n_layers=30, bytes_per_position=2304)
    fast_center = choose(Measurements(center_layer_ms=0.2, **base))
    assert fast_center.split == (2, 28) and fast_center.predicted_ms < fast_center.local_only_ms
    slow_link = choose(Measurements(center_layer_ms=0.2, **{**base, "rtt_ms": 500.0}))
    assert slow_link.split is None and "local-only" in slow_link.describe()
    private = choose(Measurements(center_layer_ms=0.2, **base), min_edge_layers=6)
    assert private.split == (6, 28)


def test_plan_measures_a_real_center(model, center):
    p = plan(model, CenterClient(center.address))
    m = p.measurements
    assert m.rtt_ms > 0 and m.up_mbps > 0 and m.local_layer_ms > 0 and m.span == (2, 28)
    assert p.local_only_ms > 0 and (p.split is None or 2 <= p.split[0] < p.split[1] <= 28)


def test_cli_generate_with_center(center, capsys):
    code = cli.main(["generate", "--center", center.address, "--split", "center", "--chat", "--prompt", "Hi",
                     "--temperature", "0", "--max-tokens", "4", "--json", "--wire", "bf16"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"]["layers"]["center"] == "2:28" and out["split"]["wire"] == "bf16"
    assert out["split"]["positions_center"] > 0 and out["split"]["positions_local"] == 0


def test_resume_after_a_blip_replays_positions_the_center_holds_stale(model, center):
    """Turn 1 on the center; a blip; turn 2 locally (rewinds below what the center holds);
    turn 3 resumes the center session, which must replay from the rewind point, not reuse stale KV."""
    prompts = [[{"role": "user", "content": t}] for t in ("Name a color.", "Name a fruit.", "Name a tree.")]

    def turns(gen, between=lambda i: None):
        out = []
        for i, p in enumerate(prompts):
            between(i)
            out.append(tokens(gen, model.encode_prompt(p), max_tokens=6)[0])
        return out

    gen = split_generator(model, center.address, split=(2, 28), reconnect_interval=0)
    runner = gen.runner

    def blip(i):
        if i == 1:
            runner._drop_stream()  # the network drops the stream; the center keeps the session
            runner.opts = replace(runner.opts, reconnect_interval=3600)
        if i == 2:
            runner.opts = replace(runner.opts, reconnect_interval=0)

    assert turns(gen, blip) == turns(model.new_generator())
    assert [w for _, _, w in runner.log.segments] == ["center", "local", "center"]
    assert runner.log.reconnects == 1


def test_tls_and_token(model, tmp_path):
    from center.interceptor import Tokens

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    s = CenterServer(model, span=(2, 28), tokens=Tokens(["s3cret"]), tls=(key.read_bytes(), cert.read_bytes())).start()
    try:
        runner = split_runner(model, s.address, (2, 28), token="s3cret", tls_ca=cert.read_bytes())
        assert runner.forward(model.encode_prompt("Hello there")).shape[-1] == model.config.vocab_size
        assert runner.split_report()["positions_center"] > 0
        with pytest.raises(CfmError, match="not inside"):  # the TLS handshake and token passed: Info was read
            split_runner(model, s.address, (1, 5), token="s3cret", tls_ca=cert.read_bytes())
        plain = split_runner(model, s.address, (2, 28), token="s3cret", timeout=2)  # no TLS: refused
        assert plain.split_report()["positions_center"] == 0 and plain.log.fallbacks
        no_token = split_runner(model, s.address, (2, 28), tls_ca=cert.read_bytes(), timeout=2)
        assert "UNAUTHENTICATED" in no_token.log.fallbacks[0]["reason"]
    finally:
        s.stop()
