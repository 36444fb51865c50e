"""Mixed load, CI-sized: a few seeds of scripts/soak.py's workload (tests/soak_workload.py).

Each case is one engine with a small token budget (chunked prefill), a KV pool small enough
to preempt, prefix caching, and requests of every kind arriving while others run, some
aborted. Every greedy or seeded request must equal itself run alone on a fresh engine (token
ids, text, finish and stop reason; logprobs within the tolerance), every request must obey
its parameters, and the engine must end idle with every KV block free. One case goes through
a real ``heron serve`` with concurrent clients that hang up. ``scripts/soak.py`` runs the same
for many seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.soak_server import run_server_case
from tests.soak_workload import SoakModel, build_models, make_case, run_case

# Seeds whose cases preempt and hit the prefix cache and hold an embedding request.
CASES = [(100, "llama-gguf"), (104, "gemma3-gguf"), (100, "qwen2-gguf"), (104, "llama-f32"),
         (104, "gemma3-f32"), (104, "qwen2-f32"), (100, "llama-int8")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SoakModel]:
    return build_models(Path(tmp_path_factory.mktemp("soak-models")))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tiny models' steps are all overhead: threads that wait on each other on a busy
    machine only slow them down (heron's kernels give the same bits on any thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("seed", "model"), CASES)
def test_mixed_load_equals_each_request_alone(models: dict[str, SoakModel], seed: int,
                                              model: str, one_thread: None) -> None:
    case = make_case(seed, models, num_requests=12, model=model)
    report = run_case(case)
    assert not report.failures, "\n".join([str(case.settings), *report.failures])
    assert report.compared >= 4
    assert report.preemptions and report.prefix_hits


def test_mixed_load_through_the_server(models: dict[str, SoakModel]) -> None:
    case = make_case(7, models, num_requests=12, model="gemma3-gguf")
    report = run_server_case(case)
    assert not report.failures, "\n".join([str(case.settings), *report.failures])
    assert report.compared >= 4
