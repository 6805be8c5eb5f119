"""The generated protocol modules: `pb` (messages) and `pb_grpc` (stubs and servicer base).

setup.py generates them at install time; if they are missing (a source checkout that was never
built) or were generated for another grpc/protobuf version, they are regenerated here once.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .protogen import PACKAGE, generate


def _load():
    from google.protobuf.runtime_version import VersionError

    try:
        from ._proto.cfm.v1 import center_pb2, center_pb2_grpc
        return center_pb2, center_pb2_grpc
    except (ImportError, RuntimeError, VersionError):  # missing, or generated for another grpc/protobuf
        generate(Path(__file__).resolve().parents[2])
        importlib.invalidate_caches()
        return (importlib.import_module(f"{PACKAGE}.cfm.v1.center_pb2"),
                importlib.import_module(f"{PACKAGE}.cfm.v1.center_pb2_grpc"))


pb, pb_grpc = _load()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Center"].full_name  # "cfm.v1.Center"
