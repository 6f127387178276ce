"""Each purification method on hand-built teacher signals, and the routers on a planted rule."""

import copy
import math
import random

import pytest
import torch

from trl_ext.purify.features import hashed_ngram_features, text_token_ids
from trl_ext.purify.memory import OutcomeMemory
from trl_ext.purify.methods import PURIFICATIONS, RouterSettings, build_purifier, top_choice
from trl_ext.purify.methods.base import single_threaded
from trl_ext.purify.methods.classifier_router import soft_targets
from trl_ext.purify.methods.plackett_luce import fit_plackett_luce, plackett_luce_log_likelihood, similarity_weights
from trl_ext.purify.methods.rl_selection import student_improvement
from trl_ext.purify.methods.similarity_router import neighbour_scores

NAN = float("nan")
ROUTERS = ("plackett_luce", "classifier_router", "similarity_router")
SETTINGS = RouterSettings(min_examples=8, classifier_steps=100, classifier_learning_rate=5e-2)


def features_of(texts):
    ids, mask = text_token_ids(texts)
    return hashed_ngram_features(ids, mask, dim=128)


def planted_world(num_prompts, seed):
    """Questions from three families whose right teacher follows a planted rule: "add a b" -> teacher 0,
    "cmp a b" -> teacher 1, "rev <word>" -> teacher 2. The right teacher's signal is 1, the others' 0.5 and 0."""
    rng = random.Random(seed)
    texts, signals, rule = [], [], []
    for _ in range(num_prompts):
        best = rng.randrange(3)
        if best == 2:
            texts.append("rev " + "".join(rng.choice("abcde") for _ in range(rng.randint(3, 6))))
        else:
            texts.append(f"{'add' if best == 0 else 'cmp'} {rng.randint(0, 99)} {rng.randint(0, 99)}")
        signal = [0.0, 0.0, 0.0]
        signal[best], signal[(best + 1) % 3] = 1.0, 0.5
        signals.append(signal)
        rule.append(best)
    return features_of(texts), torch.tensor(signals), torch.tensor(rule)


def operand_range_world(num_prompts, seed):
    """A finer rule: questions "a+b=", teacher 0 right when a >= 5, teacher 2 when a < 5."""
    rng = random.Random(seed)
    texts, signals, rule = [], [], []
    for _ in range(num_prompts):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        best = 0 if a >= 5 else 2
        texts.append(f"{a}+{b}=")
        signals.append([1.0, 0.5, 0.0] if best == 0 else [0.0, 0.5, 1.0])
        rule.append(best)
    return features_of(texts), torch.tensor(signals), torch.tensor(rule)


# ----- pure pieces --------------------------------------------------------------------------------------------------
def test_top_choice_splits_ties():
    weights = top_choice(torch.tensor([[0.2, 0.9, 0.9], [3.0, 1.0, 2.0]]))
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))


def test_plackett_luce_log_likelihood_by_hand():
    xi = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    # Strict ranking 0 > 1 > 2.
    strict = plackett_luce_log_likelihood(xi, torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64))
    assert strict.item() == pytest.approx(1 - lse(1, 0, -1) + 0 - lse(0, -1))
    # Teachers 0 and 1 tied on top (Breslow): each contributes xi_k - lse(all); teacher 2 contributes 0.
    tied = plackett_luce_log_likelihood(xi, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))
    assert tied.item() == pytest.approx(1 + 0 - 2 * lse(1, 0, -1))


def test_plackett_luce_fit_recovers_the_ranking_and_weights():
    # Rankings 0>1>2, 0>2>1, 1>0>2: teacher 0 beats both others twice, teacher 1 beats teacher 2 twice.
    signals = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.5], [0.5, 1.0, 0.0]])
    with single_threaded():
        xi = fit_plackett_luce(signals, torch.full((1, 3), 1 / 3).double(), steps=20, l2=0.01).double()
        assert xi[0, 0] > xi[0, 1] > xi[0, 2]
        # Newton converged: the gradient of the weighted log-likelihood minus the L2 penalty vanishes.
        xi.requires_grad_(True)
        objective = plackett_luce_log_likelihood(xi, signals.double()).mean() - 0.005 * xi.pow(2).sum()
        (grad,) = torch.autograd.grad(objective, xi)
        assert grad.abs().max().item() < 1e-5
        # Weighting the third ranking heavily makes teacher 1 the top one.
        assert fit_plackett_luce(signals, torch.tensor([[0.05, 0.05, 0.9]])).argmax().item() == 1
    weights = similarity_weights(torch.tensor([[1.0, 0.0, -1.0]]), gamma=10.0)
    torch.testing.assert_close(weights, torch.tensor([[100.0, 10.0, 1.0]]) / 111.0)


