"""CPU kernels for quantized weights, a leaf package (it imports nothing else of cfm_runtime).

`packing` (block quantization into onnxruntime's MatMulNBits layout), `graph` (ONNX graph builder and
session options), `quant` (`QuantizedLinear`, `QuantizedHead`), `weights` (what a fused kernel reads),
`fused` (a span of layers as one onnxruntime graph), `native` (the compiled single-token decode step).
"""
