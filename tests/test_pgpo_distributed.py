"""Two real processes (torchrun, gloo on CPU) agree on PGPO's I_k and m_k, which are those of the whole step."""

import math

import pytest
import torch

from conftest import torchrun
from trl_ext.pgpo.information import mutual_information, verified_information
from trl_ext.pgpo.trainer import CORRECTION, JOINT, TOKENS, VERIFIED


def information_of(stats, estimator, buckets):
    if estimator == "correction":
        return (stats[CORRECTION] / stats[TOKENS]).item()
    if estimator == "verified":
        value = verified_information(stats[VERIFIED].view(2, 2))
        return None if value is None else value.item()
    side = math.isqrt(stats.numel() - JOINT)  # min(agreement_buckets, vocabulary) + the tail bucket
    return mutual_information(stats[JOINT:].view(side, side)).item()


ESTIMATORS = ("agreement", "correction", "verified")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, student_path):
    """One two-process launch trains with each estimator in turn."""
    out_dir = tmp_path_factory.mktemp("pgpo_two_ranks")
    torchrun("pgpo_two_ranks.py", str(out_dir), *ESTIMATORS)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_ranks_agree_on_the_step_multiplier(two_rank_runs, estimator):
    rank0, rank1 = (torch.load(two_rank_runs / f"{estimator}_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world_size"] == 2 and len(rank0["steps"]) == len(rank1["steps"]) == 3
    differs_from_local = False
    for s0, s1 in zip(rank0["steps"], rank1["steps"]):
        assert s0["multiplier"] == s1["multiplier"] and s0["lr"] == s1["lr"]
        assert s0["information"] == s1["information"]
        union = s0["local"] + s1["local"]
        if union[TOKENS] == 0:
            assert s0["information"] is None
            continue
        # I_k is that of both ranks' tokens together (each rank's statistics already span its micro-batches) ...
        whole = information_of(union, estimator, rank0["buckets"])
        assert s0["information"] == (None if whole is None else pytest.approx(whole, rel=1e-9))
        # ... not of either rank alone.
        for local in (s0["local"], s1["local"]):
            alone = information_of(local, estimator, rank0["buckets"]) if local[TOKENS] > 0 else None
            if alone is not None and whole is not None:
                differs_from_local |= abs(alone - whole) > 1e-6
    assert any(s["information"] is not None for s in rank0["steps"])
    if estimator != "verified":  # the verified 2 x 2 counts are often perfectly separated (U = 1) on every rank
        assert differs_from_local
        assert any(s["multiplier"] != 1.0 for s in rank0["steps"][1:])
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)  # DDP kept the replicas identical
    # Both ranks' micro-batches filled the last generation batch's table rows, the same on both ranks.
    assert len(rank0["teacher_advantages"]) == rank0["rows"] == 16
    assert None not in rank0["teacher_advantages"] and rank0["teacher_advantages"] == rank1["teacher_advantages"]
