"""``heron bench peers``: the summary table's medians and ratios, and the exact commands it runs."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import pytest

from heron.bench import roofline
from heron.bench.peers import (
    CASES,
    Peer,
    _configured_peers,
    bench_command,
    cold_start,
    known_peers,
    merge,
    model_files,
    parse_env,
    roofline_line,
    roofline_tok_s,
    schedule,
    started,
    summarize,
    summarize_cold_starts,
    summarize_memory,
)

MIB = 2**20


def _result(start: float, c1: list[float], c16: list[float], ttft_ms: list[float],
            failed: list[int], tpot_ms: list[float] | None = None) -> dict:
    tpot_ms = tpot_ms or [1000 / v for v in c1]
    return {"first_answer_s": [start], "runs": {
        "c1": [{"output_throughput": v, "median_tpot_ms": t} for v, t in zip(c1, tpot_ms)],
        "c16": [{"output_throughput": v, "median_ttft_ms": t, "failed": f}
                for v, t, f in zip(c16, ttft_ms, failed)]}}


def test_summary_takes_medians_and_divides_heron_by_each_peer() -> None:
    table = summarize({
        "heron": _result(3.0, [40, 44, 41], [200, 150, 210], [900, 1000, 1100], [0, 0, 0],
                         tpot_ms=[21.0, 19.5, 24.0]),
        "llama.cpp": _result(2.0, [30, 33, 36], [100, 90, 80], [3000, 4000, 3500], [0, 6, 7],
                             tpot_ms=[30.0, 28.0, 27.5]),
    })
    rows = table.splitlines()
    assert rows[2] == "| heron | 3.0 | 41.0 | 21.0 | 200.0 | 1.00 | 0 | — | — |"
    # medians 33 and 90; 41 / 33 = 1.24, 200 / 90 = 2.22; the worst run's failures are shown
    assert rows[3] == "| llama.cpp | 2.0 | 33.0 | 28.0 | 90.0 | 3.50 | 7 | 1.24x | 2.22x |"


def test_commands_are_the_anchor_commands_and_one_client_for_all(tmp_path: Path) -> None:
    peers = known_peers(8400, tmp_path)
    assert peers["llama.cpp"].command[:3] == [str(tmp_path / "llama-server"), "-m", str(tmp_path / "gemma.gguf")]
    assert "--served-model-name" in peers["vllm-cpu"].command
    args = argparse.Namespace(input_len=128, output_len=64, seed=0, tokenizer=None, disjoint_prompts=False)
    command = bench_command(args, "http://127.0.0.1:8400", CASES[1], tmp_path / "r.json")
    assert command[1:5] == ["-m", "heron", "bench", "serve"]
    flags = dict(zip(command[5::1], command[6::1]))
    assert flags["--max-concurrency"] == "16" and flags["--num-prompts"] == "32"
    assert flags["--input-len"] == "128" and flags["--output-len"] == "64" and "--ignore-eos" in command
    assert flags["--seed"] == "0"  # the c=1 case's seed: its 16 prompts lead the 32
    args.disjoint_prompts = True
    seeds = [bench_command(args, "u", case, tmp_path / "r.json") for case in CASES]
    assert [c[c.index("--seed") + 1] for c in seeds] == ["0", "1"]


def test_interleaving_starts_every_peer_once_per_run_and_merges_them() -> None:
    names = ["heron", "llama.cpp"]
    assert schedule(names, 2, interleave=False) == [("heron", range(1, 3)), ("llama.cpp", range(1, 3))]
    assert schedule(names, 2, interleave=True) == [("heron", range(1, 2)), ("llama.cpp", range(1, 2)),
                                                   ("heron", range(2, 3)), ("llama.cpp", range(2, 3))]
    results: dict[str, dict] = {}
    for start, c1 in ((9.0, 30.0), (4.0, 40.0), (5.0, 35.0)):
        merge(results, "heron", _result(start, [c1], [100.0], [500.0], [0]))
    merge(results, "llama.cpp", _result(2.0, [20.0, 25.0, 30.0], [50.0, 40.0, 60.0], [900.0] * 3, [0] * 3))
    assert results["heron"]["first_answer_s"] == [9.0, 4.0, 5.0]
    rows = summarize(results).splitlines()
    # heron: median start 5.0, median c=1 35.0; 35 / 25 = 1.40, 100 / 50 = 2.00
    # TPOT p50: 1000 / c=1 tok/s per run here; medians 1000 / 35 and 1000 / 25
    assert rows[2] == "| heron | 5.0 | 35.0 | 28.6 | 100.0 | 0.50 | 0 | — | — |"
    assert rows[3] == "| llama.cpp | 2.0 | 25.0 | 40.0 | 50.0 | 0.90 | 0 | 1.40x | 2.00x |"


def test_second_model_and_gguf_choose_every_peers_files(tmp_path: Path) -> None:
    files = model_files("second", None, None, tmp_path)
    folder = tmp_path / "second-model"
    assert files.gguf == folder / "model-q4_k_m.gguf" and files.tokenizer == str(folder / "hf")
    peers = known_peers(8400, tmp_path, files)
    assert peers["heron"].command[3:5] == ["serve", str(folder / "model-q4_k_m.gguf")]
    assert peers["llama.cpp"].command[1:3] == ["-m", str(folder / "model-q4_k_m.gguf")]
    assert peers["llama.cpp-avx2"].command[0] == str(tmp_path / "llama-server-avx2")
    assert peers["llama.cpp-avx2"].command[1:] == peers["llama.cpp"].command[1:]
    assert peers["vllm-cpu"].command[1] == str(folder / "hf")
    default = known_peers(8400, tmp_path, model_files("default", None, None, tmp_path))
    assert default["heron"].command[3:5] == ["serve", "--port"]  # the embedded model
    assert default["llama.cpp"].command[2] == str(tmp_path / "gemma.gguf")
    own = model_files("default", "/m/x.gguf", "/m/tok", tmp_path)
    assert (own.gguf, own.tokenizer) == (Path("/m/x.gguf"), "/m/tok")
    assert model_files("default", "/m/x.gguf", None, tmp_path).tokenizer == "/m/x.gguf"


def test_env_for_every_peer_or_one() -> None:
    names = ["heron", "llama.cpp-avx2"]
    env = parse_env(["heron:HERON_CPU_ISA=avx2", "OMP_NUM_THREADS=2", "heron:X=a:b=c"], names)
    assert env == {"heron": {"HERON_CPU_ISA": "avx2", "OMP_NUM_THREADS": "2", "X": "a:b=c"},
                   "llama.cpp-avx2": {"OMP_NUM_THREADS": "2"}}
    with pytest.raises(ValueError, match="not one of the peers"):
        parse_env(["vllm-cpu:A=1"], names)
    with pytest.raises(ValueError, match="expected KEY=VAL"):
        parse_env(["heron:A"], names)


def _with_memory(result: dict, rss_mib: list[float], pss_mib: list[float],
                 cold: tuple[float, float, float] | None) -> dict:
    result["rss"] = [v * MIB for v in rss_mib]
    result["pss"] = [v * MIB for v in pss_mib]
    if cold:
        result["cold"] = {"first_answer_s": cold[0], "peak_rss": cold[1] * MIB,
                          "cache_written": cold[2] * MIB}
    return result


def test_memory_table_gives_roofline_share_and_heron_over_each_peer() -> None:
    results = {
        "heron": _with_memory(_result(2.5, [100, 110, 90], [300] * 3, [500] * 3, [0] * 3),
                              [1300, 1200, 1250], [1000, 1100, 1050], (30.2, 2000, 12.5)),
        "llama.cpp": _with_memory(_result(2.0, [50, 60, 55], [100] * 3, [900] * 3, [0] * 3,
                                          tpot_ms=[20.0, 25.0, 22.0]),
                                  [1000, 1000, 1000], [990, 980, 985], (2.6, 1600, 0)),
    }
    rows = summarize_memory(results, roofline_rate=200.0).splitlines()
    assert rows[0].startswith("| server | c=1 tok/s | % of DRAM roofline (decode: 1 / TPOT p50) |")
    # heron: median c=1 100 = 50 % of 200 (TPOT 1000 / 100 ms: 10 ms, decode 100 tok/s too);
    # RSS median 1250; second start: its first warm one
    assert rows[2] == ("| heron | 100.0 | 50 % (50 %) | 1250 / 1050 | — | 2000 | — | 12.5 | "
                       "30.2 | 2.5 |")
    # llama.cpp: 55 tok/s = 28 %, decode 1000 / 22 ms = 45.5 tok/s = 23 %; 1250 / 1000 = 1.25x, peak 2000 / 1600 = 1.25x, no heron cache
    assert rows[3] == ("| llama.cpp | 55.0 | 28 % (23 %) | 1000 / 985 | 1.25x | 1600 | 1.25x | — | "
                       "2.6 | 2.0 |")
    del results["heron"]["cold"], results["llama.cpp"]["cold"]
    rows = summarize_memory(results, roofline_rate=200.0).splitlines()
    assert rows[3] == "| llama.cpp | 55.0 | 28 % (23 %) | 1000 / 985 | 1.25x | — | — | — | — | — |"


def test_roofline_line_divides_bandwidth_by_bytes_per_token() -> None:
    weights = roofline.DecodeBytes(layers=100_000_000, lm_head=150_000_000, other=2_000,
                                   embedding_row=680, tied=True)
    bandwidth = roofline.Bandwidth(50.0, 2, 2**30, 8, "c")
    assert roofline_tok_s(weights, bandwidth) == pytest.approx(50e9 / 250_002_680)
    assert roofline_line(weights, bandwidth) == (
        "DRAM roofline: 50.0 GB/s read / 250.0 MB of weights per token = 200.0 tok/s at c=1 "
        "(weights: 250.0 MB (layers 100.0, LM head 150.0 (tied embedding), other 0.00, one "
        "embedding row 680 B); bandwidth: 50.0 GB/s (c, 2 threads, 1024 MiB, best of 8))")


def test_heron_labels_are_heron_with_their_own_env_and_cache(tmp_path: Path) -> None:
    args = argparse.Namespace(port=8400, cold_start=True, env=[
        "heron/avx2:HERON_CPU_ISA=avx2", "heron/portable:HERON_CPU_ISA=portable"])
    names = ["heron/avx2", "heron/portable", "llama.cpp-avx2"]
    files = model_files("default", None, None, tmp_path)
    (tmp_path / "out" / "heron-avx2-cache").mkdir(parents=True)
    (tmp_path / "out" / "heron-avx2-cache" / "stale").write_text("x")
    peers = _configured_peers(args, tmp_path, files, names, tmp_path / "out")
    assert list(peers) == names and peers["heron/avx2"].name == "heron/avx2"
    assert peers["heron/avx2"].command == known_peers(8400, tmp_path)["heron"].command
    assert peers["heron/avx2"].env == {"HERON_CPU_ISA": "avx2", "HERON_CACHE_DIR": str(
        (tmp_path / "out" / "heron-avx2-cache").resolve())}
    assert not (tmp_path / "out" / "heron-avx2-cache").exists()  # emptied for the first start
    assert peers["heron/portable"].env["HERON_CACHE_DIR"].endswith("heron-portable-cache")
    assert peers["llama.cpp-avx2"].env == {}
    args.cold_start = False
    assert "HERON_CACHE_DIR" not in _configured_peers(args, tmp_path, files, names,
                                                      tmp_path / "out")["heron/avx2"].env
    with pytest.raises(ValueError, match="unknown or repeated peer 'llama'"):
        _configured_peers(args, tmp_path, files, ["heron", "llama"], tmp_path / "out")
    rows = summarize({"heron/avx2": _result(3.0, [30.0], [90.0], [900.0], [0]),
                      "heron/portable": _result(3.0, [15.0], [30.0], [900.0], [0])}).splitlines()
    assert rows[2].endswith("| — | — |") and rows[3].endswith("| 2.00x | 3.00x |")


_FAKE_SERVER = """
import http.server, os, sys
with open(os.path.join(os.environ["HERON_CACHE_DIR"], "w.bin"), "wb") as f:
    f.write(b"w" * 1000)
