"""Which variant of heron's C kernels this machine runs, and the compiler flags of each.

Every kernel source compiles into four variants, each with explicit target flags (never
``-march=native``), so that all four build and run on a CPU that has the most features::

    avx512     -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c
               (+ -mavx512vnni, -mavx512bf16 where the CPU has them: VNNI dot products, bf16)
    avx2vnni   the avx2 flags + -mavxvnni        (AVX2 CPUs with AVX-VNNI and no AVX-512:
                                                 Intel client CPUs since Alder Lake)
               (or + -mavx512vnni -mavx512vl where the CPU has those instead: the same
               instructions on ymm registers, EVEX-encoded, so that an AVX-512 machine
               builds, tests and times this variant's code; with 256-bit vectors and
               registers 0-15 only, as the VEX build has)
    avx2       -mavx2 -mfma -mf16c              (x86 CPUs since 2013-2015: Haswell, Zen 1)
    portable   no target flags: the compiler vectorizes the plain C for its baseline target
               (SSE2 on x86-64, NEON on ARM64)

The CPU's features come from a tiny C probe (``probe.c``: CPUID plus XGETBV, so an OS that
does not save the wide registers is respected), run once per process; not from
``/proc/cpuinfo``, which macOS lacks (it is read only where no compiler is found). The best
variant the CPU runs is taken unless ``HERON_CPU_ISA`` names one (``avx512``, ``avx2vnni``,
``avx2``, ``portable``, or ``none`` for no kernels at all: PyTorch paths everywhere); a variant the CPU
cannot run is refused with a warning. Where no C compiler exists heron says so once and runs
its PyTorch paths. This module is a leaf: it imports nothing from heron above ``heron.cache``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ISA_ENV_VAR = "HERON_CPU_ISA"
DISABLE_ENV_VAR = "HERON_CPU_KERNELS"  # "0": no kernels (the older switch; as HERON_CPU_ISA=none)
VARIANTS = ("avx512", "avx2vnni", "avx2", "portable")  # best first
NONE = "none"
_SOURCE_DIR = Path(__file__).parent
_PROBE_TIMEOUT_S = 60


@dataclass(frozen=True)
class VariantSpec:
    """A kernel variant: the CPU features it needs and the flags it is compiled with."""

    name: str
    required: frozenset[str]
    flags: tuple[str, ...]
    optional: tuple[tuple[str, str], ...] = ()  # (feature, flag) added where the CPU has it
    # the variant also needs one of these feature sets; the first the CPU has adds its flags
    one_of: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = ()

    def needs(self, features: frozenset[str]) -> frozenset[str]:
        """The features this variant needs on a CPU with ``features`` (of ``one_of``: the set
        the CPU has, else the first)."""
        chosen = next((needed for needed, _ in self.one_of if needed <= features),
                      self.one_of[0][0] if self.one_of else frozenset())
        return self.required | chosen

    def compile_flags(self, features: frozenset[str]) -> tuple[str, ...]:
        chosen = next((flags for needed, flags in self.one_of if needed <= features), ())
        return self.flags + chosen + tuple(
            flag for feature, flag in self.optional if feature in features)


SPECS = {
    "avx512": VariantSpec(
        "avx512", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
        optional=(("avx512_vnni", "-mavx512vnni"), ("avx512_bf16", "-mavx512bf16"))),
    "avx2vnni": VariantSpec(
        "avx2vnni", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c"),
        one_of=((frozenset({"avx_vnni"}), ("-mavxvnni",)),
                (frozenset({"avx512_vnni", "avx512vl"}),
                 ("-mavx512vnni", "-mavx512vl", "-mprefer-vector-width=256",
                  *(f"-ffixed-xmm{i}" for i in range(16, 32)))))),
    "avx2": VariantSpec("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c")),
    "portable": VariantSpec("portable", frozenset(), ()),
}


def compiler() -> str | None:
    """``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH; None where there is none."""
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.cache
def _find_compiler(cc: str | None, path: str | None) -> str | None:
    """Looked up once per ($CC, $PATH): every kernel lookup asks (``selected_variant``), and a
    search of the PATH is a few stat calls each time (2-3 % of a prefill step's time)."""
    return cc or shutil.which("cc", path=path) or shutil.which("gcc", path=path) or shutil.which(
        "clang", path=path)


@functools.cache
def compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=_PROBE_TIMEOUT_S).stdout
    except (subprocess.SubprocessError, OSError):
        return ""


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU features the probe reports (names as in Linux's /proc/cpuinfo, e.g.
    ``avx512_vnni``); /proc/cpuinfo's flags where the probe cannot be built or run."""
    probed = _run_probe()
    return probed if probed is not None else _proc_cpuinfo_flags()


