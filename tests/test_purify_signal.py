"""The purification signal, the purified target and the router features against values computed by hand."""

import math

import pytest
import torch

from trl_ext.purify.features import hashed_ngram_features, hidden_state_features, text_token_ids
from trl_ext.purify.signal import (
    best_teachers,
    choice_accuracy,
    combined_rewards,
    conflict_and_consensus,
    decisive_prompts,
    mean_conflict,
    ranking_agreement,
    sequence_logps,
    teacher_conflict,
    teacher_consensus,
)
from trl_ext.purify.target import purified_logps

NAN = float("nan")


def test_sequence_logps_sum_valid_tokens_only():
    logps = torch.tensor([[-1.0, -2.0, -100.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(sequence_logps(logps, mask), torch.tensor([-3.0, -1.5]))


def test_rewards_are_combined_as_trl_combines_them():
    per_func = torch.tensor([[1.0, 0.0], [0.0, 4.0], [float("nan"), float("nan")], [3.0, 1.0]])
    weights = torch.tensor([1.0, 2.0])
    summed = combined_rewards(per_func, weights, group_size=2)
    assert summed[0] == 1.0 and summed[1] == 8.0 and summed[3] == 5.0 and math.isnan(summed[2])
    # normalize_then_sum: each function standardized within its group (sample std, + 1e-4), then weighted.
    normalized = combined_rewards(per_func, weights, group_size=2, aggregation="normalize_then_sum")
    first = 0.5 / (math.sqrt(0.5) + 1e-4)  # function 0 in group 0: rewards 1, 0 -> mean 0.5, std sqrt(0.5)
    second = 2.0 / (math.sqrt(8.0) + 1e-4)  # function 1 in group 0: rewards 0, 4 -> mean 2, std sqrt(8)
    torch.testing.assert_close(normalized[:2], torch.tensor([first - 2 * second, -first + 2 * second]))
    assert math.isnan(normalized[2]) and normalized[3] == 0.0  # alone in its group: no spread, nothing to rank
    with pytest.raises(ValueError, match="multi_objective_aggregation 'mean'"):
        combined_rewards(per_func, weights, group_size=2, aggregation="mean")


def test_ranking_agreement_by_hand():
    # One prompt, three completions with rewards 1, 0, 0.5. Pairs (better, worse, gap): (0,1,1), (0,2,.5), (2,1,.5).
    rewards = torch.tensor([1.0, 0.0, 0.5])
    teachers = torch.tensor([
        [-1.0, -3.0, -2.0],  # ranks exactly like the reward: agrees on every pair -> 1
        [-3.0, -1.0, -2.0],  # exactly reversed -> 0
        [-1.0, -1.0, -5.0],  # (0,1) tie -> 1/2 * 1; (0,2) agrees -> .5; (2,1) disagrees -> 0; total 1 / 2
    ])
    signal = ranking_agreement(teachers, rewards, group_size=3)
    assert signal.shape == (1, 3)
    torch.testing.assert_close(signal, torch.tensor([[1.0, 0.0, 0.5]]))


def test_ranking_agreement_groups_and_undefined_prompts():
    # Two prompts of two completions; the second has equal rewards -> no signal; NaN rewards take part in no pair.
    rewards = torch.tensor([0.0, 1.0, 0.3, 0.3])
    teachers = torch.tensor([[-2.0, -1.0, -1.0, -2.0], [-1.0, -2.0, -1.0, -2.0]])
    signal = ranking_agreement(teachers, rewards, group_size=2)
    assert signal[0].tolist() == [1.0, 0.0]
    assert torch.isnan(signal[1]).all()
    with_nan = ranking_agreement(teachers[:, :2], torch.tensor([NAN, 1.0]), group_size=2)
    assert torch.isnan(with_nan).all()
    with pytest.raises(ValueError, match="groups of 3"):
        ranking_agreement(teachers, rewards, group_size=3)


def test_best_teachers_decisive_prompts_and_accuracy():
    signal = torch.tensor([[1.0, 0.5, 1.0], [0.2, 0.9, 0.1], [0.5, 0.5, 0.5], [NAN, NAN, NAN]])
    best = best_teachers(signal)
    assert best.tolist() == [[True, False, True], [False, True, False], [True, True, True], [False, False, False]]
    assert decisive_prompts(signal).tolist() == [True, True, False, False]
    # Prompt 0: 0.5 weight on teacher 1 (not best) and 0.5 on teacher 2 (best) -> 0.5; prompt 1: all on the best -> 1.
    weights = torch.tensor([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert choice_accuracy(weights, signal).item() == pytest.approx(0.75)
    assert math.isnan(choice_accuracy(weights[2:], signal[2:]).item())


def test_teacher_conflict_by_hand():
    # One prompt, three completions. Teacher 0 orders 0>1>2, teacher 1 orders 2>1>0 (all 3 pairs opposite),
    # teacher 2 orders 0>1 and 0>2 and ties 1 with 2, so it shares only the pairs (0,1) and (0,2) with the others.
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-3.0, -2.0, -1.0], [-1.0, -2.0, -2.0]])
    conflict = teacher_conflict(logps, group_size=3)
    assert conflict[0, 1].item() == pytest.approx(1.0)
    assert conflict[0, 2].item() == pytest.approx(0.0)
    assert conflict[1, 2].item() == pytest.approx(1.0)  # (0,1) and (0,2) both opposite
    torch.testing.assert_close(conflict, conflict.t())
    assert mean_conflict(conflict).item() == pytest.approx(2 / 3)


def test_completions_without_a_log_likelihood_take_part_in_no_pair():
    # The conflict test's teachers 0 and 1 (all pairs opposite), plus a fourth completion with NaN (one the loss
    # ignores): it must neither add agreeing pairs nor dilute the conflict.
    logps = torch.tensor([[-1.0, -2.0, -3.0, float("nan")], [-3.0, -2.0, -1.0, float("nan")]])
    conflict, consensus = conflict_and_consensus(logps, group_size=4)
    assert conflict[0, 1].item() == pytest.approx(1.0)
    torch.testing.assert_close(consensus, torch.zeros(1, 2))
    signal = ranking_agreement(logps, torch.tensor([1.0, 0.0, 0.0, float("nan")]), group_size=4)
    torch.testing.assert_close(signal, torch.tensor([[1.0, 0.0]]))


def test_teacher_consensus_by_hand():
    # Prompt 0 is the conflict test's prompt: teacher 0 agrees with teacher 2 on both shared pairs (agreement 1) and
    # with teacher 1 on none (0) -> (1 + 0) / 2; teacher 1 -> (0 + 0) / 2; teacher 2 -> (1 + 0) / 2.
    # Prompt 1: teacher 2 ties everything, so it orders no pair with anyone (1/2, "nothing to compare");
    # teachers 0 and 1 order the three completions identically (agreement 1).
    logps = torch.tensor([[-1.0, -2.0, -3.0, -1.0, -2.0, -3.0],
                          [-3.0, -2.0, -1.0, -0.5, -0.7, -0.9],
                          [-1.0, -2.0, -2.0, -4.0, -4.0, -4.0]])
    consensus = teacher_consensus(logps, group_size=3)
    assert consensus.shape == (2, 3)
    torch.testing.assert_close(consensus[0], torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(consensus[1], torch.tensor([0.75, 0.75, 0.5]))
    assert teacher_consensus(logps[:1], group_size=3).eq(0.5).all()  # one teacher: nobody to agree with


def test_purified_target_is_the_weighted_geometric_mean():
    # K=2 teachers, B=2 rows, T=1 token. Teacher 1 finds row 0's token impossible (-inf).
    teacher = torch.tensor([[[math.log(0.8)], [math.log(0.5)]], [[float("-inf")], [math.log(0.1)]]])
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # A teacher without weight does not contribute, even with -inf (no 0 * -inf = NaN).
    torch.testing.assert_close(purified_logps(teacher, one_hot), torch.tensor([[math.log(0.8)], [math.log(0.1)]]))
    soft = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    purified = purified_logps(teacher, soft)
    assert purified[0, 0].item() == float("-inf")
    assert purified[1, 0].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(0.1))


def test_ngram_features_ignore_padding_and_separate_prompts():
    ids = torch.tensor([[9, 9, 3, 4, 5], [3, 4, 5, 9, 9], [3, 4, 6, 9, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    features = hashed_ngram_features(ids, mask, dim=64, order=3)
    assert features.shape == (3, 64)
    torch.testing.assert_close(features[0], features[1])  # left vs right padding: same prompt, same features
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    assert (features[1] @ features[2]).item() < 0.99  # one token differs
    torch.testing.assert_close(hashed_ngram_features(ids, mask, dim=64), features)  # deterministic
    with pytest.raises(ValueError, match="order"):
        hashed_ngram_features(ids, mask, dim=64, order=9)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])  # absolute and rotary position embeddings
def test_hidden_state_features_ignore_left_padding(architecture):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
    model.eval()
    prompt = [3, 4, 5, 6]
    alone = hidden_state_features(model, torch.tensor([prompt]), torch.ones(1, 4, dtype=torch.long))
    # The same prompt left-padded by 3 in a batch with a longer one: the padding must not move its features.
    ids = torch.tensor([[0, 0, 0, *prompt], [7, 8, 9, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    torch.testing.assert_close(hidden_state_features(model, ids, mask)[0], alone[0], atol=1e-5, rtol=1e-5)


def test_text_token_ids_are_utf8_bytes():
    ids, mask = text_token_ids(["ab", "é"])
    assert ids.tolist() == [[97, 98], [0xC3, 0xA9]]
    assert mask.tolist() == [[1, 1], [1, 1]]
