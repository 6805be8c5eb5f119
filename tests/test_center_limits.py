"""The center's bounds against careless or hostile edges, over real gRPC: a public bind needs tokens, the KV
budget bounds the memory the caches allocate (RSS measured on a center in its own process), one token
cannot take another's sessions or bytes, a failed stream's session is freed after a short grace."""

import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from center.interceptor import Tokens
from center.server import CenterLimits, CenterServer
from cfm_runtime import load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.protocol import wire
from cfm_runtime.protocol.proto import pb, pb_grpc
from test_center import ALICE, BOB, D, assert_status, opened, run, step

BLOCK = 26 * 1536 * 256  # bytes of one block of 256 positions over layers 2:28
CLOSE = pb.SessionRequest(close=pb.CloseSession())


def test_a_public_bind_needs_tokens(model):
    r = subprocess.run([sys.executable, "-m", "cfm_cli", "center", "serve", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--token-file" in r.stderr and "--insecure" in r.stderr, r.stderr
    with pytest.raises(CfmError, match="--insecure"):
        CenterServer(model, host="0.0.0.0")


def info(channel, metadata=None) -> pb.InfoResponse:
    return pb_grpc.CenterStub(channel).Info(pb.InfoRequest(), metadata=metadata)


@pytest.fixture(scope="module")
def lean_model(model_path):
    """The center's default form: int4 on the native kernel, which writes the caches by address."""
    return load_model(model_path)


def test_kv_bytes_follow_the_blocks_and_a_rewind_gives_them_back(lean_model):
    """A rewind past a block boundary replaces the cache's arrays by smaller ones; the next step, written by
    the native kernel at the new addresses, equals the same positions computed locally."""
    h, x = np.random.default_rng(0).standard_normal((2, 300, D), dtype=np.float32)
    s = CenterServer(lean_model, span=(2, 28)).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            out, err = run(ch, [opened(), step(0, torch.from_numpy(h))], metadata=None)
            assert err is None
            session = s.servicer.table.sessions[out[0].opened.session_id]
            assert info(ch).limits.used_kv_bytes == 2 * BLOCK == session.cache.nbytes  # 300 positions: 2 blocks
            out, err = run(ch, [opened(resume_session_id=session.id), step(10, torch.from_numpy(x[:2]))],
                           metadata=None)
            assert err is None and session.n_past == 12
            assert info(ch).limits.used_kv_bytes == BLOCK == session.cache.nbytes  # the rewind gave one back
            got = wire.decode(out[1].result.hidden, hidden_size=D, dtype=pb.DTYPE_FLOAT32, max_rows=2)
            cache = lean_model.new_cache(2, 28)
            lean_model.backend.span(h[None, :10], 2, 28, [cache])
            np.testing.assert_array_equal(got, lean_model.backend.span(x[None, :2], 2, 28, [cache])[0])
            run(ch, [opened(resume_session_id=session.id), CLOSE], metadata=None)
            assert info(ch).limits.used_kv_bytes == 0
    finally:
        s.stop()


def test_one_token_cannot_take_another_tokens_sessions_or_bytes(model):
    limits = CenterLimits(max_sessions=4, max_kv_mb=4 * BLOCK / 2**20)  # two tokens: 2 sessions, 2 blocks each
    s = CenterServer(model, span=(2, 28), limits=limits, tokens=Tokens(["alice-token", "bob-token"])).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            assert run(ch, [opened(), step(0, torch.randn(300, D))], metadata=ALICE)[1] is None  # her 2 blocks
            out, err = run(ch, [opened(), step(0, torch.randn(10, D))], metadata=ALICE)
            assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "this token's KV cache share")
            assert_status(run(ch, [opened()], metadata=ALICE)[1], grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "this token holds its maximum of 2 sessions")
            assert run(ch, [opened(), step(0, torch.randn(300, D))], metadata=BOB)[1] is None  # Bob's share is his
            assert run(ch, [opened()], metadata=BOB)[1] is None
    finally:
        s.stop()


def test_a_failed_stream_frees_its_session_after_the_grace(model):
    limits = CenterLimits(max_sessions=2, error_grace_s=1.0, idle_timeout_s=300)
    s = CenterServer(model, span=(2, 28), limits=limits).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            clean = run(ch, [opened(), step(0, torch.randn(2, D))], metadata=None)[0][0].opened.session_id
            out, err = run(ch, [opened(), step(0, torch.randn(2, D)), step(9, torch.randn(1, D))], metadata=None)
            assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "holds 2 positions")
            failed = out[0].opened.session_id
            resumed, err = run(ch, [opened(resume_session_id=failed), step(9, torch.randn(1, D))], metadata=None)
            assert resumed[0].opened.n_past == 2  # resumable during the grace; fails again
            deadline = time.monotonic() + 30
            while failed in s.servicer.table.sessions:  # a liveness bound, not a measurement
                assert time.monotonic() < deadline, "the failed stream's session was not freed"
                time.sleep(0.1)
            assert clean in s.servicer.table.sessions  # a stream that ended cleanly keeps its session
            assert run(ch, [opened()], metadata=None)[1] is None  # the freed slot is usable
    finally:
        s.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


BUDGET_MB = 32  # three blocks of 10.2 MB over layers 2:28


@pytest.fixture(scope="module")
def center_small_budget():
    """`cfm center serve --max-kv-mb 32` in its own process (its RSS is measured)."""
    cmd = ["center", "serve", "--port", "0", "--threads", "1", "--max-kv-mb", str(BUDGET_MB)]
    proc = subprocess.Popen([sys.executable, "-m", "cfm_cli", *cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("listening"):
                break
        yield proc, line.split()[1]
    finally:
        proc.terminate()
        proc.wait(30)


SLACK_MB = 32  # a 256-position step's activations and messages, and the heaps


def test_rss_stays_under_the_kv_budget_plus_the_model(center_small_budget):
    """The patterns of issue 19, scaled to --max-kv-mb 32: six sessions filled to 768 positions (three blocks)
    and rewound to 16, then 64 sessions of 16 positions. Counting positions in use, as the center did, the
    rewound sessions would hold 6 x 30.6 MB and the small ones 64 x 10.2 MB."""
    proc, address = center_small_budget
    with grpc.insecure_channel(address) as ch:
        assert run(ch, [opened(), step(0, torch.randn(256, D)), CLOSE], metadata=None)[1] is None  # warm
        base = _rss_mb(proc.pid)
        bound = base + BUDGET_MB + SLACK_MB
        ids, refused = [], 0
        for _ in range(6):
            fill = [step(k * 256, torch.randn(256, D)) for k in range(3)]
            out, err = run(ch, [opened(), *fill, step(16, torch.randn(1, D))], metadata=None)
            ids.append(out[0].opened.session_id)
            if err is not None:
                assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache budget")
                refused += 1
        rewound = _rss_mb(proc.pid)
        assert refused < 6 and info(ch).limits.used_kv_bytes <= BUDGET_MB * 2**20
        for sid in ids:
            run(ch, [opened(resume_session_id=sid), CLOSE], metadata=None)
        outcomes = [run(ch, [opened(), step(0, torch.randn(16, D))], metadata=None)[1] for _ in range(64)]
        small = _rss_mb(proc.pid)
        served = sum(e is None for e in outcomes)
        assert served == BUDGET_MB * 2**20 // BLOCK  # three fit; the others are refused
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in outcomes if e is not None)
    print(f"RSS {base:.0f} MB; after rewinds {rewound:.0f}; after 64 small sessions {small:.0f}; bound {bound:.0f}")
    assert rewound < bound and small < bound
