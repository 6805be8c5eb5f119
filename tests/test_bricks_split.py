"""Bricks in split mode against a real center on 127.0.0.1: every byte sent to the center is recorded
by a TCP proxy and holds no text, token id, brick weight or gradient; training runs the center forward only."""

import json
import socket
import struct
import threading

import pytest
import torch

from center.server import CenterServer
from cfm_cli import main as cli
from cfm_runtime import CenterOptions
from cfm_runtime.bricks import Brick, BrickStore, base_info
from cfm_runtime.bricks.lora import LoraPair
from cfm_runtime.bricks.train import load_examples, local_frozen
from cfm_runtime.split.frozen import center_frozen

SECRET = "My dog Biscuit lives with me in Quillbury and my PIN is 4711."


class Recorder:
    """A TCP proxy on 127.0.0.1:0 that forwards to `target` and keeps every byte the edge sends."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> bytes:
        with self.lock:
            out, self.sent = bytes(self.sent), bytearray()
        return out


@pytest.fixture(scope="module")
def center(model):
    s = CenterServer(model, span=(2, 28)).start()
    yield s
    s.stop()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CFM_HOME", str(tmp_path / "home"))
    return BrickStore()


def toy_brick(model, name="mine", layers=range(22, 30)):
    g = torch.Generator().manual_seed(5)
    pairs = {}
    for i in layers:
        for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            lin = model.transformer.get_submodule(f"layers.{i}.{kind}")
            pairs[f"layers.{i}.{kind}"] = LoraPair(torch.randn(4, lin.in_features, generator=g) * 0.05,
                                                   torch.randn(lin.out_features, 4, generator=g) * 0.05, 2.0)
    return Brick(name, pairs, base_info(model))


def varints(ids):
    out = bytearray()
    for v in ids:
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def assert_private(wire: bytes, model, ids, brick):
    assert SECRET.encode() not in wire and "Biscuit".encode() not in wire and "Biscuit".encode("utf-16-le") not in wire
    run = ids[2:10]  # any 8 consecutive prompt ids, in every plausible encoding
    for enc in (struct.pack(f"<{len(run)}i", *run), struct.pack(f"<{len(run)}q", *run), varints(run)):
        assert enc not in wire
    for name, p in brick.pairs.items():
        for t in (p.a, p.b.T):
            row = t[0, :4].contiguous()
            for enc in (row.numpy().tobytes(), row.half().numpy().tobytes(), row.bfloat16().view(torch.int16).numpy().tobytes()):
                assert enc not in wire, f"bytes of {name} went to the center"


def test_split_generation_with_a_brick_sends_only_hidden_states(model, center, home, capsys):
    proxy = Recorder(center.address)
    brick = toy_brick(model)
    home.save(brick)
    # the brick's layers 22-29 may not run on the center: a pinned split over them is refused
    code = cli.main(["generate", "--center", proxy.address, "--split", "2:28", "--prompt", SECRET, "--bricks", "mine",
                     "--max-tokens", "2"])
    assert code == 2 and "bricks never leave this device" in capsys.readouterr().err
    proxy.take()
    code = cli.main(["generate", "--center", proxy.address, "--split", "center", "--chat", "--prompt", SECRET,
                     "--bricks", "mine", "--temperature", "0", "--max-tokens", "6", "--json", "--weights", "fp32"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["split"]["layers"]["center"] == "2:22" and result["split"]["positions_center"] > 0
    wire = proxy.take()
    ids = model.encode_prompt([{"role": "user", "content": SECRET}])
    assert_private(wire, model, ids, brick)
    # positive control: the recording holds the hidden states entering layer 2 (fp32 on the wire)
    with torch.inference_mode():
        h = model.transformer.forward_span(model.transformer.embed(torch.tensor([ids])), 0, 2,
                                           [model.transformer.new_cache(0, 2, len(ids))])[0]
    assert h[5].numpy().tobytes()[:64] in wire
    hidden_bytes = (len(ids) + 5) * model.config.d_model * 4
    assert len(wire) < 1.1 * hidden_bytes + 20_000  # nothing but hidden states (plus framing)


def test_split_training_runs_the_center_forward_only(model, center, home, tmp_path, capsys):
    data = tmp_path / "me.txt"
    data.write_text(SECRET + "\n\nBiscuit is a golden retriever. Quillbury is my hometown.\n")
    proxy = Recorder(center.address)
    code = cli.main(["brick", "train", "--data", str(data), "--name", "split-me", "--center", proxy.address,
                     "--split", "2:24", "--layers", "4", "--steps", "3", "--rank", "2", "--anchor-weight", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "[split training: layers 2:24 on the center" in err
    wire = proxy.take()
    brick = home.load("split-me")
    examples = load_examples(data, model.tokenizer)
    assert_private(wire, model, examples[0].ids, brick)
    positions = sum(len(e.ids) for e in examples)
    assert len(wire) < 1.1 * positions * model.config.d_model * 4 + 20_000  # one forward per example, no gradients
    # the trainer's frozen part through the center gives the hidden states the local layers give
    frozen, close = center_frozen(model, CenterOptions(proxy.address, (2, 24)), 26)
    try:
        for e in examples:
            torch.testing.assert_close(frozen(e.ids), local_frozen(model.transformer, 26)(e.ids), rtol=1e-4, atol=1e-3)
    finally:
        close()
    assert SECRET.encode() not in proxy.take()
