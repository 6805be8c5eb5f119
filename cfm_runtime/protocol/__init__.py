"""The center-edge protocol pieces both sides use: generated gRPC stubs (`proto`), hidden states on the wire
(`wire`), the errors a center raises and their status codes (`errors`), and the default span (`spans`).
The `.proto` files in `protos/` are the source of truth; stubs are generated into `_proto/` at install."""
