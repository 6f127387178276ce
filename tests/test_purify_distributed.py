"""A real two-process run (torchrun, gloo on CPU): both processes make the same purification decisions, from the
whole batch, and keep identical router state."""

import pytest
import torch

from conftest import torchrun
from trl_ext.purify.signal import ranking_agreement


def assert_identical(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    else:
        assert a == b, path


@pytest.mark.slow
def test_two_ranks_purify_identically(tmp_path, student_path, teacher_path):
    torchrun("purify_two_ranks.py", str(tmp_path), timeout=600)
    for purification in ("rl_selection", "classifier_router"):
        rank0, rank1 = (torch.load(tmp_path / f"{purification}-rank{r}.pt", weights_only=False) for r in (0, 1))
        assert rank0["world_size"] == rank1["world_size"] == 2 and "MULTI_CPU" in rank0["distributed_type"]
        assert len(rank0["rollouts"]) == len(rank1["rollouts"]) == 3
        decisive = 0
        for r0, r1 in zip(rank0["rollouts"], rank1["rollouts"]):
            # The purifier's whole input is the gathered batch: the same on both ranks ...
            for key in ("teacher_seq_logps", "features", "signal", "rewards"):
                assert_identical(r0[key], r1[key], key)
            # ... and it is the union of the two ranks' rows, in rank order (groups span the ranks: 6 rows each).
            union = torch.cat([r0["local_teacher_seq_logps"], r1["local_teacher_seq_logps"]], dim=1)
            assert r0["local_teacher_seq_logps"].shape == (3, 6)
            torch.testing.assert_close(r0["teacher_seq_logps"], union)
            torch.testing.assert_close(r0["signal"], ranking_agreement(union, r0["rewards"], 4), equal_nan=True)
            # Each rank decides the same on its own (the RL selector SAMPLES its choices during training, from a
            # generator in its synced state), so rank 0's broadcast only guards against float drift; both train on it.
            assert_identical(r0["decided_weights"], r1["decided_weights"], "decided_weights")
            assert_identical(r1["decided_weights"], r1["weights"], "broadcast")
            assert_identical(r0["weights"], r1["weights"], "weights")
            decisive += int((~torch.isnan(r0["signal"]).any(dim=1)).sum())
        assert decisive >= 2, "precondition: the routers had prompts to learn from"
        # Routers learned online and stayed identical.
        assert_identical(rank0["purifier"], rank1["purifier"], purification)
        if purification == "classifier_router":
            assert rank0["purifier"]["memory"]["seen"] >= 1
        else:
            assert any("purify/rl_improvement" in entry for entry in rank0["log_history"])
        assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)
