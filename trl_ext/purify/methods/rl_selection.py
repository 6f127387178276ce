"""RL-based teacher selection: a policy over teachers, rewarded by the student's improvement.

Paper [S]: per-teacher state [E(q), E(rationale_k) * 1(teacher k answers correctly)], an independent select/skip
Bernoulli policy per teacher (Yuan et al., AAAI 2021), the highest-scoring teacher's rationale used, trained by policy
gradient with reward -(L_answer + L_rationale) of the student, alternating with distillation. Here [I]:

* policy: a softmax over the K teachers with logits  W f(q) + b + theta * (e_k(q) - 1/2)  (router features f; the
  evidence term, on by default, plays the role of the paper's correctness indicator: e is the signal where the
  prompt has one and the teachers' reward-free consensus where it has none, as in aggregation, see
  signal.evidence). Without the consensus, prompts without a signal (typically those the student gets all wrong)
  are routed by W f(q) alone, which their NaN rewards never train (with a uniform start, the consensus moved the
  demo student's in-domain reward within seed noise, 0.18 -> 0.20 over 4 seeds).
  One categorical choice per prompt instead of K Bernoullis, since exactly one teacher is used.
* initialisation: theta = `rl_evidence_prior` (30), W = b = 0, so the policy starts by choosing the teacher the
  evidence favours, and the improvement reward moves it from there. From theta = 0 (a uniform start) the first few
  hundred steps routed a third of the additions to the reversal expert, whose one-hot target pushes the student off
  digits: on the demo world the student's addition collapsed (0.02) and the in-domain reward ended at 0.20 against
  averaging's 0.33; theta = 10 gave 0.30 and 30 gave 0.36 (4 seeds each).
* exploration: during training the teacher is SAMPLED from the policy mixed with `rl_exploration` of uniform choice
  (so no teacher is ever abandoned on the strength of a few noisy rewards), with a generator seeded identically on
  every process; evaluation takes the most probable teacher.
* reward = the student's measured improvement on the prompt after it was trained on the chosen teacher: the next
  rollout re-scores the prompt's completions under the updated student and computes
      I(q) = mean_i A_i * (log pi_new(y_i) - log pi_old(y_i)),   A_i = (r_i - mean r) / std r  within the group,
  the first-order change of the group's normalised expected reward (an importance-sampling policy-improvement
  estimate). It is NaN on groups whose rewards are all equal. Known weakness: pushing all of a group's
  completions down lowers the unlikely wrong ones more in log-probability than the likely right ones, which this
  centred sum scores as an improvement. The unbiased alternative with the group's worst reward as the baseline,
  mean_i (pi_new/pi_old - 1) (r_i - min r) / (max r - min r), did no better on the demo world (in-domain 0.195 vs
  0.202 over 4 seeds, one seed collapsing to 0.015), so the centred form stays.
* update: one actor-critic step per rollout: REINFORCE with the advantage I(q) - V(q), where V is a linear value
  function of the prompt features fitted to the improvements (MSE), so that prompts whose improvements are
  larger whatever the teacher (e.g. a task with a denser reward) do not pass as good choices; advantages are
  scaled by their standard deviation over the batch's valid prompts; plus an entropy bonus; Adam.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..signal import evidence
from .base import Decision, Purifier, RouterSettings


def student_improvement(delta_seq_logps: torch.Tensor, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) change of the student's sequence log-likelihoods and (N,) rewards -> (Q,) improvement per prompt."""
    r = rewards.double().view(-1, group_size)
    delta = delta_seq_logps.double().view(-1, group_size)
    finite = ~torch.isnan(r)
    count = finite.sum(dim=1).clamp(min=1)
    mean = torch.where(finite, r, 0.0).sum(dim=1, keepdim=True) / count.unsqueeze(1)
    centred = torch.where(finite, r - mean, 0.0)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / count.unsqueeze(1)).sqrt()
    advantage = centred / std.clamp(min=1e-12)
    improvement = (advantage * delta).sum(dim=1) / count
    return torch.where(std.squeeze(1) > 1e-12, improvement, torch.full_like(improvement, float("nan"))).float()


def policy_logits(
    weight: torch.Tensor, bias: torch.Tensor, signal_coef: torch.Tensor, features: torch.Tensor,
    state_evidence: torch.Tensor | None,
) -> torch.Tensor:
    """(Q, K) logits of the teacher-selection policy."""
    logits = features @ weight.t() + bias
    if state_evidence is not None:
        logits = logits + signal_coef * (state_evidence - 0.5).nan_to_num(0.0)
    return logits


