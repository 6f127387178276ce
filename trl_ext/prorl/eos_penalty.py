"""The penalty for completions that do not end with EOS (ProRL's later runs, against runaway response length).

ProRL's runs 4-5 "penalize responses that do not terminate with EOS" (arXiv 2505.24864, as secondary summaries
report it); the paper's exact form is not available to us. We add `-penalty` to the reward of every
completion whose last token is not an EOS token (a completion cut at `max_completion_length`), as an extra reward
function, so TRL logs it as `rewards/eos_penalty/mean` and it enters the group advantage like any reward. [I]
"""

from __future__ import annotations

import copy


class EOSPenalty:
    """Reward function: `-penalty` for completions that do not end with an EOS token, 0 otherwise.

    `eos_token_ids` is filled in by the trainer once its tokenizer is known (`GRPOTrainer.eos_token_ids`).
    """

    __name__ = "eos_penalty"  # TRL names reward columns after the callable: rewards/eos_penalty/mean

    def __init__(self, penalty: float):
        if penalty <= 0:
            raise ValueError(f"The EOS penalty must be > 0, got {penalty}.")
        self.penalty = float(penalty)
        self.eos_token_ids: set[int] | None = None

    def __call__(self, completions, completion_ids, **kwargs) -> list[float]:
        if self.eos_token_ids is None:
            raise RuntimeError("EOSPenalty.eos_token_ids is not set; the trainer sets it from its tokenizer.")
        return [0.0 if ids and ids[-1] in self.eos_token_ids else -self.penalty for ids in completion_ids]


def with_eos_penalty(reward_funcs, args, penalty: EOSPenalty):
    """Append `penalty` to the reward functions (weight 1); returns (reward_funcs, args).

    When the user set `reward_weights`, the config is shallow-copied before the weight list is extended, so the
    caller's config object is left as it was (and can be reused for another trainer).
    """
    if reward_funcs is None:
        funcs = []
    elif isinstance(reward_funcs, list | tuple):
        funcs = list(reward_funcs)
    else:
        funcs = [reward_funcs]
    if args.reward_weights is not None:
        args = copy.copy(args)
        args.reward_weights = [*args.reward_weights, 1.0]
    return [*funcs, penalty], args
