"""``heron bench peers``: the summary table's medians and ratios, and the exact commands it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from heron.bench.peers import CASES, bench_command, known_peers, merge, schedule, summarize


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
    args = argparse.Namespace(input_len=128, output_len=64, seed=0, tokenizer=None)
    command = bench_command(args, "http://127.0.0.1:8400", CASES[1], tmp_path / "r.json")
    assert command[1:5] == ["-m", "heron", "bench", "serve"]
    flags = dict(zip(command[5::1], command[6::1]))
    assert flags["--max-concurrency"] == "16" and flags["--num-prompts"] == "32"
    assert flags["--input-len"] == "128" and flags["--output-len"] == "64" and "--ignore-eos" in command


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
