"""PGPO's pure functions against hand-computed values: contexts, divergences, information, step size."""

import math

import pytest
import torch

from trl_ext.pgpo.context import (
    Templates,
    assign_contexts,
    demonstration_text,
    reprompt_text,
    strip_thinking,
    teacher_prompt,
)
from trl_ext.pgpo.divergences import clipped_importance_weights, generalized_jsd, kl, shared_support, tail_log_mass
from trl_ext.pgpo.information import (
    agreement_joint,
    correction_information,
    mutual_information,
    top1_agreement,
    uncertainty_coefficient,
    verified_information,
    verified_joint,
)
from trl_ext.pgpo.step_size import StepSizeController, step_size_multiplier, update_running_mean


# ----- contexts ------------------------------------------------------------------------------------------------
def test_assign_contexts_by_hand():
    # Three groups of 4: one success (index 0), none, two successes (8, 9). Feedback on 4, 6, 7, 8.
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    feedback = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0]).bool()
    a = assign_contexts(rewards, feedback, num_generations=4, success_threshold=0.5)
    # The success is never its own demonstration: 0 has no other success; 8 is shown 9 and 9 is shown 8.
    assert a.demonstration.tolist() == [-1, 0, 0, 0, -1, -1, -1, -1, 9, 8, 8, 8]
    # Feedback only where no demonstration exists (8 has feedback but a demonstration).
    assert a.use_feedback.tolist() == [False] * 4 + [True, False, True, True] + [False] * 4
    assert a.usable.tolist() == [False, True, True, True, True, False, True, True, True, True, True, True]
    assert a.has_success.tolist() == [True] + [False] * 7 + [True, True, False, False]


def test_assign_contexts_options():
    rewards = torch.tensor([1.0, 0, 0.4, 0.6])
    feedback = torch.tensor([True, True, False, False])
    a = assign_contexts(rewards, feedback, 4, success_threshold=0.5, exclude_self=False,
                        feedback_only_without_solution=False)
    assert a.demonstration.tolist() == [0, 0, 0, 0]  # itself allowed; 0.4 is below the threshold, 0.6 is not first
    assert a.use_feedback.tolist() == [True, True, False, False]
    a = assign_contexts(rewards, feedback, 4, success_threshold=0.5, include_feedback=False)
    assert a.demonstration.tolist() == [3, 0, 0, 0] and not a.use_feedback.any()
    with pytest.raises(ValueError, match="multiple of 4"):
        assign_contexts(torch.zeros(6), torch.zeros(6).bool(), 4, 0.5)


