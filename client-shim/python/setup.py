"""Builds trackd._trackd from the shim and codec sources of this repository.

The extension compiles ../src/shim.c and ../../proto/proto.c itself, so
installing the package needs a C compiler, the Python headers and
libmsgpack-dev, but no CMake build. It is an in-tree build: pip must be
given this directory (an sdist would not contain the sources above it).
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
os.chdir(HERE)  # setuptools wants source paths relative to setup.py


class BuildExt(build_ext):
    """Keeps object files of ../ sources inside the build directory.

    setuptools names an object after its source path, so ../../proto/proto.c
    would otherwise compile to a proto/ directory beside this file.
    """

    def build_extensions(self):
        names = self.compiler.object_filenames

        def object_filenames(sources, strip_dir=0, output_dir=""):
            inside = [s.replace("../", "_up_/") for s in sources]
            return names(inside, strip_dir=strip_dir, output_dir=output_dir)

        self.compiler.object_filenames = object_filenames
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "trackd._trackd",
            sources=["trackd/_trackd.c", "../src/shim.c", "../../proto/proto.c"],
            include_dirs=["../include", "../../proto"],
            depends=["../include/trackd.h", "../../proto/trackd_proto.h", "exports.map"],
            define_macros=[("_POSIX_C_SOURCE", "200809L"), ("TRACKD_VERSION", '"0.1.0"')],
            extra_compile_args=["-std=c11", "-fvisibility=hidden"],
            libraries=["msgpackc", "pthread"],
            # trackd.h marks the shim's API visible; this extension exports only its init.
            extra_link_args=["-Wl,--version-script=exports.map"],
        )
    ],
)
