"""The center on Ray Serve: a local Ray (2 CPUs), 2 replicas, edges through Serve's real gRPC proxy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from center.ray_serve import deployment_options, kv_bytes_per_position, parse_args
from center.server import CenterServer
from cfm_runtime.errors import CfmError
from cfm_runtime import CenterOptions, RunOptions, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a color.", "Name a fruit.", "What is 2+2?",
             "Say hello.", "Name a tree.", "Name an animal.", "What day comes after Monday?"]
GREEDY = dict(max_tokens=10, temperature=0)
SPAN = "2:28"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sessions(model, address: str, on_token=None) -> list[tuple[list[int], dict]]:
    """One edge session per question, all at once; returns (greedy tokens, split report) per session."""
    prompts = [model.encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    gens = [model.new_generator(RunOptions(center=CenterOptions(address, (2, 28), timeout=60))) for _ in prompts]
    out: list = [None] * len(prompts)
    errors: list = []

    def run(i):
        try:
            toks = []
            for chunk in gens[i].stream(prompts[i], SamplingParams(**GREEDY)):
                toks.append(chunk.token)
                if on_token:
                    on_token(i, len(toks))
            out[i] = (toks, chunk.stats.extra["split"])  # the answer's telemetry comes with its last chunk
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)
        finally:
            gens[i].runner.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return out


@pytest.fixture(scope="module")
def reference(model):
    """The single-process center's greedy answers to the same 8 concurrent sessions."""
    server = CenterServer(model, span=(2, 28)).start()
    try:
        return [toks for toks, _ in run_sessions(model, server.address)]
    finally:
        server.stop()


@contextmanager
def local_ray(tmp: Path):
    """A local Ray of 2 CPUs whose head is started by `ray start` in a process of its own. Started by `ray.init`
    from this process late in the suite (which by then holds gRPC threads of earlier tests' servers and
    clients: "skipping fork() handlers"), the head's raylet never registered and `ray.init` timed out."""
    import ray

    port = _free_port()
    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "disabled")  # a test cluster: neither the head nor this driver uses a token
    log = open(tmp / "ray_head.log", "w")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (tmp / "ray_head.log").read_text()[-4000:]
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        env.undo()


@pytest.fixture(scope="module")
def serve_center(tmp_path_factory):
    """The center app (2 replicas of 1 thread) behind Serve's gRPC proxy, on a local Ray of 2 CPUs."""
    from center.ray_serve import deploy, shutdown

    with local_ray(tmp_path_factory.mktemp("ray")):
        try:
            port = _free_port()
            # fp32 replicas: their answers are compared token for token with a center on the fp32 session model
            deploy({"replicas": 2, "layers": SPAN, "threads": 1, "max_sessions": 16, "weights": "fp32"},
                   grpc_port=port)
            yield f"127.0.0.1:{port}"
        finally:
            shutdown()


def replica_reports(min_positions: int = 0, timeout: float = 20.0) -> list[dict]:
    """Live replica reports, waiting (reports come every second) until they count `min_positions`."""
    from center.ray_serve import status

    deadline = time.monotonic() + timeout
    while True:
        reps = status()["replicas"]
        if sum(r["positions"] for r in reps) >= min_positions or time.monotonic() > deadline:
            return reps
        time.sleep(0.5)


def test_eight_sessions_through_the_serve_proxy_equal_the_single_process_center(model, serve_center, reference):
    from center.ray_serve import status

    results = run_sessions(model, serve_center)
    assert [toks for toks, _ in results] == reference
    for _, r in results:  # each stream stayed on one replica: a step anywhere else would have no session
        assert r["positions_local"] == 0 and r["fallbacks"] == [] and r["replays"] == 0
    st = status()
    assert st["status"] == "RUNNING" and st["replica_states"] == {"RUNNING": 2}
    sent = sum(r["positions_center"] for _, r in results)
    reps = replica_reports(min_positions=sent)  # the replicas' own counters agree with the edges'
    assert len(reps) == 2 and sum(r["positions"] for r in reps) == sent
    assert all(r["steps"] > 0 and r["batch_mean"] >= 1 and r["max_kv_bytes"] > 0 for r in reps)


