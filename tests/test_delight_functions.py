"""Delight, weights, gate rules and survivor packing against values computed by hand."""

import math

import pytest
import torch

from trl_ext.delight import (
    KondoGate,
    concat_rows,
    delight_weights,
    gate_decisions,
    masked,
    pack_survivors,
    quantile_price,
    sequence_delight,
    surprisal,
    take_rows,
    token_delight,
)
from trl_ext.delight.packing import survivor_chunk_sizes


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_token_delight_and_weights_by_hand():
    logps = torch.tensor([[-2.0, -0.5], [-1.0, -3.0]])
    advantages = torch.tensor([0.5, -1.0])
    chi = token_delight(advantages, surprisal(logps))
    torch.testing.assert_close(chi, torch.tensor([[1.0, 0.25], [-1.0, -3.0]]))
    weights = delight_weights(chi, eta=1.0, price=0.0)
    expected = torch.tensor([[sigmoid(1.0), sigmoid(0.25)], [sigmoid(-1.0), sigmoid(-3.0)]])
    torch.testing.assert_close(weights, expected)
    # eta and price: sigmoid((chi - lambda) / eta)
    torch.testing.assert_close(delight_weights(chi, eta=2.0, price=1.0)[0, 0], torch.tensor(sigmoid(0.0)))
    # Rare failure (negative advantage, surprising token) is suppressed; rare success is kept.
    assert weights[1, 1] < 0.05 and weights[0, 0] > 0.7


def test_surprisal_is_detached():
    logps = torch.tensor([-1.0], requires_grad=True)
    assert not surprisal(logps).requires_grad


