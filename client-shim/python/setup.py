"""Builds trackd._trackd from the shim and codec sources of this repository.

The extension compiles ../src/shim.c and ../../proto/proto.c itself, so
installing the package needs a C compiler, the Python headers and
libmsgpack-dev, but no CMake build. Sources are passed as absolute paths:
setuptools derives object file names from source paths, and a relative
"../" path would put objects outside the build directory.
"""
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
SHIM = HERE.parent
PROTO = SHIM.parent / "proto"

setup(
    ext_modules=[
        Extension(
            "trackd._trackd",
            sources=[str(HERE / "trackd" / "_trackd.c"), str(SHIM / "src" / "shim.c"),
                     str(PROTO / "proto.c")],
            include_dirs=[str(SHIM / "include"), str(PROTO)],
            define_macros=[("_POSIX_C_SOURCE", "200809L"), ("TRACKD_VERSION", '"0.1.0"')],
            extra_compile_args=["-std=c11", "-fvisibility=hidden"],
            libraries=["msgpackc", "pthread"],
        )
    ],
)
