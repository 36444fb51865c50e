"""The batched sampler on fixed logits (no model): exact tokens, supports, logits and logprobs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from heron.engine.sampler import Sampler, SamplerOutput, _inverse_cdf, process_logits
from heron.engine.sampling_batch import SamplingBatch, SamplingRow, seeded_generator
from heron.sampling_params import SamplingParams

CPU = torch.device("cpu")

# A fixed distribution with no ties and no cumulative sums on a top-p boundary:
# cumulative mass 0.40, 0.65, 0.80, 0.90, 0.96, 1.00.
PROBS = [0.40, 0.25, 0.15, 0.10, 0.06, 0.04]
# The vocabulary order is shuffled so that filters must scatter back to the right ids.
PERM = [3, 0, 5, 1, 4, 2]  # token PERM[i] has probability PROBS[i]


def make_row(prompt: list[int] | None = None, output: list[int] | None = None,
             **params: object) -> SamplingRow:
    """One row as the runner describes it; a seeded sampled row gets its own generator."""
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    prompt = [1, 2] if prompt is None else prompt
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = seeded_generator(sampling.seed, CPU)
    return SamplingRow(sampling, [*prompt, *(output or [])], len(prompt), generator)


def batch_of(rows: list[SamplingRow], vocab: int) -> SamplingBatch:
    return SamplingBatch.build(rows, vocab, CPU)


def sample(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    return sampler(logits, batch_of(rows, logits.shape[-1]))


def probs_of(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    return Sampler().compute_probs(logits, batch_of(rows, logits.shape[-1]))


def processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    penalties = batch_of(rows, logits.shape[-1]).penalties
    assert penalties is not None
    return process_logits(logits, penalties)


def shuffled_logits(rows: int = 1) -> torch.Tensor:
    """[rows, 6] logits whose softmax puts PROBS[i] on token PERM[i]."""
    logits = torch.empty(len(PROBS))
    for p, token_id in zip(PROBS, PERM, strict=True):
        logits[token_id] = math.log(p) + 3.0  # an offset: softmax is shift invariant
    return logits.repeat(rows, 1)


def tokens_of(ranks: list[int]) -> set[int]:
    """Token ids of the given probability ranks (0 = most likely)."""
    return {PERM[r] for r in ranks}


def expected_probs(kept_ranks: list[int], temperature: float = 1.0) -> torch.Tensor:
    """PROBS ** (1/T) restricted to the kept ranks and renormalised, in vocabulary order."""
    out = torch.zeros(len(PROBS), dtype=torch.float64)
    for r in kept_ranks:
        out[PERM[r]] = PROBS[r] ** (1.0 / temperature)
    return out / out.sum()


def empirical_support(
    params: dict[str, object], draws: int = 3000
) -> tuple[set[int], torch.Tensor]:
    """Sample ``draws`` rows of the shuffled distribution at once; support and frequencies."""
    reqs = [make_row(**params) for i in range(draws)]
    out = sample(Sampler(seed=7), shuffled_logits(draws), reqs)
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=len(PROBS))
    return set(out.sampled_token_ids), counts.double() / draws


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_exact_argmax(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 1000, generator=gen) * 5).to(dtype)
    # Row 0: two logits one float32 ulp apart; the larger must win.
    logits[0] = 0
    logits[0, 10] = 1.0
    logits[0, 11] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).to(dtype)
    reqs = [make_row(temperature=0.0) for i in range(8)]
    before = logits.clone()
    out = sample(Sampler(), logits, reqs)
    assert isinstance(out, SamplerOutput)
    assert out.sampled_token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8
    assert torch.equal(logits, before)  # the sampler never edits its input


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen) * 3
    temps = [0.0, 1.0, 0.0, 0.7, 1.3, 0.0]
    reqs = [make_row(temperature=t, top_p=0.9) for i, t in enumerate(temps)]
    before = logits.clone()
    out = sample(Sampler(), logits, reqs)
    argmax = logits.argmax(dim=-1).tolist()
    for i, t in enumerate(temps):
        if t == 0.0:
            assert out.sampled_token_ids[i] == argmax[i]
    assert torch.equal(logits, before)


@pytest.mark.parametrize("seed", [None, 0, 123])
def test_top_k_1_equals_greedy(seed: int | None) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 500, generator=gen)
    reqs = [make_row(temperature=1.5, top_k=1, seed=seed) for i in range(16)]
    for _ in range(3):
        assert sample(Sampler(seed=5), logits, reqs).sampled_token_ids == logits.argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------
# Truncation: exact supports and renormalised probabilities
# ---------------------------------------------------------------------------------------------

FILTER_CASES = [
    # (params, kept probability ranks)
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_k": 100}, [0, 1, 2, 3, 4, 5]),  # k >= V disables top-k
    ({"top_p": 0.3}, [0]),
    ({"top_p": 0.6}, [0, 1]),  # mass before rank 1 is 0.40 < 0.6; before rank 2 it is 0.65
    ({"top_p": 0.7}, [0, 1, 2]),
    ({"top_p": 0.95}, [0, 1, 2, 3, 4]),
    # top-p acts on the top-k survivors renormalised: 0.5, 0.3125, 0.1875 -> mass before 0.8125
    ({"top_k": 3, "top_p": 0.7}, [0, 1]),
    ({"min_p": 0.3}, [0, 1, 2]),  # keep p >= 0.12
    ({"min_p": 0.2}, [0, 1, 2, 3]),  # keep p >= 0.08
    ({"min_p": 0.45}, [0, 1]),  # keep p >= 0.18
    # min_p after temperature: T=2 flattens to ratios 1, .79, .61, .50, .39, .32
    ({"min_p": 0.45, "temperature": 2.0}, [0, 1, 2, 3]),
    ({"top_p": 0.7, "min_p": 0.5}, [0, 1]),  # top-p keeps 3; min_p then drops p < 0.2
]


@pytest.mark.parametrize(("params", "kept"), FILTER_CASES)
def test_filters_renormalise_exactly(params: dict[str, object], kept: list[int]) -> None:
    temperature = float(params.get("temperature", 1.0))  # type: ignore[arg-type]
    probs = probs_of(shuffled_logits(), [make_row(**params)])
    assert probs.dtype == torch.float32
    torch.testing.assert_close(
        probs[0].double(), expected_probs(kept, temperature), atol=1e-6, rtol=0
    )
    assert set(torch.nonzero(probs[0]).flatten().tolist()) == tokens_of(kept)


@pytest.mark.parametrize(("params", "kept"), FILTER_CASES)
def test_sampled_support_equals_kept_set(params: dict[str, object], kept: list[int]) -> None:
    temperature = float(params.get("temperature", 1.0))  # type: ignore[arg-type]
    support, freqs = empirical_support(params)
    assert support == tokens_of(kept)
    # 3000 draws: a binomial standard deviation is at most 0.0092; allow ~4 of them.
    torch.testing.assert_close(freqs, expected_probs(kept, temperature), atol=0.037, rtol=0)


def _reference_support(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Kept token ids by the definitions, with a full float64 sort (no ties in ``row``)."""
    logits = row.double()
    order = logits.argsort(descending=True).tolist()
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(logits[order], dim=-1).tolist()
    kept, mass = [], 0.0
    for token_id, p in zip(order, probs, strict=True):
        if mass >= top_p:
            break
        kept.append(token_id)
        mass += p
    max_logit = logits.max().item()
    return {t for t in kept if logits[t].item() >= max_logit + math.log(min_p or 1e-300)}


