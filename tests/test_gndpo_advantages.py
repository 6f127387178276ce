"""GNDPO's advantage function against values computed by hand."""

import math

import pytest
import torch

from trl_ext.core.stats import masked_moments
from trl_ext.gndpo import distillation_scores, gndpo_advantages, normalize_scores

# Two completions; the second has one padding token. Raw log-ratios teacher - student:
#   [[1, -1, -9], [0, 7, (3 = padding)]]  -> clipped at 5: [[1, -1, -5], [0, 5, 0]]
TEACHER = torch.tensor([[-1.0, -2.0, -10.0], [-0.5, 0.0, 0.0]])
STUDENT = torch.tensor([[-2.0, -1.0, -1.0], [-0.5, -7.0, -3.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def simulate_ranks(rows_per_rank, fn):
    """Run `fn(rank_rows, reduce_sum)` as if each slice of rows lived on its own process.

    First pass: record each rank's local moments. Second pass: every rank's reduce_sum returns their total,
    which is exactly what an all-reduce gives.
    """
    recorded = []

    def record(local):
        recorded.append(local.clone())
        return local

    for rows in rows_per_rank:
        fn(rows, record)
    calls_per_rank = len(recorded) // len(rows_per_rank)
    results = []
    for rank, rows in enumerate(rows_per_rank):
        call = iter(range(calls_per_rank))

        def all_reduce(local, _call=call):
            i = next(_call)
            return sum(recorded[r * calls_per_rank + i] for r in range(len(rows_per_rank)))

        results.append(fn(rows, all_reduce))
    return results


def test_scores_are_clipped_log_ratios_zero_on_padding():
    scores = distillation_scores(TEACHER, STUDENT, MASK, score_clip=5.0)
    torch.testing.assert_close(scores, torch.tensor([[1.0, -1.0, -5.0], [0.0, 5.0, 0.0]]))


def test_global_normalization_by_hand():
    # Valid clipped scores: 1, -1, -5, 0, 5 -> mean 0, sum of squares 52, unbiased variance 52 / 4 = 13.
    result = gndpo_advantages(TEACHER, STUDENT, MASK, score_clip=5.0)
    s = math.sqrt(13.0 + 1e-8)
    expected = torch.tensor([[1 / s, -1 / s, -5 / s], [0.0, 5 / s, 0.0]])
    torch.testing.assert_close(result.advantages, expected)
    assert result.score_moments.mean.item() == pytest.approx(0.0)
    assert result.score_moments.var.item() == pytest.approx(13.0)
    # |raw| > 5 on two of five valid tokens (-9 and 7); the padding token's raw 3 does not count.
    assert result.clipped_fraction.item() == pytest.approx(2 / 5)
    # k1 estimate of KL(student || teacher): mean of (student - teacher) = (-1 + 1 + 9 + 0 - 7) / 5.
    assert result.reverse_kl.item() == pytest.approx(0.4)


def test_clip_happens_before_normalization():
    # Normalizing the raw ratios and clipping afterwards would give a non-zero mean (raw mean is -0.4).
    raw = (TEACHER - STUDENT) * MASK
    raw_moments = masked_moments(raw, MASK)
    assert raw_moments.mean.item() == pytest.approx(-0.4)
    result = gndpo_advantages(TEACHER, STUDENT, MASK, score_clip=5.0)
    assert result.score_moments.mean.item() == pytest.approx(0.0)


def test_variance_is_unbiased_and_padding_excluded():
    scores = torch.tensor([[2.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    normalized, moments = normalize_scores(scores, mask)
    # mean 3, unbiased variance ((2-3)^2 + (4-3)^2) / (2 - 1) = 2; the padded 100 is ignored.
    assert moments.mean.item() == pytest.approx(3.0)
    assert moments.var.item() == pytest.approx(2.0)
    torch.testing.assert_close(normalized, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]))


def test_opd_baseline_uses_clipped_scores():
    result = gndpo_advantages(TEACHER, STUDENT, MASK, score_clip=5.0, normalization="none")
    torch.testing.assert_close(result.advantages, torch.tensor([[1.0, -1.0, -5.0], [0.0, 5.0, 0.0]]))


def test_score_clip_changes_the_scores():
    result = gndpo_advantages(TEACHER, STUDENT, MASK, score_clip=2.0, normalization="none")
    torch.testing.assert_close(result.advantages, torch.tensor([[1.0, -1.0, -2.0], [0.0, 2.0, 0.0]]))


def test_split_across_two_ranks_equals_one_process():
    single = gndpo_advantages(TEACHER, STUDENT, MASK)

    def on_rank(rows, reduce_sum):
        return gndpo_advantages(TEACHER[rows], STUDENT[rows], MASK[rows], reduce_sum=reduce_sum)

    rank0, rank1 = simulate_ranks([slice(0, 1), slice(1, 2)], on_rank)
    for part in (rank0, rank1):
        assert part.score_moments.mean.item() == pytest.approx(single.score_moments.mean.item())
        assert part.score_moments.var.item() == pytest.approx(single.score_moments.var.item())
        assert part.clipped_fraction.item() == pytest.approx(single.clipped_fraction.item())
        assert part.reverse_kl.item() == pytest.approx(single.reverse_kl.item())
    torch.testing.assert_close(torch.cat([rank0.advantages, rank1.advantages]), single.advantages)


def test_per_process_normalization_would_differ():
    # Guard for the test above: normalizing each rank alone gives different advantages, so the equality is not
    # an accident of the data.
    alone = gndpo_advantages(TEACHER[:1], STUDENT[:1], MASK[:1])
    single = gndpo_advantages(TEACHER, STUDENT, MASK)
    assert not torch.allclose(alone.advantages, single.advantages[:1])


def test_empty_and_single_token_batches_are_finite():
    empty = gndpo_advantages(TEACHER, STUDENT, torch.zeros_like(MASK))
    assert torch.equal(empty.advantages, torch.zeros_like(MASK))
    one = torch.zeros_like(MASK)
    one[0, 0] = 1
    single = gndpo_advantages(TEACHER, STUDENT, one)
    assert torch.isfinite(single.advantages).all()
    assert single.advantages[0, 0].item() == pytest.approx(0.0)  # s - mean = 0, variance defined as 0


def test_unknown_normalization_raises():
    with pytest.raises(ValueError, match="group"):
        gndpo_advantages(TEACHER, STUDENT, MASK, normalization="group")