def test_errors_keep_their_status_through_the_proxy(model, serve_center):
    import torch

    from cfm_runtime.protocol.proto import pb
    from cfm_runtime.split.client import CenterClient, CenterFailure

    client = CenterClient(serve_center, timeout=30)
    assert client.info().fingerprint == model.fingerprint(2, 28)
    stream = client.session(pb.OpenSession(span_start=2, span_end=28, dtype=pb.DTYPE_FLOAT32))
    with pytest.raises(CenterFailure) as e:
        stream.step(0, torch.zeros(1, 100))  # wrong hidden size
    assert e.value.code == "INVALID_ARGUMENT" and "hidden size" in e.value.message
    with pytest.raises(CenterFailure) as e:
        client.session(pb.OpenSession(span_start=1, span_end=28, dtype=pb.DTYPE_FLOAT32))
    assert e.value.code == "OUT_OF_RANGE"
    client.close()


def test_a_replica_killed_mid_answer_costs_no_answer(model, serve_center, reference):
    victim = max(replica_reports(), key=lambda r: r["attached"] + r["steps"])  # both hold sessions below
    cmdline = Path(f"/proc/{victim['pid']}/cmdline").read_bytes()
    assert b"ServeReplica" in cmdline, cmdline  # never kill anything but a replica
    progress = [0] * len(QUESTIONS)
    killed = threading.Event()

    def on_token(i, n):
        progress[i] = n
        if sum(p >= 3 for p in progress) >= 6 and not killed.is_set():  # (nearly) every session is mid-answer
            killed.set()
            os.kill(victim["pid"], signal.SIGKILL)

    results = run_sessions(model, serve_center, on_token)
    assert killed.is_set()
    assert [toks for toks, _ in results] == reference
    hit = [r for _, r in results if r["fallbacks"]]
    assert hit, "no session was on the killed replica"
    for r in hit:  # each reopened on the other replica (or ran locally) after replaying its kept states
        assert r["replays"] >= 1 and r["replayed_positions"] > 0
    assert sum(r["positions_center"] for _, r in results) > 0


def test_app_args_and_the_serve_config_file():
    kv = kv_bytes_per_position(parse_args({"layers": SPAN})[0])
    assert kv == 2 * 3 * 64 * 4 * 26  # fp32 K and V, 3 KV heads of 64, 26 layers
    replica, scaling = parse_args({"autoscale": "1:4", "max_kv_mb": 100, "session_positions": 1000})
    opts = deployment_options(replica, scaling, kv)
    assert opts["max_ongoing_requests"] == 100 * 2**20 // (kv * 1000) == 2  # the KV budget bounds streams
    assert opts["autoscaling_config"]["min_replicas"] == 1 and opts["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in opts
    assert deployment_options(*parse_args({"replicas": 3}), kv)["num_replicas"] == 3
    for bad, match in [({"autoscale": "4:1"}, "MIN <= MAX"), ({"autoscale": "x"}, "MIN:MAX"),
                       ({"replicas": 0}, "replicas"), ({"treads": 2}, "unknown center app args")]:
        with pytest.raises(CfmError, match=match):
            parse_args(bad)
    config = yaml.safe_load((Path(__file__).parent.parent / "center" / "serve_config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "center.ray_serve:build_app"
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "cfm_runtime.protocol._proto.cfm.v1.center_pb2_grpc.add_CenterServicer_to_server"]
    parse_args(app["args"])


def test_cli_errors_before_ray_starts(capsys):
    from cfm_cli.main import main

    assert main(["center", "deploy", "--autoscale", "5:2"]) == 2
    assert "MIN <= MAX" in capsys.readouterr().err
    assert main(["center", "deploy", "--replicas", "1"]) == 2  # no tokens: Serve's proxy listens everywhere
    err = capsys.readouterr().err
    assert "--token-file" in err and "--insecure" in err