def test_stochastic_weights_are_bernoulli_with_the_sigmoid_probability():
    chi = torch.full((20000,), 0.5)
    draws = delight_weights(chi, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(sigmoid(0.5), abs=0.01)
    again = delight_weights(chi, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sequence_delight_is_token_mean_over_valid_tokens():
    chi = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(sequence_delight(chi, mask), torch.tensor([2.0, 0.0]))


def test_non_finite_log_probs_on_masked_tokens_stay_out():
    """vLLM's sampler log-probs can be NaN (or -inf) on padding; NaN * 0 = NaN, so masking must select."""
    nan, inf = float("nan"), float("inf")
    logps = torch.tensor([[-1.0, nan, -inf], [-0.5, -1.5, nan]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    chi = token_delight(torch.tensor([2.0, -1.0]), surprisal(logps))  # [[2, nan, inf], [-0.5, -1.5, nan]]
    torch.testing.assert_close(masked(chi, mask), torch.tensor([[2.0, 0.0, 0.0], [-0.5, -1.5, 0.0]]))
    torch.testing.assert_close(sequence_delight(chi, mask), torch.tensor([2.0, -1.0]))


def test_non_finite_delight_never_passes_a_gate():
    chi = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0, -1.0])
    assert gate_decisions(chi, "threshold", price=0.0).tolist() == [False, False, False, True, False]
    assert gate_decisions(chi, "pass_rate", price=-5.0).tolist() == [False, False, False, True, True]
    keep = gate_decisions(chi, "price", price=0.0, eta=1e-3, generator=torch.Generator().manual_seed(0))
    assert keep.tolist() == [False, False, False, True, False]  # sigmoid(+inf) = 1 would always pass
    assert gate_decisions(chi, "none").all()  # no gate: everything is kept, as without trl_ext's gate


def test_non_finite_delight_stays_out_of_the_pass_rate_history():
    nan, inf = float("nan"), float("inf")
    gate = KondoGate("pass_rate", price=0.0, eta=1.0, pass_rate=0.5, history_size=8, seed=0)
    # History [1, 2, 3]: the median price is 2, and only 3 passes (NaN and inf never do).
    assert gate.decide(torch.tensor([nan, 1.0, 2.0, 3.0, inf])).tolist() == [False, False, False, True, False]
    assert list(gate.history) == [1.0, 2.0, 3.0] and gate.last_price == 2.0
    # A clean batch afterwards still gates normally: history [1, 2, 3, 0, 4], median 2.
    assert gate.decide(torch.tensor([0.0, 4.0])).tolist() == [False, True]
    assert gate.last_price == 2.0


def test_pass_rate_gate_with_no_finite_delight_yet_keeps_nothing():
    gate = KondoGate("pass_rate", price=0.0, eta=1.0, pass_rate=0.5, history_size=8, seed=0)
    assert gate.decide(torch.tensor([float("nan"), float("-inf")])).tolist() == [False, False]
    assert not gate.history and gate.last_price == float("inf")
    everything = KondoGate("pass_rate", price=0.0, eta=1.0, pass_rate=1.0, history_size=8, seed=0)
    assert everything.decide(torch.tensor([float("nan"), 0.5])).tolist() == [False, True]


def test_gate_rules_by_hand():
    chi = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    assert gate_decisions(chi, "none").all()
    assert gate_decisions(chi, "threshold", price=0.0).tolist() == [False, False, True, True]
    assert gate_decisions(chi, "threshold", price=1.0).tolist() == [False, False, False, True]
    # 'price': Bernoulli(sigmoid((chi - lambda) / eta)); with many copies the pass rates match the sigmoid.
    many = chi.repeat(5000)
    keep = gate_decisions(many, "price", price=0.5, eta=0.5, generator=torch.Generator().manual_seed(1))
    rates = keep.view(5000, 4).float().mean(0)
    for rate, value in zip(rates.tolist(), chi.tolist()):
        assert rate == pytest.approx(sigmoid((value - 0.5) / 0.5), abs=0.02)
    with pytest.raises(ValueError, match="Unknown gate rule"):
        gate_decisions(chi, "auction")


def test_quantile_price():
    history = torch.arange(10, dtype=torch.float64)  # 0..9
    assert quantile_price(history, 0.2).item() == pytest.approx(7.2)  # the 80th percentile
    assert quantile_price(history, 1.0).item() == pytest.approx(0.0)


def test_pass_rate_gate_tracks_its_target_and_survives_a_restart():
    gate = KondoGate("pass_rate", price=0.0, eta=1.0, pass_rate=0.25, history_size=400, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(40, generator=generator) for _ in range(12)]
    rates = [gate.decide(batch).float().mean().item() for batch in batches[:10]]
    assert sum(rates) / len(rates) == pytest.approx(0.25, abs=0.05)
    restored = KondoGate("pass_rate", price=0.0, eta=1.0, pass_rate=0.25, history_size=400, seed=0)
    restored.load_state_dict(gate.state_dict())
    for batch in batches[10:]:
        assert torch.equal(gate.decide(batch), restored.decide(batch))
        assert gate.last_price == restored.last_price


def test_price_gate_draws_are_reproducible_after_restore():
    gate = KondoGate("price", price=0.0, eta=1.0, pass_rate=1.0, history_size=8, seed=3)
    chi = torch.zeros(64)
    gate.decide(chi)
    restored = KondoGate("price", price=0.0, eta=1.0, pass_rate=1.0, history_size=8, seed=3)
    restored.load_state_dict(gate.state_dict())
    assert torch.equal(gate.decide(chi), restored.decide(chi))


def test_survivor_chunk_sizes_are_the_packings():
    assert survivor_chunk_sizes(5, 4, 2) == [0, 0, 3, 2]
    assert survivor_chunk_sizes(1, 3, 2) == [0, 1, 0]  # a rank with fewer survivors than compute chunks
    assert survivor_chunk_sizes(0, 2, 1) == [0, 0]


def test_pack_survivors_fills_the_last_chunks():
    keep = torch.tensor([0, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    chunks = pack_survivors(keep, num_chunks=4, compute_chunks=2)
    assert [c.tolist() for c in chunks] == [[], [], [1, 3], [4]]
    assert [c.tolist() for c in pack_survivors(keep, 4, 4)] == [[1], [3], [4], []]
    assert [c.tolist() for c in pack_survivors(torch.zeros(4, dtype=torch.bool), 2, 0)] == [[], []]
    with pytest.raises(ValueError):
        pack_survivors(keep, 2, 0)


def test_concat_and_take_rows_round_trip():
    chunks = [
        {"ids": torch.tensor([[1, 2], [3, 4]]), "n": torch.tensor(7), "names": ["a", "b"], "none": None},
        {"ids": torch.tensor([[5, 6], [7, 8]]), "n": torch.tensor(7), "names": ["c", "d"], "none": None},
    ]
    rows = concat_rows(chunks)
    assert rows["ids"].shape == (4, 2) and rows["names"] == ["a", "b", "c", "d"] and rows["n"].item() == 7
    picked = take_rows(rows, torch.tensor([3, 0]))
    assert picked["ids"].tolist() == [[7, 8], [1, 2]] and picked["names"] == ["d", "a"]
    assert picked["n"].item() == 7 and picked["none"] is None
