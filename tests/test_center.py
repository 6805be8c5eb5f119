"""The center server over real gRPC on 127.0.0.1: bad input gets the right status, limits, health, reflection."""

import time

import grpc
import pytest
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from center.engine import Engine, Job
from center.interceptor import Tokens
from center.server import CenterLimits, CenterServer
from center.sessions import Session
from cfm_runtime.protocol import wire
from cfm_runtime.protocol.proto import pb, pb_grpc
from cfm_runtime.protocol.spans import default_span, parse_span

D = 576
F32 = pb.DTYPE_FLOAT32


@pytest.fixture(scope="module")
def server(model):
    s = CenterServer(model, span=(2, 28), tokens=Tokens(["alice-token", "bob-token"]),
                     limits=CenterLimits(max_sessions=64, idle_timeout_s=1.0)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def auth(token):
    return [("authorization", f"Bearer {token}")]


ALICE, BOB = auth("alice-token"), auth("bob-token")


def step(position, h, dtype=F32):
    return pb.SessionRequest(step=pb.Step(position=position, hidden=wire.encode(h, dtype)))


def opened(dtype=F32, **kw):
    return pb.SessionRequest(open=pb.OpenSession(dtype=dtype, **kw))


def run(channel, requests, metadata=ALICE):
    """Send requests on one Session stream; -> (responses, RpcError or None)."""
    stub, out = pb_grpc.CenterStub(channel), []
    try:
        for r in stub.Session(iter(requests), metadata=metadata, timeout=60):
            out.append(r)
    except grpc.RpcError as e:
        return out, e
    return out, None


def assert_status(error, code, words):
    assert error is not None, "expected the center to refuse"
    assert error.code() == code, (error.code(), error.details())
    assert words.lower() in error.details().lower(), error.details()


def assert_still_serving(channel):
    out, err = run(channel, [opened(), step(0, torch.randn(3, D)), pb.SessionRequest(close=pb.CloseSession())])
    assert err is None and [r.WhichOneof("kind") for r in out] == ["opened", "result", "closed"]
    assert list(out[1].result.hidden.shape) == [3, D]


def test_good_session_matches_local_span(channel, model):
    h = torch.randn(5, D)
    out, err = run(channel, [opened(), step(0, h[:4]), step(4, h[4:]), step(2, h[2:3])])  # last one rewinds
    assert err is None
    t = model.transformer
    cache = t.new_cache(2, 28)
    ref = t.forward_span(h[None], 2, 28, [cache])[0]
    got = torch.from_numpy(np.concatenate([wire.decode(r.result.hidden, hidden_size=D, dtype=F32, max_rows=8)
                                           for r in out[1:3]]))
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
    cache.truncate(2)
    rewound = torch.from_numpy(wire.decode(out[3].result.hidden, hidden_size=D, dtype=F32, max_rows=8))
    torch.testing.assert_close(rewound, t.forward_span(h[None, 2:3], 2, 28, [cache])[0], atol=1e-3, rtol=1e-4)


BAD_STEPS = {
    "wrong hidden size": (lambda: step(0, torch.randn(2, 64)), grpc.StatusCode.INVALID_ARGUMENT, "hidden size is 64"),
    "wrong dtype": (lambda: step(0, torch.randn(2, D), pb.DTYPE_FLOAT16), grpc.StatusCode.INVALID_ARGUMENT,
                    "session uses fp32"),
    "nan": (lambda: step(0, torch.full((2, D), float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "inf": (lambda: step(0, torch.tensor([[0.0] * (D - 1) + [float("inf")]])), grpc.StatusCode.INVALID_ARGUMENT,
            "infinity"),
    "huge n": (lambda: pb.SessionRequest(step=pb.Step(position=0, hidden=pb.Tensor(
        dtype=F32, shape=[10**9, D], data=bytes(16)))), grpc.StatusCode.INVALID_ARGUMENT, "max_step_positions"),
    "short data": (lambda: pb.SessionRequest(step=pb.Step(position=0, hidden=pb.Tensor(
        dtype=F32, shape=[2, D], data=bytes(16)))), grpc.StatusCode.INVALID_ARGUMENT, "needs 4608"),
    "gap in positions": (lambda: step(7, torch.randn(1, D)), grpc.StatusCode.FAILED_PRECONDITION, "holds 0 positions"),
    "empty request": (lambda: pb.SessionRequest(), grpc.StatusCode.INVALID_ARGUMENT, "set one of"),
}


@pytest.mark.parametrize("name", list(BAD_STEPS))
def test_bad_step_is_refused_and_server_keeps_serving(channel, name):
    make, code, words = BAD_STEPS[name]
    out, err = run(channel, [opened(), make()])
    assert [r.WhichOneof("kind") for r in out] == ["opened"]
    assert_status(err, code, words)
    assert_still_serving(channel)


def test_bad_open_and_order(channel):
    assert_status(run(channel, [step(0, torch.randn(1, D))])[1], grpc.StatusCode.FAILED_PRECONDITION, "before open")
    assert_status(run(channel, [opened(span_start=1, span_end=5)])[1], grpc.StatusCode.OUT_OF_RANGE, "served span 2:28")
    assert_status(run(channel, [opened(dtype=pb.DTYPE_UNSPECIFIED)])[1], grpc.StatusCode.INVALID_ARGUMENT, "dtype")
    assert_status(run(channel, [opened(), opened()])[1], grpc.StatusCode.FAILED_PRECONDITION, "once per stream")
    assert_still_serving(channel)


def test_session_ids_are_bound_to_the_caller(channel):
    out, err = run(channel, [opened(), step(0, torch.randn(2, D))], metadata=ALICE)
    assert err is None
    sid = out[0].opened.session_id
    assert len(sid) >= 22  # 128 random bits
    assert_status(run(channel, [opened(resume_session_id=sid)], metadata=BOB)[1],
                  grpc.StatusCode.PERMISSION_DENIED, "another caller")
    assert_status(run(channel, [opened(resume_session_id="no-such-session")])[1], grpc.StatusCode.NOT_FOUND, "no session")
    resumed, err = run(channel, [opened(resume_session_id=sid), pb.SessionRequest(close=pb.CloseSession())])
    assert err is None and resumed[0].opened.n_past == 2 and resumed[1].closed.n_past == 2


def test_missing_or_wrong_token(channel):
    stub = pb_grpc.CenterStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Info(pb.InfoRequest())
    assert_status(e.value, grpc.StatusCode.UNAUTHENTICATED, "requires a token")
    with pytest.raises(grpc.RpcError) as e:
        stub.Info(pb.InfoRequest(), metadata=auth("mallory"))
    assert_status(e.value, grpc.StatusCode.UNAUTHENTICATED, "not accepted")
    assert_status(run(channel, [opened()], metadata=auth("mallory"))[1], grpc.StatusCode.UNAUTHENTICATED, "not accepted")
    assert stub.Info(pb.InfoRequest(), metadata=ALICE).hidden_size == D


def test_garbage_bytes(channel):
    raw_unary = channel.unary_unary("/cfm.v1.Center/Info")  # no serializers: raw bytes on the wire
    with pytest.raises(grpc.RpcError) as e:
        raw_unary(b"\xff\xff\xff\xff", metadata=ALICE)
    assert_status(e.value, grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf")
    raw_stream = channel.stream_stream("/cfm.v1.Center/Session")
    with pytest.raises(grpc.RpcError) as e:
        list(raw_stream(iter([b"\x0f\xff\xfe garbage"]), metadata=ALICE))
    assert_status(e.value, grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf")
    assert_still_serving(channel)


def test_oversized_message_is_refused(channel):
    out, err = run(channel, [opened(), step(0, torch.randn(2000, D))])  # 4.6 MB > the 4 MB limit
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(channel)


def test_session_count_limit(model):
    s = CenterServer(model, span=(2, 28), limits=CenterLimits(max_sessions=3)).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            for _ in range(3):
                assert run(ch, [opened()], metadata=None)[1] is None  # detached sessions stay alive (resumable)
            assert_status(run(ch, [opened()], metadata=None)[1], grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "maximum of 3 sessions")
            closed, err = run(ch, [opened(resume_session_id=next(iter(s.servicer.table.sessions))),
                                   pb.SessionRequest(close=pb.CloseSession())], metadata=None)
            assert err is None and closed[-1].WhichOneof("kind") == "closed"
            assert run(ch, [opened()], metadata=None)[1] is None  # a closed session frees its slot
    finally:
        s.stop()


def test_idle_sessions_expire(channel):
    sid = run(channel, [opened(), step(0, torch.randn(2, D))])[0][0].opened.session_id
    time.sleep(1.5)  # idle timeout of the module's server: 1 s
    assert_status(run(channel, [opened(resume_session_id=sid)])[1], grpc.StatusCode.NOT_FOUND, "expired")
    assert_still_serving(channel)


def test_kv_budget(model):
    limits = CenterLimits(max_kv_mb=26 * 1536 * 100 / 2**20)  # room for 100 positions over 26 layers
    s = CenterServer(model, span=(2, 28), limits=limits).start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            out, err = run(ch, [opened(), step(0, torch.randn(60, D)), step(60, torch.randn(60, D))], metadata=None)
            assert len(out) == 2
            assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache budget")
            out, err = run(ch, [opened(max_positions=10), step(0, torch.randn(11, D))], metadata=None)
            assert_status(err, grpc.StatusCode.OUT_OF_RANGE, "granted 10")
    finally:
        s.stop()


def test_health_and_reflection_from_a_generic_client(channel):
    health = health_pb2_grpc.HealthStub(channel)  # grpcio-health-checking's stubs, not ours; no token needed
    for service in ("", "cfm.v1.Center"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "cfm.v1.Center" in services and "grpc.health.v1.Health" in services
    from google.protobuf.descriptor_pool import DescriptorPool

    svc = DescriptorPool(db).FindServiceByName("cfm.v1.Center")
    assert {m.name for m in svc.methods} == {"Info", "Session", "Ping"}
    assert svc.methods_by_name["Session"].client_streaming and svc.methods_by_name["Session"].server_streaming


def test_info(channel, model):
    info = pb_grpc.CenterStub(channel).Info(pb.InfoRequest(), metadata=ALICE)
    assert (info.span_start, info.span_end, info.n_layers, info.hidden_size) == (2, 28, 30, D)
    assert info.fingerprint == model.fingerprint(2, 28)
    assert set(info.dtypes) == {pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16}
    assert info.limits.max_step_positions * D * 4 < info.limits.max_message_bytes
    assert default_span(30) == (2, 28)


def test_engine_batches_decode_steps_with_different_offsets(model):
    """Three sessions at different positions, one batched forward == three separate forwards."""
    t = model.transformer
    engine = Engine(model)
    try:
        sessions, refs, jobs = [], [], []
        for i, n in enumerate((3, 7, 12)):
            prefix, new = torch.randn(n, D), torch.randn(1, D)
            c1, c2 = t.new_cache(2, 28), t.new_cache(2, 28)
            t.forward_span(prefix[None], 2, 28, [c1])
            t.forward_span(prefix[None], 2, 28, [c2])
            refs.append(t.forward_span(new[None], 2, 28, [c2])[0])
            jobs.append(Job(Session(str(i), "", 2, 28, F32, 64, c1), new.numpy()))
        engine._run(jobs)
        for job, ref in zip(jobs, refs):
            out, ms, batch = job.future.result(timeout=60)
            assert batch == 3
            torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-3, rtol=1e-4)
        assert engine.batches == 1 and engine.batched_steps == 3
    finally:
        engine.stop()


def test_wire_fp16_scales_massive_activations():
    h = torch.randn(4, D)
    h[1, 7] = 200_000.0  # beyond float16's range: the row gets a power-of-two scale
    t = wire.encode(h, pb.DTYPE_FLOAT16)
    assert len(t.data) == 4 * D * 2 and t.row_scales[1] > 1 and t.row_scales[0] == 1
    back = torch.from_numpy(wire.decode(t, hidden_size=D, dtype=pb.DTYPE_FLOAT16, max_rows=4))
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back, h, rtol=1e-3, atol=2e-3)
    exact = wire.decode(wire.encode(h, F32), hidden_size=D, dtype=F32, max_rows=4)
    assert torch.equal(torch.from_numpy(exact), h)


def test_tokens_from_file_and_env(tmp_path, monkeypatch):
    from cfm_runtime.errors import CfmError

    f = tmp_path / "tokens.txt"
    f.write_text("# edge devices\nalpha\n\nbeta\n")
    monkeypatch.setenv("CFM_CENTER_TOKENS", "gamma, delta")
    tokens = Tokens.load(str(f))
    ids = {tokens.caller([("authorization", f"Bearer {t}")]) for t in ("alpha", "beta", "gamma", "delta")}
    assert len(ids) == 4  # each token is its own caller
    monkeypatch.delenv("CFM_CENTER_TOKENS")
    assert Tokens.load(None) is None  # no tokens configured: no auth
    with pytest.raises(CfmError, match="does not exist"):
        Tokens.load(str(tmp_path / "missing.txt"))


def test_span_option():
    from cfm_runtime.errors import CfmError

    assert parse_span(None, 30) == (2, 28) and parse_span("4:20", 30) == (4, 20)
    for bad in ("4-20", "20:4", "0:31"):
        with pytest.raises(CfmError, match="--layers"):
            parse_span(bad, 30)