@pytest.mark.parametrize("vocab", [3000, 40000])
def test_large_vocab_filters_match_the_definitions(vocab: int) -> None:
    # Flat rows make nuclei of thousands of tokens: the candidate search must widen.
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(6, vocab, generator=gen) * torch.tensor([[0.5], [0.5], [4], [2], [1], [3]])
    settings = [
        (0, 0.9, 0.0),
        (0, 0.5, 0.0),
        (0, 0.95, 0.0),
        (1500, 0.8, 0.0),
        (40, 0.99, 0.0),
        (0, 0.9, 0.01),
    ]
    reqs = [make_row(top_k=k, top_p=p, min_p=m) for i, (k, p, m) in enumerate(settings)]
    probs = probs_of(logits, reqs)
    for i, (k, p, m) in enumerate(settings):
        expected = _reference_support(logits[i], k, p, m)
        assert set(torch.nonzero(probs[i]).flatten().tolist()) == expected
        ref = torch.softmax(logits[i].double(), dim=-1)
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[list(expected)] = True
        ref = torch.where(mask, ref, 0.0)
        torch.testing.assert_close(probs[i].double(), ref / ref.sum(), atol=1e-6, rtol=1e-4)


def test_draws_match_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(20000, 1)
    reqs = [make_row(temperature=0.8) for i in range(20000)]
    out = sample(Sampler(seed=3), logits, reqs)
    freqs = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=4).double() / 20000
    expected = torch.softmax(logits[0].double() / 0.8, dim=-1)
    torch.testing.assert_close(freqs, expected, atol=0.015, rtol=0)  # sd <= 0.0036