def test_teacher_prompt_rewrites_the_last_user_turn():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4="}]
    out = teacher_prompt(prompt, solution="7", feedback=None)
    assert out[0] == prompt[0] and out[1]["role"] == "user"
    assert out[1]["content"] == "3+4=\nCorrect solution:\n\n7\n\n\n\nCorrectly solve the original question."
    feedback_only = reprompt_text("3+4=", None, "expected 7")
    assert feedback_only == ("3+4=\nThe following is feedback from your unsuccessful earlier attempt:\n\nexpected 7"
                             "\n\n\n\nCorrectly solve the original question.")
    plain = teacher_prompt("Q:", "A", "F", Templates(reprompt="[{prompt}|{solution}|{feedback}]",
                                                      solution="s={successful_previous_attempt}",
                                                      feedback="f={feedback_raw}"))
    assert plain == "[Q:|s=A|f=F]"
    assert teacher_prompt(prompt, None, None) is prompt  # nothing to show: no loss, no rewriting
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4="}]  # unchanged
    with pytest.raises(ValueError, match="last message has role 'assistant'"):
        teacher_prompt([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "7", None)


def test_strip_thinking():
    assert strip_thinking("<think>long\nthoughts</think> 42") == "42"
    assert strip_thinking("a<think>x</think>b<think>y</think>c") == "abc"


# ----- divergences -----------------------------------------------------------------------------------------------
P = [0.4, 0.3, 0.2, 0.1]  # student
Q = [0.1, 0.2, 0.3, 0.4]  # teacher


def _logs(values):
    return torch.tensor(values, dtype=torch.float64).log()


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def test_full_vocabulary_divergences_by_hand():
    p, q = _logs(P), _logs(Q)
    assert generalized_jsd(p, q, 0.0).item() == pytest.approx(_kl(Q, P))  # forward KL(q || p)
    assert generalized_jsd(p, q, 1.0).item() == pytest.approx(_kl(P, Q))  # reverse KL(p || q)
    alpha = 0.3
    m = [(1 - alpha) * a + alpha * b for a, b in zip(P, Q)]
    expected = (1 - alpha) * _kl(P, m) + alpha * _kl(Q, m)
    assert generalized_jsd(p, q, alpha).item() == pytest.approx(expected)
    assert generalized_jsd(p, p, 0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_topk_with_tail_bucket_by_hand():
    support = shared_support(_logs(P), _logs(Q), topk=2, add_tail=True)
    assert support.token_ids.tolist() == [0, 1]  # the STUDENT's top-2
    p_hat, q_hat = [0.4, 0.3, 0.3], [0.1, 0.2, 0.7]  # tail = 1 - top-k mass
    assert support.student.exp().tolist() == pytest.approx(p_hat)
    assert support.teacher.exp().tolist() == pytest.approx(q_hat)
    assert generalized_jsd(support.student, support.teacher, 0.0).item() == pytest.approx(_kl(q_hat, p_hat))
    assert generalized_jsd(support.student, support.teacher, 1.0).item() == pytest.approx(_kl(p_hat, q_hat))
    m = [0.5 * a + 0.5 * b for a, b in zip(p_hat, q_hat)]
    assert generalized_jsd(support.student, support.teacher, 0.5).item() == pytest.approx(
        0.5 * _kl(p_hat, m) + 0.5 * _kl(q_hat, m))


def test_topk_without_tail_renormalizes():
    support = shared_support(_logs(P), _logs(Q), topk=2, add_tail=False)
    assert support.student.exp().tolist() == pytest.approx([4 / 7, 3 / 7])
    assert support.teacher.exp().tolist() == pytest.approx([1 / 3, 2 / 3])
    full = shared_support(_logs(P), _logs(Q), topk=None)
    assert full.token_ids is None and torch.equal(full.student, _logs(P))


def test_tail_is_stable_and_gradients_reach_only_the_student():
    assert tail_log_mass(torch.tensor([0.0])).item() < -10  # all mass covered: log(~0), finite
    student = torch.tensor([[2.0, 1.0, -1.0, 0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0, 3.0, 1.0, -2.0]], requires_grad=True)
    support = shared_support(student.log_softmax(-1), teacher.log_softmax(-1), topk=2)
    generalized_jsd(support.student, support.teacher, 0.5).sum().backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    # Zero-probability entries give 0, not nan, in value and gradient.
    log_p = torch.tensor([0.0, -math.inf], requires_grad=True)
    value = kl(log_p, torch.tensor([-0.1, -math.inf]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(log_p.grad).all()


def test_importance_weights():
    new, old = torch.tensor([-1.0, -1.0, -3.0]), torch.tensor([-1.0, -2.0, -1.0])
    weights = clipped_importance_weights(new, old, clip=2.0)
    assert weights.tolist() == pytest.approx([1.0, 2.0, math.exp(-2.0)])  # e^1 = 2.72 is clipped to 2
    assert clipped_importance_weights(new, None, 2.0) is None  # on-policy: every weight is 1


# ----- information ---------------------------------------------------------------------------------------------
def test_correction_and_top1_agreement_by_hand():
    support = shared_support(_logs([P, Q]), _logs([Q, Q]), topk=None)
    assert correction_information(support).tolist() == pytest.approx([_kl(Q, P), 0.0])
    assert top1_agreement(support).tolist() == [0.0, 1.0]  # argmax 0 vs 3; then identical


def test_mutual_information_by_hand():
    assert mutual_information(torch.tensor([[0.5, 0.0], [0.0, 0.5]])).item() == pytest.approx(math.log(2))
    assert mutual_information(torch.tensor([[0.2, 0.3], [0.2, 0.3]])).item() == pytest.approx(0.0, abs=1e-12)
    joint = torch.tensor([[3.0, 1.0], [1.0, 3.0]])  # unnormalized counts are fine
    p = torch.tensor([[3.0, 1.0], [1.0, 3.0]]) / 8
    expected = sum(p[a, b] * math.log(p[a, b] / 0.25) for a in range(2) for b in range(2))
    assert mutual_information(joint).item() == pytest.approx(float(expected))


def test_agreement_joint_is_the_sum_of_outer_products():
    student = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]).log()
    teacher = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0]]).log()
    mask = torch.tensor([1.0, 1.0, 0.0])  # the last position is padding
    support = shared_support(student, teacher, topk=None)
    joint = agreement_joint(support, mask, num_buckets=3)
    expected = sum(torch.outer(student[i].exp(), teacher[i].exp()) for i in range(2)).double()
    assert joint.shape == (4, 4)  # 3 buckets + the (here empty) tail bucket
    assert torch.allclose(joint[:3, :3], expected) and joint[3].sum() == 0 and joint[:, 3].sum() == 0
    # Top-k: ids are bucketed by id mod buckets, the tail mass goes to the last bucket.
    support = shared_support(student, teacher, topk=1)
    joint = agreement_joint(support, mask, num_buckets=2)
    # Position 0: student top-1 is id 0 (bucket 0): p = (0.7, tail 0.3), q = (0.9, tail 0.1).
    # Position 1: student top-1 is id 2 (bucket 0): p = (0.8, tail 0.2), q = (0.6, tail 0.4).
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[[0, 0, 2, 2], [0, 2, 0, 2]] = torch.tensor([0.7 * 0.9 + 0.8 * 0.6, 0.7 * 0.1 + 0.8 * 0.4,
                                                         0.3 * 0.9 + 0.2 * 0.6, 0.3 * 0.1 + 0.2 * 0.4],
                                                        dtype=torch.float64)
    assert torch.allclose(joint, expected)
    assert torch.allclose(agreement_joint(support, mask, num_buckets=2, chunk_size=1), expected)  # chunking is exact


