"""CPU kernels for fast decode: onnxruntime MatMulNBits packing, a fused decode graph, a sparse LM head."""
