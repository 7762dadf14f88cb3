"""Build: the vggfast package, its Triton kernels (kernels/ installed as vggfast.kernels) and the
C++ scheduler (csrc/ -> vggfast._scheduler, plain C++17 through pybind11). Never probes for a GPU.
Metadata lives in pyproject.toml."""
import glob

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as exc:  # build isolation installs it; without isolation it must be present
    raise SystemExit("building vggfast needs pybind11: pip install pybind11") from exc

sources = sorted(glob.glob("csrc/*.cpp"))
# A pybind11 module shares its "internals" (type registry, GIL bookkeeping) with every other module
# whose internals ID matches, e.g. torch's own extension built with another pybind11 release. Our
# module exchanges no objects with them, so a compiler-type tag of its own gives it private
# internals and no layout mismatch across pybind11 versions can reach it.
ext_modules = [Pybind11Extension("vggfast._scheduler", sources, cxx_std=17,
                                 define_macros=[("PYBIND11_COMPILER_TYPE", '"_vggfast"')])
               ] if sources else []

setup(
    packages=["vggfast", "vggfast.kernels"],
    package_dir={"vggfast": "vggfast", "vggfast.kernels": "kernels"},
    package_data={"vggfast": ["data/*.json", "data/*.jpg", "data/*.png", "data/*.safetensors",
                              "data/*.md", "data/*.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
