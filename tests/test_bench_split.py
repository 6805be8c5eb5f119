"""`cfm bench split`: the quick run end to end (JSON and plots sane), the baseline service, the wire round trips."""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfm_runtime import CfmError
from cfm_bench.center_service import REQUEST, TokenClient, TokenService
from cfm_bench.split import roundtrip
from cfm_cli.bench import settings_from_args
from cfm_cli.main import build_parser

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory, whole_machine):
    """`cfm bench split --quick` as a user runs it: from a non-editable install of this checkout (its wheel,
    in a venv that sees the installed dependencies), outside the checkout, on every core (a test worker keeps
    to one: the center, the edge and the link emulators on one core made a single TTFT sample swing by 40 ms)."""
    tmp = tmp_path_factory.mktemp("bench_split")
    run = dict(capture_output=True, text=True, timeout=600)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp / "wheel"), str(ROOT)], **run)
    assert built.returncode == 0, built.stderr[-4000:]
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True, **run)
    bin_dir = tmp / "venv" / "bin"
    wheel = next((tmp / "wheel").glob("cfm_runtime-*.whl"))
    installed = subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr[-4000:]
    out = tmp / "out"
    proc = subprocess.run([str(bin_dir / "cfm"), "bench", "split", "--quick", "--out", str(out)], cwd=tmp,
                          capture_output=True, text=True, timeout=900, preexec_fn=whole_machine)
    assert proc.returncode == 0, proc.stderr[-4000:]
    where = subprocess.run([str(bin_dir / "python"), "-c", "import cfm_bench; print(cfm_bench.__file__)"], cwd=tmp,
                           **run).stdout
    assert str(tmp / "venv") in where  # the installed copy ran, not the checkout
    return json.loads((out / "split.json").read_text()), out


def _numbers(run):
    return [run["ttft_ms"], run["median_ms"], run["p95_ms"], *run["per_token_ms"]]


def test_every_measurement_is_finite_and_positive(quick):
    result, _ = quick
    assert result["environment"]["model_fingerprint"] and result["environment"]["loadavg_start"]
    env = result["environment"]
    assert result["settings"]["weights"] == "int4" and env["edge_backend"] == env["center_backend"] == "native"
    assert len(result["cells"]) == len(result["settings"]["rtts_ms"]) * len(result["settings"]["rates_mbit"])
    for cell in result["cells"]:
        kinds = {r["kind"] for r in cell["runs"]}
        assert kinds == {"local", "split", "center-only"}
        assert {r["wire"] for r in cell["runs"] if r["kind"] == "split"} == {"fp32", "fp16"}
        for run in cell["runs"]:
            assert all(math.isfinite(x) and x > 0 for x in _numbers(run)), run
            assert len(run["per_token_ms"]) == result["settings"]["decode_tokens"]
            assert run["median_ms"] <= run["p95_ms"]
        for run in cell["runs"]:
            if run["kind"] == "split":
                assert run["positions_local"] == 0 and not run["fallbacks"], run  # all on the center
                assert run["center_compute_ms"] > 0 and run["predicted_ms"] > 0
                assert run["bytes_up_per_token"] >= run["payload_bytes_per_token"] / 2  # framing adds, never removes
        fp32, fp16 = (next(r for r in cell["runs"] if r["wire"] == w) for w in ("fp32", "fp16"))
        assert fp16["bytes_up_per_token"] < 0.6 * fp32["bytes_up_per_token"]
        assert cell["planner"]["predicted_ms"] > 0 and cell["planner"]["config"] in {r["config"] for r in cell["runs"]}


def test_latency_grows_with_rtt(quick):
    """The network part of each latency (less the center's compute, which swings 2x on a shared machine)."""
    result, _ = quick
    cells = sorted(result["cells"], key=lambda c: c["rtt_ms"])
    lo, hi = cells[0], cells[-1]
    gap = hi["rtt_ms"] - lo["rtt_ms"]
    for config in ("center-only", "split 2:28 fp16", "split 2:28 fp32"):
        a, b = (next(r for r in c["runs"] if r["config"] == config) for c in (lo, hi))
        assert b["network_ms"] - a["network_ms"] > 0.5 * gap, (config, a, b)
        assert b["ttft_network_ms"] - a["ttft_network_ms"] > 0.5 * gap, (config, a, b)
        assert b["network_ms"] > hi["rtt_ms"] * 0.9 and b["ttft_network_ms"] > hi["rtt_ms"] * 0.9


def test_wire_quality_measured(quick):
    result, _ = quick
    q = {r["wire"]: r for r in result["quality"]}
    assert set(q) == {"fp16", "bf16", "int8"}
    assert q["fp16"]["top1_agreement"] >= 0.95 and q["fp16"]["max_logit_diff"] < 1.0
    assert q["int8"]["bytes_per_position"] < q["fp16"]["bytes_per_position"] < 4 * 576
    assert all(0 < r["positions"] and math.isfinite(r["max_logit_diff"]) for r in result["quality"])


def test_plots_are_pngs(quick):
    result, out = quick
    assert set(result["plots"]) == {"latency_vs_rtt.png", "best_config.png", "planner_vs_measured.png"}
    for name in result["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_roundtrips():
    h = torch.randn(5, 576) * torch.logspace(0, 4, 576)  # a few huge channels, like the residual stream
    for w, tol in (("fp16", 1e-3), ("bf16", 1e-2)):
        assert torch.allclose(roundtrip(h, w), h, rtol=tol, atol=1e-3)
    q = roundtrip(h, "int8")
    step = h.abs().amax(1, keepdim=True) / 127
    assert bool(((q - h).abs() <= step / 2 + 1e-6).all())
    assert len((q / step).round().unique()) <= 255


def _dropped(s: socket.socket) -> bool:
    try:
        return s.recv(16) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True


def test_center_only_service_survives_bad_requests(model):
    svc = TokenService(model)
    try:
        too_big = REQUEST.pack(0, 1) + (10**6).to_bytes(4, "little")
        for bad in (REQUEST.pack(0, 0), REQUEST.pack(5, 1) + b"\0" * 4, too_big):
            with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as s:
                s.sendall(bad)
                assert _dropped(s)  # and the service lives on
        ids = model.tokenizer.encode("The capital of France is")
        client = TokenClient("127.0.0.1", svc.port)
        token, ms = client.step(0, ids)
        assert token == int(model.logits(ids)[-1].argmax()) and ms > 0
        token2, _ = client.step(len(ids), [token])
        assert token2 == int(model.logits(ids + [token])[-1].argmax())
        client.close()
    finally:
        svc.close()


@pytest.mark.parametrize("argv", [["--rtt", "10,x"], ["--rate", "0"], ["--edge-threads", "0"]])
def test_bad_options(argv):
    args = build_parser().parse_args(["bench", "split", "--quick", *argv])
    with pytest.raises(CfmError):
        settings_from_args(args)
