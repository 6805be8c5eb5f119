"""Compile the .proto files under protos/ into the package `cfm_runtime.protocol._proto` with grpcio-tools.

Run by setup.py at build time (loaded by its file path: it imports nothing of the project), and as a
fallback by `proto` when the stubs are missing. The include path maps the virtual directory
`cfm_runtime/protocol/_proto` onto `protos/`, so the generated modules import each other as
`cfm_runtime.protocol._proto.cfm.v1...` without any rewriting.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "cfm_runtime.protocol._proto"


def generate(root: Path) -> list[str]:
    """Generate stubs for every .proto under root/protos; returns the packages created."""
    from grpc_tools import protoc
    import grpc_tools

    protos = root / "protos"
    virtual = Path(*PACKAGE.split("."))
    files = sorted(p.relative_to(protos) for p in protos.rglob("*.proto"))
    if not files:
        raise RuntimeError(f"no .proto files under {protos}")
    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    args = ["grpc_tools.protoc", f"-I{virtual}={protos}", f"-I{include}",
            f"--python_out={root}", f"--grpc_python_out={root}", f"--pyi_out={root}"]
    if protoc.main(args + [str(virtual / f) for f in files]) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {files}")
    packages = {".".join(parent.parts) for f in files for parent in (virtual / f).parents
                if len(parent.parts) >= len(virtual.parts)}
    for package in packages:
        init = root.joinpath(*package.split(".")) / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/ by cfm_runtime/protocol/protogen.py; do not edit."""\n')
    return sorted(packages)