def test_compute_probs_greedy_row_is_one_hot() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [0.1, 3.0, 2.0]])
    reqs = [make_row(temperature=0.0), make_row(temperature=1.0)]
    probs = probs_of(logits, reqs)
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], dim=-1))


# ---------------------------------------------------------------------------------------------
# Logit processing: bias, min_tokens, penalties
# ---------------------------------------------------------------------------------------------


def test_repetition_presence_frequency_penalties_exact() -> None:
    logits = torch.tensor([[1.5, -2.0, 0.8, -0.4, 2.2, 0.0, -1.0, 0.3]]).repeat(4, 1)
    prompt, output = [1, 2, 2], [3, 3, 4, 3]  # seen: 1, 2, 3, 4; output counts: 3 x3, 4 x1
    reqs = [
        make_row(prompt, output, repetition_penalty=1.3),
        make_row(prompt, output, presence_penalty=0.5, frequency_penalty=0.25),
        make_row(prompt, output, repetition_penalty=0.8, presence_penalty=-0.5,
                 frequency_penalty=1.5),
        make_row(prompt, output),
    ]
    got = processed(logits, reqs)

    def rep(x: float, p: float) -> float:
        return x / p if x > 0 else x * p

    base = logits[0].tolist()
    counts = {3: 3, 4: 1}
    expected_rep = [rep(x, 1.3) if t in (1, 2, 3, 4) else x for t, x in enumerate(base)]
    expected_pf = [
        x - 0.25 * counts.get(t, 0) - (0.5 if t in counts else 0.0) for t, x in enumerate(base)
    ]
    expected_all = [rep(x, 0.8) if t in (1, 2, 3, 4) else x for t, x in enumerate(base)]
    expected_all = [
        x - 1.5 * counts.get(t, 0) + (0.5 if t in counts else 0.0)
        for t, x in enumerate(expected_all)
    ]
    expected = torch.tensor([expected_rep, expected_pf, expected_all, base])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[3], logits[3])  # rows without penalties are untouched, bit for bit


def test_penalty_changes_the_greedy_token() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    plain = sample(Sampler(), logits, [make_row(output=[0], temperature=0.0)])
    penalised = sample(
        Sampler(), logits, [make_row(output=[0], temperature=0.0, frequency_penalty=0.2)]
    )
    assert plain.sampled_token_ids == [0]
    assert penalised.sampled_token_ids == [1]


def test_logit_bias_is_added() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0
    reqs = [
        make_row(temperature=0.0, logit_bias={"7": 6.0, 3: -1.5, 999: 100.0}),
        make_row(temperature=0.0),
    ]
    got = processed(logits, reqs)
    expected = logits.clone()
    expected[0, 7] += 6.0
    expected[0, 3] -= 1.5  # id 999 is outside the vocabulary and ignored
    assert torch.equal(got, expected)
    assert sample(Sampler(), logits, reqs).sampled_token_ids == [7, 3]