def kernel_cache_dir() -> Path:
    """``<cache root>/kernels``, private to its user (0700): heron loads and runs its files."""
    from heron.cache import cache_root

    directory = cache_root() / "kernels"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    return directory


def matches_record(path: Path) -> bool:
    """Whether ``path`` is the file heron built: its sha256 equals the one recorded beside it
    (``<name>.sha256``) right after the build. A changed, truncated or unrecorded file is not."""
    try:
        recorded = path.with_name(path.name + ".sha256").read_text().strip()
        return recorded == hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False


def record_digest(path: Path) -> None:
    from heron.cache import atomic_write_text

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    atomic_write_text(path.with_name(path.name + ".sha256"), digest)


def _run_probe() -> frozenset[str] | None:
    cc = compiler()
    if cc is None:
        return None
    from heron.cache import atomic_write

    source = _SOURCE_DIR / "probe.c"
    key = hashlib.sha256(source.read_bytes() + compiler_version(cc).encode()).hexdigest()[:16]
    binary = kernel_cache_dir() / f"probe-{key}"
    try:
        if not matches_record(binary):
            atomic_write(binary, lambda tmp: subprocess.run(
                [cc, "-O1", str(source), "-o", str(tmp)], check=True, capture_output=True,
                timeout=_PROBE_TIMEOUT_S))
            binary.chmod(0o755)
            record_digest(binary)
        done = subprocess.run([str(binary)], capture_output=True, text=True, check=True,
                              timeout=_PROBE_TIMEOUT_S)
    except (subprocess.SubprocessError, OSError) as err:
        logger.warning("CPU feature probe failed (%s); reading /proc/cpuinfo instead", err)
        return None
    return frozenset(done.stdout.split())


def _proc_cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def runnable_variants(features: frozenset[str]) -> tuple[str, ...]:
    """The variants a CPU with ``features`` runs, best first."""
    return tuple(name for name in VARIANTS if SPECS[name].needs(features) <= features)


def selected_variant() -> str:
    """The variant heron's kernels are built as: ``HERON_CPU_ISA`` if given and runnable, else
    the best one the CPU runs; ``none`` when kernels are off or no compiler exists."""
    forced = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    off = os.environ.get(DISABLE_ENV_VAR, "1") == "0"
    return _select(forced, off, compiler() is not None)


@functools.cache
def _select(forced: str, off: bool, have_compiler: bool) -> str:
    """Decided once per setting; the reason is logged once."""
    if forced and forced not in (*VARIANTS, NONE):
        raise ValueError(f"{ISA_ENV_VAR}={forced!r}: choose one of {', '.join((*VARIANTS, NONE))}")
    if off or forced == NONE:
        logger.info("CPU kernels off (%s): PyTorch paths only",
                    f"{ISA_ENV_VAR}=none" if forced == NONE else f"{DISABLE_ENV_VAR}=0")
        return NONE
    if not have_compiler:
        logger.warning("no C compiler found (cc, gcc, clang or $CC): heron's CPU kernels are off "
                       "and every layer runs its PyTorch path (slower); install a C compiler")
        return NONE
    features = cpu_features()
    runnable = runnable_variants(features)
    if forced and forced not in runnable:
        missing = sorted(SPECS[forced].needs(features) - features)
        logger.warning("%s=%s refused: the CPU lacks %s; using %s", ISA_ENV_VAR, forced,
                       ", ".join(missing), runnable[0])
        forced = ""
    variant = forced or runnable[0]
    spec = SPECS[variant]
    extras = sorted(spec.needs(features) - spec.required) + [
        f for f, _ in spec.optional if f in features]
    logger.info("CPU kernels: %s variant%s%s", variant, f" (+{', '.join(extras)})" if extras else "",
                f" (forced by {ISA_ENV_VAR})" if forced else "")
    return variant


def variant_flags(variant: str) -> tuple[str, ...]:
    """The compiler's target flags for ``variant`` on this CPU (without GCC's -ffixed-xmmN,
    which clang lacks: there the stand-in avx2vnni build may use all 32 registers)."""
    flags = SPECS[variant].compile_flags(cpu_features())
    cc = compiler()
    if cc is not None and "clang" in compiler_version(cc).lower():
        flags = tuple(flag for flag in flags if not flag.startswith("-ffixed-xmm"))
    return flags
