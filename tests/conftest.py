"""No silent skips of kernel tests: a test marked ``cpu_features(*names)`` may skip only where
the CPU lacks one of those features (as Linux's /proc/cpuinfo names them) or no C compiler
exists. Skipped anywhere else, it is reported as a failure, with the reason it gave."""

from __future__ import annotations

import functools
from collections.abc import Generator
from pathlib import Path

import pytest

MARKER = "cpu_features"


@functools.cache
def cpu_features() -> frozenset[str]:
    """The features the CPU reports: /proc/cpuinfo's flags, else heron's CPUID probe."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    from heron.kernels.cpu import isa  # loads torch: only where /proc/cpuinfo is missing

    return isa.cpu_features()


def has_compiler() -> bool:
    from heron.kernels.cpu import isa  # here: only a marked test's skip needs it

    return isa.compiler() is not None


def unexpected_skip(needed: tuple[str, ...], features: frozenset[str], has_compiler: bool) -> bool:
    """A marked test skipped although the CPU has all it needs and kernels can be built."""
    return has_compiler and set(needed) <= features


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker(MARKER)
    if marker is None or not report.skipped:
        return
    if unexpected_skip(marker.args, cpu_features(), has_compiler()):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped on a CPU that has {', '.join(marker.args) or 'what it needs'} "
                           f"and a C compiler: {reason}")


FAILED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        FAILED.append(f"{report.nodeid} ({report.when})")


def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's last line ("1 failed, ... passed in ..."), one more naming what failed:
    where only a run's last line is kept (a CI summary), it still says which test to look at."""
    if FAILED:
        print(f"failed: {', '.join(FAILED[:20])}" + (f" and {len(FAILED) - 20} more" if len(FAILED) > 20 else ""),
              flush=True)
