"""Build hook only: metadata lives in pyproject.toml.

`build_py` first compiles protos/**/*.proto with grpcio-tools into the package `center._proto`
(gitignored, never edited by hand), so `pip install .` and `pip install -e .` both ship fresh stubs.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def finalize_options(self):
        import sys

        sys.path.insert(0, str(ROOT))
        from center.protogen import generate

        for package in generate(ROOT):
            if package not in self.distribution.packages:
                self.distribution.packages.append(package)
        super().finalize_options()


setup(cmdclass={"build_py": BuildPyWithProtos})
