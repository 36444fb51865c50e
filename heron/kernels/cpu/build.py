"""Compiling a kernel library for the selected variant, once, and loading it with ctypes.

::

    <cache root>/kernels/<name>-<variant>-<hash of sources, headers, command, compiler, CPU>.so
    <cache root>/kernels/<same>.so.sha256    the library's own sha256, recorded when built

The folder is private (0700). A library whose file no longer matches its recorded sha256
(changed, truncated, or built before records were kept) is rebuilt, never loaded.

The command is ``cc -O3 -fno-trapping-math <variant flags> -fopenmp -shared -fPIC`` (see ``isa``); the OpenMP
runtime the library links to is the one PyTorch already loaded (same soname), so its threads
are PyTorch's. A compiler without OpenMP (Apple's clang) builds it single-threaded, and says
so. A failed build is logged once and gives None: callers keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from heron.kernels.cpu.isa import (
    NONE,
    compiler,
    compiler_version,
    cpu_features,
    kernel_cache_dir,
    matches_record,
    record_digest,
    selected_variant,
    variant_flags,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE_DIR = Path(__file__).parent
_BUILD_TIMEOUT_S = 180


def load_library(name: str, sources: tuple[str, ...], variant: str | None = None) -> ctypes.CDLL | None:
    """The library ``name`` built from ``sources`` (C files of this directory, without .c)
    for ``variant`` (default: the selected one); None where kernels are off or it fails."""
    variant = variant or selected_variant()
    if variant == NONE:
        return None
    return _load(name, sources, variant)


@functools.cache
def _load(name: str, sources: tuple[str, ...], variant: str) -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        return None
    paths = [SOURCE_DIR / f"{source}.c" for source in sources]
    # -fno-trapping-math: heron never reads FP exception flags, and without it GCC keeps every
    # loop that calls exp_scalar (a clamp: a compare that could trap) scalar
    base = [cc, "-O3", "-fno-trapping-math", *variant_flags(variant), "-shared", "-fPIC"]
    key = hashlib.sha256()
    for path in (*paths, *sorted(SOURCE_DIR.glob("*.h"))):  # headers: included by the sources
        key.update(path.read_bytes())
    for part in (*base, compiler_version(cc), *sorted(cpu_features())):
        key.update(part.encode())
    target = kernel_cache_dir() / f"{name}-{variant}-{key.hexdigest()[:16]}.so"
    if not matches_record(target):
        if target.exists():
            logger.warning("kernel %s: %s does not match the sha256 recorded when it was built; "
                           "rebuilding it", name, target.name)
        if not _compile_showing_progress(name, variant, base, paths, target):
            return None
    return ctypes.CDLL(str(target))


def _compile_showing_progress(name: str, variant: str, base: list[str], paths: list[Path],
                              target: Path) -> bool:
    from heron.progress import Progress  # a leaf, like heron.cache

    progress = Progress(f"compiling CPU kernel {name} ({variant})", total=1, unit="kernel")
    built = _compile(name, base, paths, target)
    if built:
        progress.update()
        progress.finish()
    else:
        progress.close()
    return built


def _compile(name: str, base: list[str], paths: list[Path], target: Path) -> bool:
    """Build with OpenMP, else without it (single-threaded); False when both fail."""
    from heron.cache import atomic_write

    errors = []
    for openmp in (["-fopenmp"], []):
        command = [*base, *openmp, *map(str, paths)]
        try:
            atomic_write(target, functools.partial(_compile_to, command))
        except (subprocess.SubprocessError, OSError) as err:
            errors.append((getattr(err, "stderr", "") or str(err)).strip()[-800:])
            continue
        record_digest(target)
        if not openmp:
            logger.warning("kernel %s built without OpenMP (the compiler lacks it): one thread",
                           name)
        return True
    logger.warning("kernel %s not used: build failed: %s", name, errors[0])
    return False


def _compile_to(command: list[str], target: Path) -> None:
    subprocess.run([*command, "-o", str(target), "-lm"], check=True, capture_output=True,
                   text=True, timeout=_BUILD_TIMEOUT_S)


def per_variant(make: Callable[[str], T | None]) -> Callable[..., T | None]:
    """``make(variant)`` called once per variant; the function returned takes an optional
    variant (default: the selected one, which ``HERON_CPU_ISA`` may change) and gives None
    where kernels are off."""
    cached = functools.cache(make)

    @functools.wraps(make)
    def get(variant: str | None = None) -> T | None:
        variant = variant or selected_variant()
        return None if variant == NONE else cached(variant)

    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return get
