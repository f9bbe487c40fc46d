"""Build the Cython core `kvsvr._core`, the vote log's sync thread `kvsvr._syncer` and the
replica's compiled apply path `kvsvr._applier`;
everything else is declared in pyproject.toml.

The extension is required: there is no pure-Python fallback, so a failed build fails the install.
Set KVSVR_DEBUG_BUILD=1 for a build with assertions and line tracing (CI runs the suite on it).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("KVSVR_DEBUG_BUILD") == "1"
directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
    "linetrace": debug,
}
macros = ([("CYTHON_TRACE_NOGIL", "1"), ("KVSVR_DEBUG", "1")] if debug
          else [("NDEBUG", "1"), ("KVSVR_DEBUG", "0")])
extensions = [
    Extension(
        f"kvsvr.{name}",
        [f"kvsvr/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    )
    for name in ("_core", "_syncer", "_applier")
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