def test_estimators_disagree_on_a_confidently_wrong_teacher():
    """The documented behaviour: a teacher that sharpens what the student half-knows has high agreement MI and low
    correction KL; a teacher that confidently names unrelated answers has the opposite."""
    generator = torch.Generator().manual_seed(0)
    vocab, positions = 8, 64
    truth = torch.randint(vocab, (positions,), generator=generator)
    wrong = (truth + torch.randint(1, vocab, (positions,), generator=generator)) % vocab

    def peaked(ids, mass):
        probs = torch.full((positions, vocab), (1 - mass) / (vocab - 1))
        probs[torch.arange(positions), ids] = mass
        return probs.log()

    student = peaked(truth, 0.4)  # half-knows the answers
    mask = torch.ones(positions)
    results = {}
    for name, teacher in {"informative": peaked(truth, 0.95), "misleading": peaked(wrong, 0.95)}.items():
        support = shared_support(student, teacher, topk=None)
        results[name] = (mutual_information(agreement_joint(support, mask, vocab)).item(),
                         correction_information(support).mean().item())
    assert results["informative"][0] > 4 * results["misleading"][0]  # agreement: informative >> misleading
    assert results["misleading"][1] > results["informative"][1]  # correction: misleading > informative
    # Bucketing never raises the MI (data-processing inequality).
    support = shared_support(student, peaked(truth, 0.95), topk=None)
    assert mutual_information(agreement_joint(support, mask, 3)).item() <= results["informative"][0] + 1e-9


