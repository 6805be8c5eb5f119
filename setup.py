"""Build hook only: metadata lives in pyproject.toml.

`build_py` first compiles protos/**/*.proto with grpcio-tools into the package
`cfm_runtime.protocol._proto` (gitignored, never edited by hand), so `pip install .` and
`pip install -e .` both ship fresh stubs, and builds the native kernel for this machine
(`cfm_runtime/kernels/_cfm_kernel_*.so`, gitignored). Both builders are loaded by their file path:
importing the package would import the runtime's own dependencies, which the build environment lacks.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load(name: str, relative: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def finalize_options(self):
        for package in _load("cfm_protogen", "cfm_runtime/protocol/protogen.py").generate(ROOT):
            if package not in self.distribution.packages:
                self.distribution.packages.append(package)
        kernels = _load("cfm_kernel_build", "cfm_runtime/kernels/build.py")
        try:  # the native kernel, for this machine (-march=native); without a compiler it is built on first use
            print(f"built {kernels.compile_kernel(ROOT / 'cfm_runtime' / 'kernels').name}")
        except RuntimeError as e:
            print(f"warning: the native kernel was not built ({e}); cfm will try again on first use")
        super().finalize_options()


setup(cmdclass={"build_py": BuildPyWithProtos})
