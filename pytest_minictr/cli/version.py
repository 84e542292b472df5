"""`minictr --version`: what a bug report needs in one line: our version, which setup path
runs containers (the native core or the Python fallback), the cgroup backend, the kernel."""

from __future__ import annotations

import os


def setup_path_name() -> str:
    """'native' (the native core, minictr-init) or 'python' (the fallback): see
    pytest_minictr.native, which the doctor and the report header ask too."""
    from pytest_minictr import native
    return native.setup_path().path.value


def version_text() -> str:
    from pytest_minictr.host import cgroups  # not at import: --version is the only user
    backend = cgroups.detect_or_null(prepare=False)
    return (f"minictr {_package_version()} (setup: {setup_path_name()}; cgroups: "
            f"{getattr(backend, 'name', 'none')}; kernel: {os.uname().release})")


def _package_version() -> str:
    from importlib import metadata  # slow to import: not on the path of every other command
    try:
        return metadata.version("pytest-minictr")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
