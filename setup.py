"""Build hook only: metadata lives in pyproject.toml.

`build_py` first compiles protos/**/*.proto with grpcio-tools into the package
`cfm_runtime.protocol._proto` (gitignored, never edited by hand), so `pip install .` and
`pip install -e .` both ship fresh stubs. The generator is loaded by its file path: importing
the package would import the runtime's own dependencies, which the build environment lacks.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protogen():
    spec = importlib.util.spec_from_file_location("cfm_protogen", ROOT / "cfm_runtime" / "protocol" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def finalize_options(self):
        for package in _protogen().generate(ROOT):
            if package not in self.distribution.packages:
                self.distribution.packages.append(package)
        super().finalize_options()


setup(cmdclass={"build_py": BuildPyWithProtos})