def test_verified_joint_and_uncertainty_coefficient_by_hand():
    correction = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.3, 0.7])
    success = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    has_context = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # row 4 has no teacher context
    joint = verified_joint(correction, success, has_context)
    # rows: failed / succeeded; columns: teacher lowers / raises the completion
    assert joint.tolist() == [[1.0, 2.0], [1.0, 1.0]]
    assert uncertainty_coefficient(torch.tensor([[2.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(1.0)
    assert uncertainty_coefficient(torch.tensor([[1.0, 1.0], [1.0, 1.0]])).item() == pytest.approx(0.0)
    p = torch.tensor([[3.0, 1.0], [1.0, 3.0]]) / 8
    expected = sum(p[a, b] * math.log(p[a, b] / 0.25) for a in range(2) for b in range(2)) / math.log(2)
    assert uncertainty_coefficient(torch.tensor([[3.0, 1.0], [1.0, 3.0]])).item() == pytest.approx(float(expected))
    assert uncertainty_coefficient(torch.tensor([[0.0, 0.0], [3.0, 1.0]])) is None  # every completion succeeded


def test_verified_information_counts_only_corrections_towards_success():
    right = torch.tensor([[3.0, 1.0], [1.0, 3.0]])  # raises 3 of 4 successes, 1 of 4 failures
    wrong = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # the mirror image: raises the failures (misleading feedback)
    # Mutual information cannot tell them apart; the verified information can.
    assert uncertainty_coefficient(wrong).item() == pytest.approx(uncertainty_coefficient(right).item())
    assert verified_information(right).item() == pytest.approx(uncertainty_coefficient(right).item())
    assert verified_information(wrong).item() == 0.0
    assert verified_information(torch.tensor([[1.0, 1.0], [2.0, 2.0]])).item() == 0.0  # independent: no direction
    assert verified_information(torch.tensor([[0.0, 0.0], [3.0, 1.0]])) is None  # every completion succeeded


# ----- step size -----------------------------------------------------------------------------------------------
def test_step_size_multiplier_by_hand():
    assert step_size_multiplier(0.3, None, 0.5, 2.0) == 1.0  # first step: no history
    assert step_size_multiplier(0.3, 0.2, 0.5, 2.0) == pytest.approx(1.5)
    assert step_size_multiplier(1.0, 0.2, 0.5, 2.0) == 2.0 and step_size_multiplier(0.01, 0.2, 0.5, 2.0) == 0.5
    assert step_size_multiplier(0.3, 0.5, 0.1, 2.0, power=2.0) == pytest.approx(0.36)  # (0.3 / 0.5) ** 2
    assert update_running_mean(None, 0.4, 0.9) == 0.4
    assert update_running_mean(0.4, 1.4, 0.9) == pytest.approx(0.5)


def test_controller_tracks_history_and_round_trips():
    controller = StepSizeController(0.5, 2.0, beta=0.5)
    assert [controller.multiplier(i) for i in (1.0, 1.5, None, 0.1)] == pytest.approx([1.0, 1.5, 1.0, 0.5])
    assert controller.running_mean == pytest.approx(0.5 * (0.5 * 1.0 + 0.5 * 1.5) + 0.05) and controller.steps == 3
    restored = StepSizeController(0.5, 2.0, beta=0.5)
    restored.load_state_dict(controller.state_dict())
    assert restored.multiplier(1.0) == controller.multiplier(1.0)
    off = StepSizeController(0.5, 2.0, beta=0.5, enabled=False)
    assert [off.multiplier(i) for i in (1.0, 3.0)] == [1.0, 1.0] and off.running_mean == 2.0  # tracked, not applied


def test_a_step_without_a_measurement_keeps_the_state_and_the_shrunken_step():
    ratchet = StepSizeController(0.01, 2.0, beta=0.5, reference="peak", ratchet=True)
    assert [ratchet.multiplier(i) for i in (1.0, 0.2)] == pytest.approx([1.0, 0.2])  # running mean 1.0, then 0.6
    state = ratchet.state_dict()
    # No measurement (None, or a NaN from a degenerate estimate): the running mean stands in for I_k, 0.6 / 1.0,
    # under the ratchet's cap (also 0.6), and nothing is folded into the state.
    assert [ratchet.multiplier(i) for i in (None, float("nan"), float("inf"))] == pytest.approx([0.6] * 3)
    assert ratchet.state_dict() == state
    assert ratchet.multiplier(1.0) == pytest.approx(0.6)  # the ratchet still holds: a NaN did not erase it
    running = StepSizeController(0.5, 2.0, beta=0.5)
    assert running.multiplier(None) == 1.0 and running.running_mean is None  # no history yet
    running.multiplier(0.4)
    assert running.multiplier(float("nan")) == 1.0 and running.running_mean == 0.4  # its own mean: a neutral step


def test_peak_reference_keeps_shrinking_steps_while_information_drains():
    running = StepSizeController(0.1, 2.0, beta=0.5, reference="running")
    peak = StepSizeController(0.1, 2.0, beta=0.5, reference="peak")
    draining = [1.0, 1.0, 0.5, 0.25, 0.25, 0.25]
    m_running = [running.multiplier(i) for i in draining]
    m_peak = [peak.multiplier(i) for i in draining]
    assert m_peak[-1] == pytest.approx(0.25)  # 0.25 against the peak mean of 1.0
    assert m_running[-1] == pytest.approx(0.25 / 0.375)  # the running mean (0.375) has caught up with the drain
    assert peak.state_dict()["peak_mean"] == 1.0
    with pytest.raises(ValueError, match="reference"):
        StepSizeController(0.1, 2.0, beta=0.5, reference="initial")


def test_ratchet_keeps_drained_information_from_raising_the_step_again():
    information = [1.0, 0.4, 1.0, 1.4, 1.125]
    free = StepSizeController(0.01, 2.0, beta=0.5, reference="peak")
    ratchet = StepSizeController(0.01, 2.0, beta=0.5, reference="peak", ratchet=True)
    assert [free.multiplier(i) for i in information] == pytest.approx([1.0, 0.4, 1.0, 1.4, 1.0])
    # By hand: the running mean goes 1.0 (the peak), 0.7 (the trough), 0.85, then 1.125, a new peak, which lifts
    # the cap; until then m_k <= 0.7 / 1.0, although I_k came back to 1.0 and 1.4.
    assert [ratchet.multiplier(i) for i in information[:4]] == pytest.approx([1.0, 0.4, 0.7, 0.7])
    assert ratchet.state_dict()["trough_mean"] == ratchet.state_dict()["peak_mean"] == pytest.approx(1.125)
    assert ratchet.multiplier(information[4]) == pytest.approx(1.0)
    # A state saved in the trough (after 3 steps: peak 1.0, trough 0.7) restores the cap; a fresh controller's first
    # step would be 1.0.
    saved = StepSizeController(0.01, 2.0, beta=0.5, reference="peak", ratchet=True)
    [saved.multiplier(i) for i in information[:3]]
    restored = StepSizeController(0.01, 2.0, beta=0.5, reference="peak", ratchet=True)
    restored.load_state_dict(saved.state_dict())
    assert restored.state_dict() == saved.state_dict()
    assert restored.multiplier(1.4) == saved.multiplier(1.4) == pytest.approx(0.7)
    fresh = StepSizeController(0.01, 2.0, beta=0.5, reference="peak", ratchet=True)
    assert fresh.multiplier(1.4) == pytest.approx(1.0)


def test_a_tool_calling_demonstration_is_written_out_turn_by_turn():
    # Single-turn completions (text, or one assistant message) are shown as decoded, as the official code does.
    assert demonstration_text("12", "12") == "12"
    assert demonstration_text([{"role": "assistant", "content": "12"}], "12") == "12"
    # A tool-calling sibling as TRL parses it: decoding would run calls, results and role names together.
    turns = [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 9}}}]},
        {"role": "tool", "name": "add", "content": "12"},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is 12.<|im_end|>"}]},
    ]
    assert demonstration_text(turns, "<tool_call>...user\n<tool_response>12...", ("<|im_end|>",)) == (
        'Tool call: add({"a": 3, "b": 9})\nTool result (add): 12\nThe answer is 12.')
    # Reasoning a response parser moved out of the content comes back as a <think> block (strip_thinking decides).
    turns[0]["reasoning_content"] = "I should add."
    shown = demonstration_text(turns, "")
    assert shown.startswith('<think>I should add.</think>\nTool call: add(')
    assert strip_thinking(shown).startswith("Tool call: add(")
