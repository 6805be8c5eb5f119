"""The center: a gRPC server running a span of layers for many edge sessions (one process, or Ray Serve)."""
