"""PurifiedDistillConfig: GRPOConfig plus K teachers, the purification method, and GNDPO's advantage settings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trl import GRPOConfig

from ..core.field_values import raise_for_bad_field_values, raise_for_bad_json
from ..core.ignored_settings import raise_for_ignored_settings
from ..gndpo.config import ADVANTAGE_NORMALIZATIONS
from .features import FEATURES, MAX_NGRAM_ORDER
from .methods import PURIFICATIONS, RouterSettings

# Methods that need the verifiable reward (they read or learn from the signal, or the student's improvement).
NEEDS_REWARD = ("aggregation", "plackett_luce", "classifier_router", "similarity_router", "rl_selection")
FEATURELESS = ("none", "aggregation")  # decide from the teachers' outputs alone, never from the prompt's features
MEMORY_ROUTERS = ("plackett_luce", "classifier_router", "similarity_router")  # route from remembered prompts


@dataclass
class PurifiedDistillConfig(GRPOConfig):
    r"""Configuration for [`PurifiedDistillTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    The paper (arXiv 2602.01064) names the five purification methods; it has no public code and its internals are
    known only from secondary notes, so every router setting below is our choice ([I]) unless it says otherwise.
    The advantage settings are GNDPO's (official GNDPO code).
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    teacher_model_names_or_paths: list[str] | None = field(
        default=None,
        metadata={
            "help": "Hub ids or local paths of the K frozen teachers (all must share the student's tokenizer). "
            "Alternatively pass `teacher_models` to the trainer; giving both is an error unless they are the same."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for loading every teacher with `from_pretrained` (e.g. "
            '\'{"dtype": "bfloat16"}\'); a dict or a JSON string. Only used for teachers given by id or path.'
        },
    )
    teacher_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature applied to every teacher's logits when scoring the sampled tokens."},
    )
    purification: str = field(
        default="similarity_router",
        metadata={
            "help": "How the K teachers' signals become one per prompt. 'none': average all teachers (the naive "
            "multi-teacher baseline); the paper's five: 'aggregation' (all teachers, weighted by their signal on the "
            "prompt), "
            "'plackett_luce' (similarity-weighted Plackett-Luce ranking, top teacher), 'classifier_router' (an MLP "
            "predicts the best teacher), 'similarity_router' (best teacher of the nearest prompts with known "
            "outcomes), 'rl_selection' (a policy rewarded by the student's improvement). Default: the similarity "
            "router, which the paper reports as the best conflict mitigator (our choice of default).",
            "choices": list(PURIFICATIONS),
        },
    )
    score_clip: float = field(
        default=5.0,
        metadata={
            "help": "Per-token log-ratios purified-teacher/student are clipped to [-score_clip, score_clip] before "
            "normalization (GNDPO's official value)."
        },
    )
    advantage_normalization: str = field(
        default="global",
        metadata={
            "help": "'global' (GNDPO): whiten the clipped scores over every valid completion token of the whole "
            "generation batch, all processes and micro-batches. 'none': plain on-policy distillation.",
            "choices": list(ADVANTAGE_NORMALIZATIONS),
        },
    )
    reward_advantage_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of GRPO's reward advantage added to every token's distillation advantage (0: rewards "
            "only label which teacher is right and are logged)."
        },
    )
    loss_type: str = field(
        default="grpo",
        metadata={"help": "TRL's loss aggregation; 'grpo' as in GNDPO's official code (TRL's own default: 'dapo')."},
    )
    router_features: str = field(
        default="ngram",
        metadata={
            "help": "What routers see of a prompt. 'ngram': hashed token n-grams (no model, free, identical on every "
            "machine). 'teacher_hidden': the first teacher's mean-pooled final hidden states over the prompt (a "
            "frozen LM encoder, closer to the paper's mDeBERTa encoder; one extra teacher pass over the prompts).",
            "choices": list(FEATURES),
        },
    )
    router_feature_dim: int = field(
        default=512, metadata={"help": "Number of hash buckets of the 'ngram' router features."}
    )
    router_ngram_order: int = field(
        default=3, metadata={"help": f"Longest token n-gram of the 'ngram' features (1 to {MAX_NGRAM_ORDER})."}
    )
    router_memory_size: int = field(
        default=1024,
        metadata={"help": "How many decisive prompts (features + per-teacher signal) the routers remember (FIFO)."},
    )
    router_min_examples: int = field(
        default=16,
        metadata={
            "help": "Routers average all teachers until they have learned from this many decisive prompts "
            "(logged as purify/fallback_fraction); at least 1."
        },
    )
    similarity_neighbors: int = field(
        default=16, metadata={"help": "similarity_router: number of nearest remembered prompts that vote."}
    )
    plackett_luce_gamma: float = field(
        default=1000.0,
        metadata={
            "help": "plackett_luce: similarity weights gamma^(1 + cos) (RouteLLM's form; it uses gamma = 10 on its "
            "embeddings). Larger = more local. 1000 is our choice [I]: with the n-gram router features, in tuning runs "
            "of the purify benchmark (previous demo world, before its reference run) the in-domain student "
            "reward was 0.333 at 10 (level with averaging), 0.387 at 100, 0.400 at 1000. "
            "Must be > 1 (at 1 the weights are uniform)."
        },
    )
    plackett_luce_steps: int = field(
        default=20, metadata={"help": "plackett_luce: Newton steps fitting the per-prompt scores."}
    )
    classifier_hidden_size: int = field(
        default=64, metadata={"help": "classifier_router: hidden width of the two-layer MLP."}
    )
    classifier_learning_rate: float = field(
        default=1e-2, metadata={"help": "classifier_router: Adam learning rate of the MLP."}
    )
    classifier_steps: int = field(
        default=4, metadata={"help": "classifier_router: Adam steps on minibatches of the memory after each rollout."}
    )
    classifier_batch_size: int = field(
        default=256, metadata={"help": "classifier_router: prompts per minibatch drawn from the memory."}
    )
    aggregation_temperature: float = field(
        default=0.05,
        metadata={
            "help": "aggregation: teacher weights are softmax(evidence / temperature) on each prompt, the evidence "
            "being the signal where the prompt has one and the teachers' consensus elsewhere (both in [0, 1]); "
            "large values approach the naive average. 0.05 is our choice [I]."
        },
    )
    rl_learning_rate: float = field(
        default=0.005,
        metadata={
            "help": "rl_selection: Adam learning rate of the teacher-selection policy (small: its reward, the "
            "student's measured improvement, is noisy)."
        },
    )
    rl_entropy_coef: float = field(
        default=0.01, metadata={"help": "rl_selection: entropy bonus that keeps the policy exploring."}
    )
    rl_exploration: float = field(
        default=0.1,
        metadata={"help": "rl_selection: share of uniformly random teacher choices mixed into the policy in training."},
    )
    rl_signal_in_state: bool = field(
        default=True,
        metadata={
            "help": "rl_selection: give the policy each teacher's evidence on the prompt: its signal, or the "
            "teachers' consensus where the prompt has no signal (the paper's state carries each teacher's answer "
            "correctness); False: the prompt features only."
        },
    )
    rl_evidence_prior: float = field(
        default=30.0,
        metadata={
            "help": "rl_selection: initial weight theta of the evidence in the policy's logits. At 30 the policy starts "
            "by picking the teacher the evidence favours (a teacher at evidence 1 against one at 1/2: 15 nats of "
            "logit), and the improvement reward adjusts it from there; 0 starts uniform. Our choice [I]: in the "
            "purify benchmark's tuning runs (previous demo world, 4 seeds) the in-domain student reward was 0.20 "
            "at 0, 0.30 at 10, 0.36 at 30 (averaging 0.33)."
        },
    )

    def __post_init__(self):
        raise_for_bad_json(self, ("teacher_model_init_kwargs",))
        super().__post_init__()
        raise_for_bad_field_values(self)
        if self.purification not in PURIFICATIONS:
            raise ValueError(
                f"Unknown `purification={self.purification!r}`. Choose one of {list(PURIFICATIONS)} ('none' averages "
                "all teachers)."
            )
        if self.router_features not in FEATURES:
            raise ValueError(f"Unknown `router_features={self.router_features!r}`; choose one of {list(FEATURES)}.")
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"Unknown `advantage_normalization={self.advantage_normalization!r}`. Choose 'global' (GNDPO) or "
                "'none' (plain on-policy distillation)."
            )
        if isinstance(self.teacher_model_names_or_paths, str):
            raise ValueError(
                f"`teacher_model_names_or_paths` must be a list of teachers, got the string "
                f"{self.teacher_model_names_or_paths!r}. Pass a list, e.g. ['org/teacher-a', 'org/teacher-b']."
            )
        positive = {
            "score_clip": self.score_clip, "teacher_temperature": self.teacher_temperature,
            "plackett_luce_gamma": self.plackett_luce_gamma, "classifier_learning_rate": self.classifier_learning_rate,
            "rl_learning_rate": self.rl_learning_rate, "aggregation_temperature": self.aggregation_temperature,
        }
        at_least_one = {
            "router_feature_dim": self.router_feature_dim, "router_memory_size": self.router_memory_size,
            "similarity_neighbors": self.similarity_neighbors, "plackett_luce_steps": self.plackett_luce_steps,
            "classifier_hidden_size": self.classifier_hidden_size, "classifier_steps": self.classifier_steps,
            "classifier_batch_size": self.classifier_batch_size, "router_min_examples": self.router_min_examples,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}.")
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if not 1 <= self.router_ngram_order <= MAX_NGRAM_ORDER:
            raise ValueError(f"`router_ngram_order` must be in [1, {MAX_NGRAM_ORDER}], got {self.router_ngram_order}.")
        if self.purification == "rl_selection" and self.rl_evidence_prior and not self.rl_signal_in_state:
            raise ValueError(
                f"`rl_evidence_prior={self.rl_evidence_prior}` weights the evidence in the RL policy's state, but "
                "`rl_signal_in_state=False` leaves the evidence out: set rl_evidence_prior=0 or rl_signal_in_state=True."
            )
        if not self.plackett_luce_gamma > 1:
            raise ValueError(
                f"`plackett_luce_gamma` must be > 1, got {self.plackett_luce_gamma}: the weights gamma^(1 + cos) are "
                "uniform at 1 and favour the least similar prompts below it. Use e.g. 10 (RouteLLM) or 1000 (ours)."
            )
        if self.router_features == "teacher_hidden" and self.purification in FEATURELESS:
            raise ValueError(
                f"`router_features='teacher_hidden'` costs an extra teacher pass over every prompt, but "
                f"purification={self.purification!r} reads no prompt features. Leave router_features='ngram'."
            )
        for name in ("rl_entropy_coef", "reward_advantage_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.rl_exploration < 1:
            raise ValueError(f"`rl_exploration` must be in [0, 1), got {self.rl_exploration}.")
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"`importance_sampling_level={self.importance_sampling_level!r}` is not supported: the purified "
                "distillation advantages are per token, and a sequence-level ratio spreads each token's advantage "
                "over the whole sequence. Use importance_sampling_level='token'."
            )

        self._check_no_setting_is_ignored()

    def _check_no_setting_is_ignored(self) -> None:
        """Each method's knobs act only with that method: moved off their defaults for another one, they raise."""
        method = self.purification

        def only(*names: str) -> tuple[bool, str]:
            return method in names, f"purification={names[0]!r}" if len(names) == 1 else f"purification in {names}"

        ngram = (method not in FEATURELESS and self.router_features == "ngram",
                 "router_features='ngram' and a purification that reads prompt features")
        applies = {
            "router_feature_dim": ngram,
            "router_ngram_order": ngram,
            "router_memory_size": only(*MEMORY_ROUTERS),
            "router_min_examples": only(*MEMORY_ROUTERS),
            "similarity_neighbors": only("similarity_router"),
            "aggregation_temperature": only("aggregation"),
            # TRL's reward advantage reaches the loss only through reward_advantage_weight (the signal ranks the
            # raw combined rewards), so its scaling would do nothing without it.
            "scale_rewards": (self.reward_advantage_weight > 0, "reward_advantage_weight > 0"),
        }
        for prefix, owner in (("plackett_luce_", "plackett_luce"), ("classifier_", "classifier_router"),
                              ("rl_", "rl_selection")):
            for f in fields(self):
                if f.name.startswith(prefix):
                    applies[f.name] = only(owner)
        raise_for_ignored_settings(self, applies)

    def router_settings(self) -> RouterSettings:
        return RouterSettings(
            memory_size=self.router_memory_size,
            min_examples=self.router_min_examples,
            similarity_neighbors=self.similarity_neighbors,
            plackett_luce_gamma=self.plackett_luce_gamma,
            plackett_luce_steps=self.plackett_luce_steps,
            classifier_hidden_size=self.classifier_hidden_size,
            classifier_learning_rate=self.classifier_learning_rate,
            classifier_steps=self.classifier_steps,
            classifier_batch_size=self.classifier_batch_size,
            aggregation_temperature=self.aggregation_temperature,
            rl_learning_rate=self.rl_learning_rate,
            rl_entropy_coef=self.rl_entropy_coef,
            rl_exploration=self.rl_exploration,
            rl_signal_in_state=self.rl_signal_in_state,
            rl_evidence_prior=self.rl_evidence_prior,
            seed=self.seed,
        )