def test_min_tokens_blocks_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 4.0, 0.5, 0.0, 0.0, 0.0, 5.0]])

    def request(num_outputs: int) -> SamplingRow:
        row = make_row(
            output=[1] * num_outputs, temperature=0.0, min_tokens=2, stop_token_ids=[2]
        )
        row.params.all_stop_token_ids.add(7)  # the engine adds EOS
        return row

    got = processed(logits, [request(1)])
    assert got[0, 2] == -math.inf and got[0, 7] == -math.inf
    assert torch.equal(got[0, :2], logits[0, :2])
    assert sample(Sampler(), logits, [request(0)]).sampled_token_ids == [1]
    assert sample(Sampler(), logits, [request(1)]).sampled_token_ids == [1]
    assert sample(Sampler(), logits, [request(2)]).sampled_token_ids == [7]
    # A sampled row never draws a blocked id either.
    reqs = [
        make_row(output=[1], min_tokens=2, stop_token_ids=[2, 7]) for i in range(500)
    ]
    drawn = set(sample(Sampler(), logits.repeat(500, 1), reqs).sampled_token_ids)
    assert not drawn & {2, 7}


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def _run_steps(
    batches: list[list[str]],
    step_logits: dict[str, list[torch.Tensor]],
    sampler: Sampler,
    params: dict[str, dict[str, object]],
) -> dict[str, list[int]]:
    """Decode one step per entry of ``batches`` (the row order at that step).

    A sequence's k-th step always sees ``step_logits[name][k]``, whichever batch it is in; its
    row keeps its generator from step to step, as the runner keeps a request's.
    """
    first = {name: make_row(**params[name]) for name in params}
    tokens: dict[str, list[int]] = {name: [] for name in params}
    for order in batches:
        logits = torch.stack([step_logits[name][len(tokens[name])] for name in order])
        rows = [replace(first[name], token_ids=[1, 2, *tokens[name]]) for name in order]
        out = sample(sampler, logits, rows)
        for name, token_id in zip(order, out.sampled_token_ids, strict=True):
            tokens[name].append(token_id)
    return tokens


