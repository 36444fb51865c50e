"""Soak heron's engine with seeded random mixed workloads (tests/soak_workload.py).

    PYTHONPATH=. python scripts/soak.py --seeds 0-199 --minutes 30 [--model llama-gguf]
    PYTHONPATH=. python scripts/soak.py --seeds 17 -v        # one seed, every request shown
    PYTHONPATH=. python scripts/soak.py --server --seeds 0-9 # the same through `heron serve`

Each seed is one engine and one workload; a seed that fails prints its settings and each
failing request (prompt, parameters, what differed), so that it can be run again alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# One thread unless told: the tiny models' steps are all overhead, and threads waiting on each
# other on a busy machine make them 20x slower (heron's kernels give the same bits either way).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.soak_server import run_server_case  # noqa: E402
from tests.soak_workload import build_models, make_case, run_case  # noqa: E402


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += range(int(lo), int(hi or lo) + 1)
    return seeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-99", help="e.g. 0-99 or 3,7,10-12")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting seeds after this")
    parser.add_argument("--model", default=None, help="one model (e.g. llama-f32, gemma3-gguf)")
    parser.add_argument("--requests", type=int, default=None, help="requests per seed")
    parser.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "heron-soak-2"))
    parser.add_argument("--server", action="store_true",
                        help="through a real `heron serve` with concurrent clients that hang up")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    models = build_models(Path(args.models_dir))
    deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    totals = {"seeds": 0, "requests": 0, "compared": 0, "aborted": 0, "preemptions": 0,
              "failed_seeds": 0}
    for seed in _seeds(args.seeds):
        if deadline is not None and time.monotonic() > deadline:
            break
        case = make_case(seed, models, args.requests, args.model)
        if args.verbose:
            print(case.settings)
            for spec in case.specs:
                print("  ", spec.describe())
        start = time.monotonic()
        report = run_server_case(case) if args.server else run_case(case)
        totals["seeds"] += 1
        for key in ("requests", "compared", "aborted", "preemptions"):
            totals[key] += getattr(report, key)
        s = case.settings
        print(f"seed {seed}: {s.model.name} bs={s.block_size} len={s.max_model_len} "
              f"budget={s.max_num_batched_tokens} seqs={s.max_num_seqs} blocks={s.num_blocks} "
              f"prefix={s.prefix_caching}: {report.requests} requests, {report.compared} compared, "
              f"{report.aborted} aborted, {report.preemptions} preemptions, "
              f"{report.prefix_hits} hit tokens, {time.monotonic() - start:.1f} s"
              f"{'' if not report.failures else f', {len(report.failures)} FAILURES'}",
              flush=True)
        if report.failures:
            totals["failed_seeds"] += 1
            for failure in report.failures:
                print("   FAIL", failure, flush=True)
    print("totals:", totals)
    return 1 if totals["failed_seeds"] else 0


if __name__ == "__main__":
    sys.exit(main())