class Answer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Answer).serve_forever()
"""


def test_first_start_measures_time_peak_and_cache_writes_then_stops(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "old.bin").write_bytes(b"o" * 10)  # there before the start: not counted
    peer = Peer("heron", [sys.executable, "-c", _FAKE_SERVER, str(port)], 30,
                env={"HERON_CACHE_DIR": str(cache)})
    cold = cold_start(peer, argparse.Namespace(port=port), tmp_path)
    assert 0 < cold["first_answer_s"] < 30
    assert 5 * MIB < cold["peak_rss"] < 500 * MIB  # one small Python process
    assert cold["peak_split"] == {"server": cold["peak_rss"]}
    assert cold["cache_written"] == 1000
    assert cold["cache_largest"] == [("w.bin", 1000), ("old.bin", 10)]
    assert (tmp_path / "heron-server.log").exists()
    with socket.socket() as probe:  # stopped: nothing listens on the port (TIME_WAIT may stay)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_cold_start_table_gives_medians_by_process_and_the_ratio() -> None:
    def start(peak: int, split: dict[str, int]) -> dict:
        return {"peak_rss": peak * MIB, "peak_split": {k: v * MIB for k, v in split.items()}}

    rows = summarize_cold_starts({
        "heron": [start(1000, {"server": 200, "engine core": 800}),
                  start(900, {"server": 220, "engine core": 600, "cc1": 80}),
                  start(1100, {"server": 240, "engine core": 860})],
        "llama.cpp": [start(500, {"server": 500}), start(520, {"server": 520})],
    }).splitlines()
    assert rows[2] == "| heron | 3 | 1000 | engine core 800, server 220, cc1 0 | — |"
    assert rows[3] == "| llama.cpp | 2 | 510 | server 510 | 1.96x |"


def test_a_peer_with_its_own_pythonpath_runs_outside_the_current_checkout(tmp_path: Path) -> None:
    """`python -m heron` imports from its working directory first: a peer that names another
    checkout with PYTHONPATH must not run in this one (its code would be served instead)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    cache = {"HERON_CACHE_DIR": str(tmp_path)}
    for env, cwd in (({**cache, "PYTHONPATH": str(tmp_path / "checkout")}, out.resolve()),
                     (cache, Path.cwd().resolve())):
        peer = Peer("heron/b", [sys.executable, "-c", _FAKE_SERVER, str(port)], 30, env=env)
        with started(peer, argparse.Namespace(port=port), out) as (process, _, _):
            assert Path(f"/proc/{process.pid}/cwd").resolve() == cwd
