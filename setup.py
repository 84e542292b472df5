"""The optional native core (issue #17): `minictr-init`, one C program (libc only) that the
launcher runs for its containers, so that no Python runs inside one.

It is declared as an optional extension so that a platform wheel carries it and `pip install`
never fails without a compiler: setuptools then warns, and the package falls back to its pure
Python path (see pytest_minictr/native.py). What is built is a program, not a module: the
launcher runs it (from a sealed memfd copy), it is never imported.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_SOURCES = [f"pytest_minictr/container/native/{name}.c"
                  for name in ("minictr_init", "executor", "steps", "mounts", "command")]
NATIVE_PROGRAM = "minictr-init"
# Hardened as distributions build C (isolate's Makefile does the same): the program is PID 1 of
# containers that run untrusted code. _FORTIFY_SOURCE needs -O; level 3 is taken as 2 by a C
# library older than glibc 2.34, and -U first replaces a compiler's own default without a
# redefinition warning. Warnings are on and never errors here (users' compilers vary, and a new
# warning must not cost them the core); ci/native-checks builds with -Werror.
COMPILE_FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fstack-protector-strong",
                 "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=3"]


class BuildNativeProgram(build_ext):
    """Links the extension's sources as the `minictr-init` program, where the extension's
    module would go (in the wheel, or in the source tree for an editable install)."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")[:-1], NATIVE_PROGRAM)

    def build_extension(self, ext: Extension) -> None:
        objects = self.compiler.compile(ext.sources, output_dir=self.build_temp,
                                        extra_postargs=COMPILE_FLAGS)
        # -s: a tenth of the size, and nothing a user debugs
        self.compiler.link_executable(objects, self.get_ext_fullpath(ext.name),
                                      extra_postargs=["-s"])


COMMANDS = {"build_ext": BuildNativeProgram}
try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1: the `wheel` package's
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

if bdist_wheel is not None:
    class PlatformWheel(bdist_wheel):
        """The program links libc, not Python: one wheel per platform serves every Python."""

        def get_tag(self) -> tuple[str, str, str]:
            return "py3", "none", super().get_tag()[2]

    COMMANDS["bdist_wheel"] = PlatformWheel


setup(ext_modules=[Extension("pytest_minictr.container.native.minictr_init", NATIVE_SOURCES,
                             depends=["pytest_minictr/container/native/minictr_init.h"],
                             optional=True)],
      cmdclass=COMMANDS)
