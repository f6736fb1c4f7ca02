"""C kernels of this package, built once per machine with the system's C compiler and loaded by ctypes.

`library(name)` compiles `fxquant/runtime/kernels/<name>.c` for this CPU (-march=native, OpenMP,
no FMA contraction: the float steps must round as torch's) into the cache
(`$FXQUANT_CACHE`, default ~/.cache/fxquant, under kernels/), keyed by the source, the flags, the
compiler and the CPU's flags, so a changed source or another machine builds again. The build is
atomic (several test workers may race). Where there is no compiler or the build fails,
`library` raises `NativeUnavailable` with the reason, which the kernel table reports as its
refusal: the layer runs on the next kernel. `FXQUANT_CC` picks the compiler (default: cc).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-fPIC",
         "-shared")


class NativeUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded here (the message says why)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("FXQUANT_CACHE") or Path.home() / ".cache" / "fxquant") / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> tuple[str, str]:
    """(the compiler's path, its version line), or NativeUnavailable."""
    name = os.environ.get("FXQUANT_CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise NativeUnavailable(f"no C compiler {name!r} on PATH (install gcc, or set FXQUANT_CC)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"the C compiler {path} does not run: {exc}") from exc
    return path, (version.splitlines() or [""])[0]


@functools.cache
def library(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The loaded shared library of `<name>.c`, built for this machine on first use; `extra_flags`
    are appended (tests build the code paths of older CPUs with e.g. -mno-avx512vnni)."""
    import torch  # noqa: F401  (torch's OpenMP runtime first: the library then shares its threads)

    source = Path(__file__).with_name(f"{name}.c")
    if not source.is_file():
        raise NativeUnavailable(f"{source} is missing from this install (reinstall fxquant)")
    compiler, version = _compiler()
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256("\n".join([source.read_text(), " ".join(flags), version, _cpu_flags()]).encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            run = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True,
                                 text=True, timeout=300)
            if run.returncode != 0:
                raise NativeUnavailable(f"{compiler} could not build {source.name}: "
                                        f"{(run.stderr.strip().splitlines() or ['no message'])[-1][:200]}")
            os.replace(built, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise NativeUnavailable(f"{target} does not load: {exc}") from exc


def refusal(load) -> str | None:
    """Why `load()` (a kernel's entry point getter) cannot give its C function here, or None."""
    try:
        load()
    except NativeUnavailable as exc:
        return str(exc)
    return None
