"""Center server: serves a span of shared layers over gRPC."""
