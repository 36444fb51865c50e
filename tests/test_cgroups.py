"""A container's limits (heron/engine/cgroups.py): fake cgroup trees of both versions, then a
real cgroup on this machine with an engine started inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from heron.engine import cgroups
from tests.tiny_models import save_tiny_model

GiB, MiB = 1 << 30, 1 << 20
REPO = Path(__file__).resolve().parents[1]

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def _tree(root: Path, mounts: str, cgroup: str, files: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mounts)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_v1_limits_take_the_tightest_ancestor(tmp_path: Path) -> None:
    """A hybrid host (v1 controllers, an empty v2 mount): the process's cgroup leaves 1 GiB of
    its 3 GiB (page cache that can be dropped not counted), its parent only 512 MiB; the root
    has v1's "no limit". The CPU quota is the parent's 2.5 CPUs."""
    memory, cpu = "sys/fs/cgroup/memory/pods/a", "sys/fs/cgroup/cpu,cpuacct/pods/a"
    root = _tree(tmp_path, V1_MOUNTS, "5:memory:/pods/a\n3:cpu,cpuacct:/pods/a\n0::/pods/a\n", {
        f"{memory}/memory.limit_in_bytes": str(3 * GiB),
        f"{memory}/memory.usage_in_bytes": str(2 * GiB + 512 * MiB),
        f"{memory}/memory.stat": f"cache 9\ntotal_inactive_file {512 * MiB}\n",
        "sys/fs/cgroup/memory/pods/memory.limit_in_bytes": str(4 * GiB),
        "sys/fs/cgroup/memory/pods/memory.usage_in_bytes": str(3 * GiB + 512 * MiB),
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(20 * GiB),
        f"{cpu}/cpu.cfs_quota_us": "-1",
        f"{cpu}/cpu.cfs_period_us": "100000",
        "sys/fs/cgroup/cpu,cpuacct/pods/cpu.cfs_quota_us": "250000",
        "sys/fs/cgroup/cpu,cpuacct/pods/cpu.cfs_period_us": "100000",
    })
    assert cgroups.cgroup_dirs("memory", root) == [
        root / memory, root / "sys/fs/cgroup/memory/pods", root / "sys/fs/cgroup/memory"]
    assert cgroups.memory_headroom(root) == 512 * MiB
    assert cgroups.cpu_quota(root) == 2.5
    assert cgroups.quota_threads(16, root) == 2 and cgroups.quota_threads(1, root) == 1


def test_v2_container_sees_its_own_cgroup_at_the_mount(tmp_path: Path) -> None:
    """A container with a cgroup namespace ("0::/"), then one without ("0::/docker/x", which is
    not under its mount): both read the files at the mount point."""
    files = {
        "sys/fs/cgroup/memory.max": str(2 * GiB),
        "sys/fs/cgroup/memory.current": str(1 * GiB),
        "sys/fs/cgroup/memory.stat": f"anon 5\ninactive_file {256 * MiB}\nactive_file 7\n",
        "sys/fs/cgroup/cpu.max": "150000 100000\n",
    }
    for cgroup in ("0::/\n", "0::/docker/x\n"):
        root = _tree(tmp_path / str(len(cgroup)), V2_MOUNTS, cgroup, files)
        assert cgroups.cgroup_dirs("memory", root) == [root / "sys/fs/cgroup"]
        assert cgroups.memory_headroom(root) == 2 * GiB - 768 * MiB
        assert cgroups.cpu_quota(root) == 1.5
        assert cgroups.quota_threads(8, root) == 1


def test_no_limits(tmp_path: Path) -> None:
    """v2 "max" everywhere, then no cgroup file system at all: the host's figures stand."""
    root = _tree(tmp_path / "max", V2_MOUNTS, "0::/user.slice\n", {
        "sys/fs/cgroup/user.slice/memory.max": "max\n",
        "sys/fs/cgroup/user.slice/memory.current": str(GiB),
        "sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
    })
    assert cgroups.cgroup_dirs("cpu", root) == [root / "sys/fs/cgroup/user.slice", root / "sys/fs/cgroup"]
    assert cgroups.memory_headroom(root) is None and cgroups.cpu_quota(root) is None
    assert cgroups.quota_threads(8, root) == 8
    bare = tmp_path / "bare"
    bare.mkdir()
    assert cgroups.cgroup_dirs("memory", bare) == []
    assert cgroups.memory_headroom(bare) is None and cgroups.quota_threads(3, bare) == 3


ENGINE_IN_CGROUP = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from heron import LLM
from heron.engine.cgroups import cpu_quota, memory_headroom
llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True, max_num_seqs=1024)
print("RESULT", cpu_quota(), memory_headroom(), torch.get_num_threads())
"""


def _writable_v1(controller: str) -> Path | None:
    base = Path("/sys/fs/cgroup") / controller
    return base if os.access(base, os.W_OK) and (base / "cgroup.procs").exists() else None


@pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux's")
def test_an_engine_in_a_real_cgroup_fits_its_limits(tmp_path: Path) -> None:
    """A cgroup (v1) with a quota of one CPU and a 1.5 GiB memory limit, made here as root; an
    engine started in it runs one thread (PyTorch alone would take every CPU of the machine)
    and sizes its KV pool from what the limit leaves."""
    cpu, memory = _writable_v1("cpu"), _writable_v1("memory")
    if cpu is None or memory is None or os.cpu_count() == 1:
        pytest.skip("needs root, cgroup v1's cpu and memory controllers and 2+ CPUs")
    name = f"heron-test-{os.getpid()}"
    groups = [cpu / name, memory / name]
    for group in groups:
        group.mkdir()
    try:
        (cpu / name / "cpu.cfs_period_us").write_text("100000")
        (cpu / name / "cpu.cfs_quota_us").write_text("100000")
        (memory / name / "memory.limit_in_bytes").write_text(str(3 * GiB // 2))
        model = save_tiny_model(tmp_path / "llama")
        script = tmp_path / "engine.py"
        script.write_text(textwrap.dedent(ENGINE_IN_CGROUP))
        enter = " ".join(f"echo $$ > {group}/cgroup.procs;" for group in groups)
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = str(REPO)
        out = subprocess.run(["sh", "-c", f'{enter} exec "$0" "$@"', sys.executable, str(script),
                              str(model)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        quota, headroom, threads = out.stdout.split("RESULT ")[1].split()
        assert float(quota) == 1.0 and 0 < int(headroom) < 3 * GiB // 2
        assert int(threads) == 1
        assert f"threads: 1, the cgroup's CPU quota (1 CPUs); PyTorch would take {os.cpu_count()}" in out.stdout
        assert "available under the cgroup's memory limit" in out.stdout
    finally:
        for group in groups:
            if group.exists():
                group.rmdir()
