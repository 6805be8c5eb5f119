"""A small ONNX graph builder and the onnxruntime session options used by the kernels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from .packing import Packed

MS = "com.microsoft"
# MatMulNBits accuracy level 4: activations quantized to int8 per block, int8 dot products (VNNI),
# as llama.cpp does with Q8 activations. Level 0 keeps fp32 activations and runs ~2x slower.
ACCURACY_LEVEL = 4


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs; names are made unique by a counter."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, value: str, name: str, dtype, shape) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def linear(self, x: str, p: Packed, accuracy: int | None = None) -> str:
        """x [m, k] -> [m, n] (2-D) through MatMulNBits (+ the per-block offset term of the "mid"/"min" schemes)."""
        zp = [] if p.zero_points is None else [self.const(p.zero_points, "zp")]  # None: the kernel's implicit mid-code
        y, = self.op("MatMulNBits", [x, self.const(p.codes, "w"), self.const(p.scales, "s"), *zp],
                     domain=MS, K=p.k, N=p.n, bits=p.bits, block_size=p.block,
                     accuracy_level=ACCURACY_LEVEL if accuracy is None else accuracy)
        if p.mins is None:
            return y
        # sum_b m[b, n] * sum_{i in block b} x_i: the exact Q4_1 offset term, [m, k/block] @ [k/block, n] + y in
        # one Gemm (its C input; a MatMul and an Add are two launches). The block sums are a Reshape (free:
        # it aliases) and a ReduceSum: ~2.5x cheaper than a MatMul with a 0/1 matrix (measured in a chain of 120).
        blocks, = self.op("Reshape", [x, self.const(np.array([-1, p.k // p.block, p.block], np.int64), "shape")])
        sums, = self.op("ReduceSum", [blocks, self.const(np.array([-1], np.int64), "axes")], keepdims=0)
        return self.op("Gemm", [sums, self.const(p.mins, "mins"), y])[0]

    def session(self, threads: int, spin: bool = False) -> ort.InferenceSession:
        graph = helper.make_graph(self.nodes, "cfm", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
        model.ir_version = 8
        return ort.InferenceSession(model.SerializeToString(), session_options(threads, spin),
                                    providers=["CPUExecutionProvider"])


def session_options(threads: int, spin: bool = False) -> ort.SessionOptions:
    """spin: worker threads busy-wait between ops (as llama.cpp's do) instead of sleeping. The fused decode
    graph spins (`FusedRunner`, with torch on one thread meanwhile: `LocalRunner.torch_threads`): int4 decode
    0.98x llama.cpp against 0.87x sleeping (benchmarks/bench_decode.py). Spinning lost (0.56x) only while
    torch's own OpenMP workers spun on the same two cores. Other sessions (one linear each) sleep."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Otherwise no spinning: spinning workers keep burning the cores between runs (torch, other sessions).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


FLOAT = TensorProto.FLOAT
INT32 = TensorProto.INT32


def bind_tensor(binding: ort.IOBinding, name: str, t: torch.Tensor, output: bool = False) -> None:
    """Bind a contiguous float32/int32 CPU torch tensor by pointer (no copy); ORT reads/writes its memory."""
    assert t.is_contiguous()
    dtype = {torch.float32: np.float32, torch.int32: np.int32}[t.dtype]
    fn = binding.bind_output if output else binding.bind_input
    fn(name, "cpu", 0, dtype, list(t.shape), t.data_ptr())
