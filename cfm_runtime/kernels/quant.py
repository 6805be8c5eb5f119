"""Weight-only quantized linears (onnxruntime MatMulNBits).

A `QuantizedLinear` is a drop-in for `nn.Linear` (forward(x[..., in]) -> [..., out]), so spans, LoRA
bricks that call `base(x)` and replaced FFN modules keep working; `cfm_runtime.backends.quantize_model`
installs them in a transformer, with an 8-bit LM head.

Formats (bytes per weight, block 32):
- "int4": scale * code + min per block, i.e. the Q4_1 grid; re-packing a Q4_1 GGUF is exact (0.77 B).
- "int8": scale * (code - zero point), 8 bits (1.16 B); from Q4_1 this is near-exact (+0.3% perplexity).
- "fp32": the plain torch modules (4 B).
Activations are int8-quantized per block inside the kernel (MatMulNBits accuracy level 4, like
llama.cpp's Q8 activations), the down projections included although their inputs carry this model
family's massive activations (up to ~3,000 in layer 11): with centred zero points (see `packing`)
that costs +0.0% perplexity against fp32 on 3,091 tokens (fp32 activations at the down projections
instead: +0.1%, and their kernel is ~3x slower; 8-bit weights have no fast fp32-activation kernel).
The head (tied embedding, Q8_0 in the embedded model) is packed as symmetric 8-bit: exact for Q8_0.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .graph import ACCURACY_LEVEL, FLOAT, GraphBuilder
from .packing import Packed, pack, unpack

WEIGHT_FORMATS = ("fp32", "int8", "int4")
HEAD_FORMATS = ("fp32", "int8")
_BODY = {"int4": (4, "mid"), "int8": (8, "asym")}  # weight format -> (bits, packing scheme)


class _Dequantized(torch.autograd.Function):
    """Forward through the onnxruntime kernel; backward through the dequantized weight (for bricks that train)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module.run(x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(), None


class QuantizedLinear(nn.Module):
    """y = x W^T (+ bias) with W block-quantized; the kernel is onnxruntime's MatMulNBits."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, threads: int | None = None,
                 accuracy: int = ACCURACY_LEVEL):
        super().__init__()
        self.packed = packed
        self.accuracy = accuracy  # MatMulNBits accuracy_level: 4 = int8 activations, 0 = fp32 activations
        self.in_features, self.out_features = packed.k, packed.n
        self.threads = threads or torch.get_num_threads()
        # buffers share memory with the packed numpy arrays: state_dict / fingerprints see the real weights
        self.register_buffer("codes", torch.from_numpy(packed.codes), persistent=True)
        self.register_buffer("scales", torch.from_numpy(packed.scales), persistent=True)
        if packed.zero_points is not None:
            self.register_buffer("zero_points", torch.from_numpy(packed.zero_points), persistent=True)
        if packed.mins is not None:
            self.register_buffer("mins", torch.from_numpy(packed.mins), persistent=True)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._session = None
        self._lock = threading.Lock()

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str = "int4", threads: int | None = None,
                    accuracy: int = ACCURACY_LEVEL) -> "QuantizedLinear":
        bits, scheme = _BODY[weights]
        return cls(pack(linear.weight.data, bits, 32, scheme), linear.bias, threads, accuracy)

    @property
    def weight_format(self) -> str:
        return f"int{self.packed.bits}"

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] this module multiplies by."""
        return unpack(self.packed)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (a copy; for code that inspects shapes or folds adapters)."""
        return self.dequantize()

    def _get_session(self):
        with self._lock:
            if self._session is None:
                g = GraphBuilder()
                x = g.input("x", FLOAT, ["m", self.in_features])
                g.output(g.linear(x, self.packed, accuracy=self.accuracy), "y", FLOAT, ["m", self.out_features])
                self._session = g.session(self.threads)
            return self._session

    def run(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.detach().reshape(-1, self.in_features).float().contiguous().numpy()
        y = torch.from_numpy(self._get_session().run(None, {"x": x2})[0]).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _Dequantized.apply(x, self)
        return self.run(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight_format}"


class QuantizedHead(QuantizedLinear):
    """The LM head [vocab, d_model] as symmetric 8-bit blocks (exact for a Q8_0 embedding)."""

    @classmethod
    def from_weight(cls, w: torch.Tensor, threads: int | None = None) -> "QuantizedHead":
        return cls(pack(w, 8, 32, "sym"), None, threads)