def _only(tokens: list[int], vocab: int) -> torch.Tensor:
    """A [1, ceil(V/32)] int32 grammar bitmask allowing ``tokens``."""
    bits = torch.zeros(-(-vocab // 32) * 32, dtype=torch.int64)
    bits[tokens] = 1
    words = (bits.view(-1, 32) << torch.arange(32)).sum(dim=1)  # [W] as unsigned 32-bit
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)[None]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_that_allows_only_stop_ids_wins_over_min_tokens(temperature: float) -> None:
    """min_tokens bans the stop ids; where a row's grammar allows nothing but stop ids (JSON's
    '{' listed in stop_token_ids), the grammar wins and one of them is sampled, not a token
    both forbid (token 0, then a grammar error: found by the soak). Where the grammar allows
    another token, the ban holds."""
    from heron.engine.sampling_batch import GrammarMask

    vocab = 40
    logits = torch.zeros(2, vocab)
    logits[:, 0] = 5.0  # the best token is one no grammar allows
    logits[:, 9] = 3.0
    rows = [make_row(temperature=temperature, seed=1, stop_token_ids=[9, 11], min_tokens=3),
            make_row(temperature=temperature, seed=2, stop_token_ids=[9], min_tokens=3)]
    grammar = GrammarMask(torch.cat([_only([9, 11], vocab), _only([9, 33], vocab)]), [0, 1])
    batch = SamplingBatch.build(rows, vocab, CPU, grammar)
    for _ in range(20):
        first, second = Sampler()(logits, batch).sampled_token_ids
        assert first in (9, 11) and second == 33


def test_seeded_rows_reproducible_across_batches_and_orders() -> None:
    gen = torch.Generator().manual_seed(4)
    steps, vocab = 6, 64
    names = ["A", "B", "U", "G"]
    step_logits = {n: [torch.randn(vocab, generator=gen) for _ in range(steps)] for n in names}
    params: dict[str, dict[str, object]] = {
        "A": {"seed": 1234, "temperature": 1.0, "top_p": 0.95},
        "B": {"seed": 99, "temperature": 1.2, "top_k": 20},
        "U": {"temperature": 1.0},
        "G": {"temperature": 0.0},
    }
    alone = _run_steps([["A"]] * steps, step_logits, Sampler(seed=0), {"A": params["A"]})
    mixed_orders = [
        ["A", "B", "U", "G"],
        ["G", "U", "B", "A"],
        ["B", "A"],
        ["U", "A", "G", "B"],
        ["A", "G"],
        ["G", "B", "A", "U"],
    ]
    mixed = _run_steps(mixed_orders, step_logits, Sampler(seed=42), params)
    assert mixed["A"] == alone["A"]
    assert len(mixed["B"]) == steps - 1  # B sat out one step
    b_alone = _run_steps([["B"]] * (steps - 1), step_logits, Sampler(seed=1), {"B": params["B"]})
    assert mixed["B"] == b_alone["B"]
    other_seed = dict(params["A"], seed=1235)
    changed = _run_steps([["A"]] * steps, step_logits, Sampler(seed=0), {"A": other_seed})
    assert changed["A"] != alone["A"]


def test_a_seeded_row_draws_one_uniform_from_its_own_generator() -> None:
    row = make_row(seed=2**70 + 5, temperature=1.0)  # any int works as a seed
    assert row.generator is not None
    expected = torch.Generator().manual_seed((2**70 + 5) % 2**64)
    assert torch.equal(row.generator.get_state(), expected.get_state())
    sample(Sampler(), torch.zeros(1, 32), [row])
    torch.rand(1, generator=expected, dtype=torch.float64)  # one uniform per sampled step
    assert torch.equal(row.generator.get_state(), expected.get_state())
    # A greedy row draws nothing, even from a generator it was given.
    own = seeded_generator(3, CPU)
    before = own.get_state()
    greedy = SamplingRow(SamplingParams(temperature=0.0, seed=3), [1, 2], 2, own)
    assert sample(Sampler(), torch.arange(32.0).unsqueeze(0), [greedy]).sampled_token_ids == [31]
    assert torch.equal(own.get_state(), before)


def test_engine_generator_seeded_once() -> None:
    logits = torch.zeros(64, 1000)
    reqs = [make_row() for _ in range(64)]
    first = sample(Sampler(seed=11), logits, reqs).sampled_token_ids
    assert sample(Sampler(seed=11), logits, reqs).sampled_token_ids == first
    assert sample(Sampler(seed=12), logits, reqs).sampled_token_ids != first
    sampler = Sampler(seed=11)
    sample(sampler, logits, reqs)
    assert sample(sampler, logits, reqs).sampled_token_ids != first  # the generator advances


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax_with_ranks(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    # Distinct values k/16, exact in bfloat16, so that ranks have no ties.
    logits = torch.stack([torch.randperm(200, generator=gen) - 100 for _ in range(4)]) / 16
    logits = logits.to(dtype)
    low = int(logits[0].float().argsort()[20])  # 179 tokens above it: rank 180 of 200
    reqs = [
        # Bias forces a low-ranked token; logprobs still come from the raw logits.
        make_row(temperature=0.0, logprobs=5, logit_bias={low: 100.0}),
        make_row(temperature=1.0),
        make_row(temperature=0.7, top_k=10, logprobs=0, seed=3),
        make_row(temperature=1.0, logprobs=20, repetition_penalty=1.5),
    ]
    out = sample(Sampler(), logits, reqs)
    raw = torch.log_softmax(logits.float(), dim=-1)  # [4, 200]
    assert out.sampled_token_ids[0] == low
    assert out.logprobs[1] is None
    for row, k in ((0, 5), (2, 0), (3, 20)):
        entry = out.logprobs[row]
        assert entry is not None
        sampled = out.sampled_token_ids[row]
        top = raw[row].topk(k).indices.tolist() if k else []
        assert list(entry) == [sampled] + [t for t in top if t != sampled]
        for rank, token_id in enumerate(top, start=1):
            assert entry[token_id].rank == rank
        true_rank = int((raw[row] > raw[row, sampled]).sum()) + 1
        assert entry[sampled].rank == true_rank
        for token_id, lp in entry.items():
            assert lp.logprob == pytest.approx(raw[row, token_id].item(), abs=1e-6)
    assert out.logprobs[0][low].rank == 180


def test_logprobs_list_the_sampled_token_first() -> None:
    """At temperature 2 most draws are not the argmax: the entry still starts with the token
    the text shows, then the top alternatives (once each)."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(64, 50, generator=gen)
    rows = [make_row(temperature=2.0, logprobs=3, seed=i) for i in range(64)]
    out = sample(Sampler(), logits, rows)
    raw = torch.log_softmax(logits, dim=-1)  # [64, 50]
    not_argmax = 0
    for i, entry in enumerate(out.logprobs):
        assert entry is not None
        token = out.sampled_token_ids[i]
        top = raw[i].topk(3).indices.tolist()
        assert list(entry) == [token] + [t for t in top if t != token]
        assert entry[token].logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert entry[token].rank == int((raw[i] > raw[i, token]).sum()) + 1
        not_argmax += token != top[0]
    assert not_argmax > 32, "most draws at temperature 2 are not the argmax"


def test_tied_top_logprobs_do_not_depend_on_the_batch() -> None:
    """Tokens tied in log-probability (common with bfloat16 logits) are listed in token order,
    whatever else is in the batch: torch.topk orders ties by its k, and a row's k is the
    largest any row of the step asks for (found by the soak: a row asking logprobs=1 listed
    token 435 beside a row asking 5 and token 8 alone, both at -6.0274)."""
    logits = torch.zeros(2, 64)
    logits[0, [8, 35, 50]] = 3.0  # a three-way tie for the top of row 0
    logits[1] = torch.arange(64) / 64
    greedy_8 = {8: 100.0}  # the sampled token is 8 in both runs: only the alternatives differ
    alone = sample(Sampler(), logits[:1], [make_row(temperature=0.0, logprobs=2,
                                                    logit_bias=greedy_8)])
    batch = sample(Sampler(), logits, [make_row(temperature=0.0, logprobs=2, logit_bias=greedy_8),
                                       make_row(temperature=0.0, logprobs=5)])
    assert list(alone.logprobs[0]) == list(batch.logprobs[0]) == [8, 35]
    ranks = [lp.rank for lp in batch.logprobs[0].values()]
    assert ranks == [1, 2]
    assert list(batch.logprobs[1])[:3] == [63, 62, 61]


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="logits"):
        sample(Sampler(), torch.zeros(2, 8), [make_row()])


# ---------------------------------------------------------------------------------------------
# The inverse-CDF draw itself
# ---------------------------------------------------------------------------------------------


def test_inverse_cdf_picks_the_first_token_above_u() -> None:
    gen = torch.Generator().manual_seed(6)
    vocab = 1300  # three blocks of 512, the last one padded
    probs = torch.rand(5, vocab, generator=gen) ** 8
    probs[torch.rand(5, vocab, generator=gen) < 0.5] = 0.0  # many zero-probability tokens
    probs[:, 1299] = 0.0
    probs[4] = 0.0
    probs[4, 700] = 1.0  # a single possible token
    probs /= probs.sum(dim=-1, keepdim=True)
    cdf = probs.double().cumsum(dim=-1)  # [5, V]
    for _ in range(200):
        u = torch.rand(5, generator=gen, dtype=torch.float64)
        expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        got = _inverse_cdf(probs, u)
        assert torch.equal(got, expected)
        assert bool((probs[torch.arange(5), got] > 0).all())
    # u just below 1 (and a rounding overshoot) lands on the last positive token, not on a zero.
    last_positive = [int(torch.nonzero(row).max()) for row in probs]
    top = torch.full((5,), 1.0 - 2.0**-53, dtype=torch.float64)
    assert _inverse_cdf(probs, top).tolist() == last_positive
    assert _inverse_cdf(probs, torch.ones(5, dtype=torch.float64)).tolist() == last_positive
    assert _inverse_cdf(probs, torch.zeros(5, dtype=torch.float64)).tolist() == [
        int(torch.nonzero(row).min()) for row in probs
    ]


def test_non_contiguous_logits_give_the_same_tokens() -> None:
    gen = torch.Generator().manual_seed(9)
    strided = torch.randn(700, 3, generator=gen).t()  # [3, 700], not contiguous
    assert not strided.is_contiguous()

    def batch() -> list[SamplingRow]:
        return [
            make_row(temperature=0.0, presence_penalty=0.5, output=[1]),
            make_row(top_p=0.5, top_k=30, seed=1, logprobs=2),
            make_row(min_p=0.1, seed=2),
        ]

    got = sample(Sampler(), strided, batch())
    expected = sample(Sampler(), strided.contiguous(), batch())
    assert got.sampled_token_ids == expected.sampled_token_ids
    assert got.logprobs == expected.logprobs


def test_nan_logits_give_in_range_ids_not_a_crash() -> None:
    logits = torch.full((3, 700), math.nan)
    reqs = [make_row(), make_row(top_p=0.5, top_k=3), make_row(min_p=0.1)]
    out = sample(Sampler(), logits, reqs)
    assert all(0 <= t < 700 for t in out.sampled_token_ids)