def test_neighbour_scores_and_soft_targets_by_hand():
    sims = torch.tensor([[0.9, 0.1, 0.8]])
    signals = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    torch.testing.assert_close(neighbour_scores(sims, signals, 2), torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(soft_targets(torch.tensor([[1.0, 0.2, 1.0]])), torch.tensor([[0.5, 0.0, 0.5]]))


def test_student_improvement_by_hand():
    # One group: rewards 1, 0 -> normalised advantages +1, -1. The update raised completion 0 by 0.2 nats and
    # lowered completion 1 by 0.1: improvement (1 * 0.2 + (-1) * (-0.1)) / 2 = 0.15. Equal rewards: no signal.
    improvement = student_improvement(torch.tensor([0.2, -0.1, 5.0, 5.0]), torch.tensor([1.0, 0.0, 0.3, 0.3]), 2)
    assert improvement[0].item() == pytest.approx(0.15)
    assert math.isnan(improvement[1].item())


def test_memory_similarities_are_centred_cosines():
    memory = OutcomeMemory(capacity=8, feature_dim=3, num_teachers=1)
    keys = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [1.0, 1.0, 2.0], [2.0, 0.5, 2.0]])
    memory.add(keys, torch.zeros(4, 1))
    queries = torch.tensor([[1.0, 0.2, 2.0], [0.0, 3.0, 1.0]])
    centre = keys.mean(dim=0)
    expected = torch.nn.functional.normalize(queries - centre, dim=1) @ torch.nn.functional.normalize(
        keys - centre, dim=1).t()
    torch.testing.assert_close(memory.similarities(queries), expected)


def test_memory_is_fifo_and_round_trips():
    memory = OutcomeMemory(capacity=3, feature_dim=1, num_teachers=1)
    memory.add(torch.arange(5.0).view(5, 1), torch.arange(5.0).view(5, 1))
    features, _ = memory.contents()
    assert sorted(features.flatten().tolist()) == [2.0, 3.0, 4.0] and memory.seen == 5  # the oldest were dropped
    clone = OutcomeMemory(capacity=3, feature_dim=1, num_teachers=1)
    clone.load_state_dict(memory.state_dict())
    torch.testing.assert_close(clone.contents()[0], features)
    with pytest.raises(ValueError, match="router_memory_size"):
        OutcomeMemory(capacity=4, feature_dim=1, num_teachers=1).load_state_dict(memory.state_dict())


# ----- each purifier picks the right teacher on hand-built signals ---------------------------------------------------
def test_none_weighs_every_teacher_equally():
    features, signals, _ = planted_world(4, seed=0)
    decision = build_purifier("none", 3, features.size(1), SETTINGS).decide(features, signals)
    torch.testing.assert_close(decision.weights, torch.full((4, 3), 1 / 3))
    assert not decision.fallback.any()


