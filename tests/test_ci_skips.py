"""tests/conftest.py's rule, run on a scratch test file: a test marked ``cpu_features`` that
skips on a CPU with those features (and a C compiler) fails; other skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import cpu_features, unexpected_skip

REPO = Path(__file__).resolve().parents[1]

SCRATCH = '''
import pytest

@pytest.mark.cpu_features("{present}")
def test_present():
    pytest.skip("pretend the kernel did not build")

@pytest.mark.cpu_features("{present}")
@pytest.mark.skipif(True, reason="skipped at setup")
def test_present_at_setup():
    pass

@pytest.mark.cpu_features("{present}", "no_such_feature")
def test_absent():
    pytest.skip("this CPU lacks a feature")

def test_unmarked():
    pytest.skip("not a kernel test")

@pytest.mark.cpu_features("{present}")
def test_runs():
    pass
'''


def test_the_rule() -> None:
    assert unexpected_skip(("avx2",), frozenset({"avx2", "fma"}), has_compiler=True)
    assert unexpected_skip((), frozenset(), has_compiler=True)
    assert not unexpected_skip(("avx512f",), frozenset({"avx2"}), has_compiler=True)
    assert not unexpected_skip(("avx2",), frozenset({"avx2"}), has_compiler=False)


def test_a_marked_skip_on_a_cpu_that_has_the_features_fails(tmp_path: Path) -> None:
    present = sorted(cpu_features())[0]
    (tmp_path / "test_scratch.py").write_text(SCRATCH.format(present=present))
    env = {**os.environ, "CC": sys.executable, "PYTHONPATH": str(REPO)}  # "a compiler exists"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
         "-rA", str(tmp_path / "test_scratch.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    summary = [line.split(" ", 1) for line in out.stdout.splitlines() if " " in line]

    def reported(word: str, text: str) -> bool:
        return any(first == word and text in rest for first, rest in summary)

    assert reported("FAILED", "::test_present -"), out.stdout
    assert reported("ERROR", "::test_present_at_setup -"), out.stdout
    assert reported("SKIPPED", "this CPU lacks a feature"), out.stdout
    assert reported("SKIPPED", "not a kernel test"), out.stdout
    assert reported("PASSED", "::test_runs"), out.stdout
    assert "skipped on a CPU that has" in out.stdout
    assert out.returncode == 1
