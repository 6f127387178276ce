"""Reference-reset rules (trl_ext.core.reset_triggers) and the reset operations, without a trainer."""

import math

import pytest
import torch

from trl_ext.core.reference_reset import (
    ReferenceResetCallback,
    copy_parameters,
    innermost_optimizer,
    reset_optimizer_state,
)
from trl_ext.core.reset_triggers import KL_SHARE, SCHEDULE, VALIDATION, ResetSchedule, ResetTriggers, kl_share


def test_kl_share_by_hand():
    assert kl_share(beta=0.1, kl=2.0, advantage_scale=0.8) == pytest.approx(0.2 / 1.0)
    assert kl_share(beta=1e-4, kl=0.0, advantage_scale=0.8) == 0.0
    assert kl_share(beta=1.0, kl=0.5, advantage_scale=0.0) == 1.0  # no policy signal: the loss is all KL
    assert math.isnan(kl_share(beta=1.0, kl=0.0, advantage_scale=0.0))
    assert math.isnan(kl_share(beta=1.0, kl=math.nan, advantage_scale=1.0))


def test_schedule_trigger():
    triggers = ResetTriggers(ResetSchedule(every_steps=3))
    assert [triggers.after_step(s) for s in range(1, 8)] == [None, None, SCHEDULE, None, None, SCHEDULE, None]


def test_validation_trigger_after_patience_without_improvement():
    triggers = ResetTriggers(ResetSchedule(metric="reward", patience=2, min_delta=0.01))
    evaluations = [0.50, 0.505, 0.60, 0.60, 0.59]
    reasons = [triggers.after_validation({"eval_reward": v}) for v in evaluations]
    # 0.505 is within min_delta of 0.50 (stall 1); 0.60 improves; 0.60 (stall 1); 0.59 (stall 2) -> reset
    assert reasons == [None, None, None, None, VALIDATION]
    assert triggers.best == 0.60
    triggers.reset_done()
    assert triggers.stalled == 0 and triggers.best == 0.60  # a new run must beat the best so far


def test_validation_trigger_lower_is_better_and_missing_metric():
    triggers = ResetTriggers(ResetSchedule(metric="eval_loss", patience=1, greater_is_better=False))
    assert triggers.after_validation({"eval_loss": 1.0}) is None
    assert triggers.after_validation({"eval_loss": 0.9}) is None
    assert triggers.after_validation({"eval_loss": 0.95}) == VALIDATION
    with pytest.raises(KeyError, match="eval_loss.*ref_reset_metric"):
        triggers.after_validation({"eval_reward": 1.0})


def test_kl_share_trigger_needs_consecutive_steps():
    triggers = ResetTriggers(ResetSchedule(kl_share_threshold=0.5, kl_patience=2))
    shares = [0.6, 0.4, 0.6, math.nan, 0.7, 0.9]
    # 0.6 (streak 1), 0.4 (0), 0.6 (1), NaN (no measurement, streak kept), 0.7 (2) -> reset, ...
    assert [triggers.after_step(s, share) for s, share in enumerate(shares, 1)] == [
        None, None, None, None, KL_SHARE, KL_SHARE]
    triggers.reset_done()
    assert triggers.after_step(7, 0.9) is None  # streak restarts after a reset


def test_trigger_state_round_trip():
    triggers = ResetTriggers(ResetSchedule(metric="reward", kl_share_threshold=0.5, kl_patience=3))
    triggers.after_validation({"reward": 0.3})
    triggers.after_validation({"reward": 0.2})
    triggers.after_step(1, 0.9)
    restored = ResetTriggers(triggers.schedule)
    restored.load_state_dict(triggers.state_dict())
    assert (restored.best, restored.stalled, restored.kl_streak) == (0.3, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_steps": 0}, "every_steps"),
        ({"metric": "reward", "patience": 0}, "patience"),
        ({"kl_share_threshold": 1.5}, "kl_share_threshold"),
        ({"kl_share_threshold": 0.5, "kl_patience": 0}, "kl_patience"),
        ({"min_delta": -1.0}, "min_delta"),
    ],
)
def test_bad_schedule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResetSchedule(**kwargs)


def test_callback_needs_a_trigger():
    with pytest.raises(ValueError, match="at least one trigger"):
        ReferenceResetCallback(ResetSchedule())


def test_copy_parameters_and_fresh_adam_state():
    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert copy_parameters(policy, reference) == 2
    for p, q in zip(policy.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="same architecture"):
        copy_parameters(policy, torch.nn.Sequential(torch.nn.Linear(3, 2)))

    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.1)
    policy(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert all(optimizer.state[p]["step"] == 1 for p in policy.parameters())
    reset_optimizer_state(optimizer)
    assert len(optimizer.state) == 0
    optimizer.step()  # re-initialised lazily, as a new optimizer would be
    assert all(optimizer.state[p]["step"] == 1 for p in policy.parameters())
    assert all(torch.all(optimizer.state[p]["exp_avg_sq"] > 0) for p in policy.parameters())


def test_innermost_optimizer_unwraps_wrappers():
    from accelerate.optimizer import AcceleratedOptimizer

    inner = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    wrapped = object.__new__(AcceleratedOptimizer)  # accelerate's wrapper, without an Accelerator around it
    wrapped.optimizer = inner
    assert innermost_optimizer(wrapped) is inner
    with pytest.raises(TypeError, match="ref_reset_optimizer=False"):
        innermost_optimizer(object())