def test_aggregation_weighs_teachers_by_their_signal_on_the_prompt():
    signal = torch.tensor([[1.0, 0.5, 0.0], [NAN, NAN, NAN]])
    purifier = build_purifier("aggregation", 3, 4, RouterSettings(aggregation_temperature=0.5))
    weights = purifier.decide(torch.zeros(2, 4), signal).weights
    e = math.exp
    torch.testing.assert_close(weights[0], torch.tensor([e(2), e(1), e(0)]) / (e(2) + e(1) + 1))
    torch.testing.assert_close(weights[1], torch.full((3,), 1 / 3))  # no signal, no consensus: the naive average
    # Without a signal the teachers' consensus decides; with a signal the consensus is ignored.
    consensus = torch.tensor([[0.0, 0.0, 1.0], [0.75, 0.75, 0.25]])
    weights = purifier.decide(torch.zeros(2, 4), signal, consensus=consensus).weights
    torch.testing.assert_close(weights[0], torch.tensor([e(2), e(1), e(0)]) / (e(2) + e(1) + 1))
    torch.testing.assert_close(weights[1], torch.tensor([e(1.5), e(1.5), e(0.5)]) / (2 * e(1.5) + e(0.5)))
    # A low temperature concentrates on the right teacher, a high one approaches the average.
    sharp = build_purifier("aggregation", 3, 4, RouterSettings(aggregation_temperature=0.01)).decide(
        torch.zeros(2, 4), signal).weights
    assert sharp[0, 0].item() > 0.99


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_fall_back_to_averaging_until_they_know_enough(name):
    features, signals, _ = planted_world(20, seed=0)
    purifier = build_purifier(name, 3, features.size(1), SETTINGS)
    first = purifier.decide(features, signals)
    assert first.fallback.all() and torch.allclose(first.weights, torch.full((20, 3), 1 / 3))
    purifier.learn(features[:4], signals[:4])  # 4 < min_examples = 8
    assert purifier.decide(features, signals).fallback.all()
    purifier.learn(features[4:], signals[4:])
    assert not purifier.decide(features, signals).fallback.any()


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_learn_a_planted_rule(name):
    train_features, train_signals, _ = planted_world(96, seed=1)
    test_features, _, test_rule = planted_world(64, seed=2)  # fresh questions
    purifier = build_purifier(name, 3, train_features.size(1), SETTINGS)
    purifier.learn(train_features, train_signals)
    chosen = purifier.decide(test_features, torch.full((64, 3), NAN)).weights.argmax(dim=1)
    assert (chosen == test_rule).float().mean().item() >= 0.95


def test_classifier_router_learns_which_part_of_the_prompt_matters():
    # Bag-of-n-gram similarity weighs both operands alike, so neighbours cannot isolate the first one; the trained
    # classifier learns that only the first operand decides.
    train_features, train_signals, _ = operand_range_world(128, seed=1)
    test_features, _, test_rule = operand_range_world(64, seed=2)
    purifier = build_purifier("classifier_router", 3, train_features.size(1), SETTINGS)
    purifier.learn(train_features, train_signals)
    chosen = purifier.decide(test_features, torch.full((64, 3), NAN)).weights.argmax(dim=1)
    assert (chosen == test_rule).float().mean().item() >= 0.9


def test_routers_ignore_prompts_without_a_decisive_signal():
    features, signals, _ = planted_world(16, seed=3)
    undecided = torch.cat([torch.full((8, 3), NAN), torch.full((8, 3), 0.5)])  # no signal / all teachers tie
    for name in ROUTERS:
        purifier = build_purifier(name, 3, features.size(1), SETTINGS)
        purifier.learn(features, undecided)
        assert purifier.memory.seen == 0, name


def test_rl_selection_learns_a_planted_rule_from_rewards_alone():
    settings = RouterSettings(rl_learning_rate=0.2, rl_signal_in_state=False, seed=0)
    train_features, _, train_rule = planted_world(256, seed=4)
    purifier = build_purifier("rl_selection", 3, train_features.size(1), settings)
    no_signal = torch.full((32, 3), NAN)
    for step in range(150):
        rows = slice((step * 32) % 256, (step * 32) % 256 + 32)
        actions = purifier.decide(train_features[rows], no_signal, explore=True).actions
        reward = (actions == train_rule[rows]).float()  # the "student improved" only with the planted teacher
        purifier.learn_from_improvement(train_features[rows], no_signal, actions, reward)
    test_features, _, test_rule = planted_world(64, seed=5)
    greedy = purifier.decide(test_features, torch.full((64, 3), NAN), explore=False)
    assert (greedy.actions == test_rule).float().mean().item() >= 0.9
    torch.testing.assert_close(greedy.weights, torch.nn.functional.one_hot(greedy.actions, 3).float())