class RLTeacherSelection(Purifier):
    name = "rl_selection"
    learns_from_improvement = True

    def __init__(self, num_teachers: int, feature_dim: int, settings: RouterSettings):
        super().__init__(num_teachers, feature_dim, settings)
        self.weight = torch.zeros(num_teachers, feature_dim, requires_grad=True)
        self.bias = torch.zeros(num_teachers, requires_grad=True)
        # The evidence's weight starts at the prior: the first choices follow the evidence, not a coin (see the
        # docstring); W and b start at zero.
        self.signal_coef = torch.tensor(float(settings.rl_evidence_prior), requires_grad=True)
        # The critic: V(q) = value_weight . f(q) + value_bias.
        self.value_weight = torch.zeros(feature_dim, requires_grad=True)
        self.value_bias = torch.zeros((), requires_grad=True)
        self.optimizer = torch.optim.Adam(self._parameters(), lr=settings.rl_learning_rate)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.last_entropy = float("nan")

    def _parameters(self) -> list[torch.Tensor]:
        return [self.weight, self.bias, self.signal_coef, self.value_weight, self.value_bias]

    def _logits(self, features: torch.Tensor, signal: torch.Tensor, consensus: torch.Tensor | None) -> torch.Tensor:
        state = None
        if self.settings.rl_signal_in_state:
            state = evidence(signal.float().cpu(), None if consensus is None else consensus.float().cpu())
        return policy_logits(self.weight, self.bias, self.signal_coef, features.float().cpu(), state)

    def _log_policy(
        self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probabilities of the behaviour policy: the softmax, mixed with uniform choice when exploring."""
        log_probs = torch.log_softmax(self._logits(features, signal, consensus), dim=1)
        epsilon = self.settings.rl_exploration
        if not explore or epsilon == 0:
            return log_probs
        uniform = torch.full_like(log_probs, math.log(epsilon / self.num_teachers))
        return torch.logaddexp(log_probs + math.log1p(-epsilon), uniform)

    def probabilities(
        self, features: torch.Tensor, signal: torch.Tensor, explore: bool = False, consensus: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            return self._log_policy(features, signal, explore, consensus).exp()

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        probs = self.probabilities(features, signal, explore, consensus)
        if explore:
            actions = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        else:
            actions = probs.argmax(dim=1)
        self.last_entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1).mean().item()
        weights = torch.nn.functional.one_hot(actions, self.num_teachers).float()
        return Decision(weights, torch.zeros(features.size(0), dtype=torch.bool), actions=actions)

    def _learn_from_improvement(
        self, features: torch.Tensor, signal: torch.Tensor, actions: torch.Tensor, improvement: torch.Tensor,
        consensus: torch.Tensor | None = None,
    ) -> dict[str, float]:
        valid = ~torch.isnan(improvement)
        metrics = {"rl_improvement": improvement[valid].mean().item() if valid.any() else float("nan")}
        if valid.sum() < 2:  # a whitened reward needs at least two prompts
            return metrics
        reward = improvement[valid].float()
        features, signal = features[valid].float().cpu(), signal[valid].float().cpu()
        consensus = None if consensus is None else consensus[valid].float().cpu()
        with torch.enable_grad():
            value = features @ self.value_weight + self.value_bias
            advantage = (reward - value.detach()).double()
            advantage = (advantage / (advantage.std() + 1e-8)).float()
            # The choices were sampled from the exploring policy: its log-probability is the score function.
            behaviour = self._log_policy(features, signal, explore=True, consensus=consensus)
            chosen = behaviour.gather(1, actions[valid].long().unsqueeze(1)).squeeze(1)
            log_probs = torch.log_softmax(self._logits(features, signal, consensus), dim=1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=1)
            loss = (-(advantage * chosen).mean() - self.settings.rl_entropy_coef * entropy.mean()
                    + (value - reward).pow(2).mean())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return metrics

    def sync_tensors(self) -> list[torch.Tensor]:
        return [p.data for p in self._parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {"parameters": [p.detach().clone() for p in self._parameters()],
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for parameter, saved in zip(self._parameters(), state["parameters"], strict=True):
                parameter.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