def test_rl_selection_learns_to_follow_the_signal_in_its_state():
    # From a uniform start (no evidence prior), the improvement reward alone teaches it to follow the signal.
    purifier = build_purifier("rl_selection", 3, 8, RouterSettings(rl_learning_rate=0.2, rl_evidence_prior=0.0, seed=0))
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        signals = torch.rand(32, 3, generator=generator)
        features = torch.zeros(32, 8)
        actions = purifier.decide(features, signals, explore=True).actions
        purifier.learn_from_improvement(features, signals, actions, signals.gather(1, actions[:, None]).squeeze(1))
    assert purifier.signal_coef.item() > 1.0
    signals = torch.rand(64, 3, generator=generator)
    chosen = purifier.decide(torch.zeros(64, 8), signals).actions
    assert (chosen == signals.argmax(dim=1)).float().mean().item() >= 0.9


def test_rl_selection_routes_prompts_without_a_signal_by_the_consensus():
    # Trained (from a uniform start) on prompts with a signal; prompts without one (all NaN) are then routed by the
    # teachers' consensus, which enters the state on the signal's scale, instead of by the untrained prompt features.
    purifier = build_purifier("rl_selection", 3, 8, RouterSettings(rl_learning_rate=0.2, rl_evidence_prior=0.0, seed=0))
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        signals = torch.rand(32, 3, generator=generator)
        actions = purifier.decide(torch.zeros(32, 8), signals, explore=True).actions
        purifier.learn_from_improvement(torch.zeros(32, 8), signals, actions,
                                        signals.gather(1, actions[:, None]).squeeze(1))
    consensus = torch.rand(64, 3, generator=generator)
    no_signal = torch.full((64, 3), NAN)
    chosen = purifier.decide(torch.zeros(64, 8), no_signal, consensus=consensus).actions
    assert (chosen == consensus.argmax(dim=1)).float().mean().item() >= 0.9
    # Without a consensus the state carries nothing on these prompts: one policy (the bias) for all of them.
    probabilities = purifier.probabilities(torch.zeros(64, 8), no_signal)
    torch.testing.assert_close(probabilities, probabilities[:1].expand(64, 3))


def test_rl_selection_starts_from_the_evidence_with_its_default_prior():
    # Untrained: the default prior makes the greedy choice the teacher with the best signal, or, without a signal,
    # the best consensus; a zero prior makes the untrained policy uniform.
    signal = torch.tensor([[0.2, 0.9, 0.5], [NAN, NAN, NAN]])
    consensus = torch.tensor([[0.5, 0.5, 0.5], [0.8, 0.3, 0.6]])
    purifier = build_purifier("rl_selection", 3, 4, RouterSettings())
    assert purifier.decide(torch.zeros(2, 4), signal, consensus=consensus).actions.tolist() == [1, 0]
    uniform = build_purifier("rl_selection", 3, 4, RouterSettings(rl_evidence_prior=0.0))
    torch.testing.assert_close(uniform.probabilities(torch.zeros(2, 4), signal, consensus=consensus),
                               torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("name", PURIFICATIONS)
def test_state_round_trip_gives_identical_decisions(name):
    features, signals, rule = planted_world(48, seed=6)
    purifier = build_purifier(name, 3, features.size(1), SETTINGS)
    purifier.learn(features[:32], signals[:32])
    if purifier.learns_from_improvement:
        actions = purifier.decide(features[:32], signals[:32], explore=True).actions
        purifier.learn_from_improvement(features[:32], signals[:32], actions, (actions == rule[:32]).float())
    restored = build_purifier(name, 3, features.size(1), SETTINGS)
    restored.load_state_dict(copy.deepcopy(purifier.state_dict()))
    for explore in (False, True):  # exploration draws from the restored generator state too
        a = purifier.decide(features[32:], signals[32:], explore=explore)
        b = restored.decide(features[32:], signals[32:], explore=explore)
        torch.testing.assert_close(a.weights, b.weights)


def test_unknown_purification():
    with pytest.raises(ValueError, match="Unknown purification 'vote'"):
        build_purifier("vote", 3, 8, SETTINGS)
