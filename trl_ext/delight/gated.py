"""The Kondo gate as a component any trl_ext trainer can switch on: a config mixin and a trainer mixin.

    @dataclass
    class GatedGNDPOConfig(KondoGateArguments, GNDPOConfig): ...
    class GatedGNDPOTrainer(KondoGateMixin, GNDPOTrainer): ...

After the trainer's own post-rollout processing, every completion of the generation batch gets a delight
chi = mean_t(A_t * l_t) (A: the advantage the trainer feeds the loss, or `_gate_advantages`; l: surprisal), the gate
decides on the gathered batch (identical on all ranks), and the micro-batches are re-packed so that survivors fill
as few of them as possible. Micro-batches with no survivor on any rank skip the forward and backward pass, except the
last of an accumulation window when it must run (several processes, or a trainer whose loss closes the step there):
that one runs empty.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _compat
from ..core.field_values import raise_for_bad_field_values
from ..core.ignored_settings import raise_for_ignored_settings
from ..core.model_card import metric_prefixes
from ..core.rows import concat_rows, take_rows
from ..core.stats import masked_moments
from ..core.trainer import image_columns
from .delight import sequence_delight, surprisal, token_delight
from .gate import GATE_RULES, KondoGate
from .packing import chunks_needed, pack_survivors, survivor_chunk_sizes

SURPRISAL_SOURCES = ("policy", "sampler")
NORMALIZERS = ("all_tokens", "survivors")
# Losses normalized by the generation batch's token count (`num_items_in_batch`), which the gate can keep fixed.
TOKEN_COUNT_LOSSES = ("dapo", "cispo", "vespo")


@dataclass
class KondoGateArguments:
    """Config fields of the Kondo gate; mix into any trl_ext config: `class C(KondoGateArguments, XConfig)`."""

    gate: str = field(
        default="none",
        metadata={
            "help": "Kondo gate rule deciding which completions get a backward pass: 'none'; 'price' (keep with "
            "probability sigmoid((chi - gate_price) / gate_eta)); 'threshold' (keep chi > gate_price); "
            "'pass_rate' (price = the (1 - gate_pass_rate) quantile of a rolling delight history).",
            "choices": list(GATE_RULES),
        },
    )
    gate_price: float = field(
        default=0.0,
        metadata={"help": "Compute price lambda for the 'price' and 'threshold' rules (0 = zero-price gating); "
                  "'pass_rate' sets its own price, so setting this with it raises."},
    )
    gate_eta: float = field(
        default=1.0,
        metadata={"help": "Temperature eta of the 'price' rule's sigmoid (paper: 1.0). Must be > 0. Only the 'price' "
                  "rule uses it ('threshold' is its eta -> 0 limit)."},
    )
    gate_pass_rate: float = field(
        default=0.2,
        metadata={"help": "Target pass rate rho in (0, 1] of the 'pass_rate' rule (1 = keep everything); only that "
                  "rule uses it."},
    )
    gate_history_size: int = field(
        default=1024,
        metadata={"help": "Number of recent completion delights whose quantile sets the 'pass_rate' price (only "
                  "that rule uses it)."},
    )
    gate_surprisal: str = field(
        default="policy",
        metadata={
            "help": "Where the gate's surprisal comes from: 'policy' (the policy's log-probs of its samples, from "
            "the no-grad scoring pass TRL or trl_ext already runs: a cheap forward screens, the expensive backward "
            "is gated) or 'sampler' (the generator's log-probs; needs use_vllm=True or a rollout_func that returns "
            "logprobs).",
            "choices": list(SURPRISAL_SOURCES),
        },
    )
    gate_normalizer: str = field(
        default="all_tokens",
        metadata={
            "help": "Loss normalizer with the gate: 'all_tokens' (the paper's: every valid token of the batch, "
            "gated or not) or 'survivors' (only the tokens of completions that passed).",
            "choices": list(NORMALIZERS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        raise_for_bad_field_values(self)
        if self.gate not in GATE_RULES:
            raise ValueError(f"Unknown `gate={self.gate!r}`; choose one of {list(GATE_RULES)}.")
        if self.gate_eta <= 0:
            raise ValueError(f"`gate_eta` must be > 0, got {self.gate_eta}; for a hard gate use gate='threshold'.")
        if not 0 < self.gate_pass_rate <= 1:
            raise ValueError(
                f"`gate_pass_rate` must be in (0, 1], got {self.gate_pass_rate}: it is the fraction of completions "
                "that get a backward pass (1 keeps all)."
            )
        if self.gate_history_size < 1:
            raise ValueError(f"`gate_history_size` must be >= 1, got {self.gate_history_size}.")
        if self.gate_surprisal not in SURPRISAL_SOURCES:
            raise ValueError(f"Unknown `gate_surprisal={self.gate_surprisal!r}`; choose one of {SURPRISAL_SOURCES}.")
        if self.gate_normalizer not in NORMALIZERS:
            raise ValueError(f"Unknown `gate_normalizer={self.gate_normalizer!r}`; choose one of {NORMALIZERS}.")
        self._check_no_gate_setting_is_ignored()
        if self.gate != "none":
            self._check_trl_entropy_terms()
        if self.gate != "none" and not windows_tile(self.steps_per_generation, self.gradient_accumulation_steps):
            # Survivors are packed last in each accumulation window of a rollout's micro-batches; the optimizer's
            # windows must line up with those, or the window-ending micro-step (where DDP all-reduces) can be a
            # skipped one and replicas drift apart.
            raise ValueError(
                f"The Kondo gate packs survivors into the optimizer's gradient-accumulation windows, which needs one "
                f"of steps_per_generation and gradient_accumulation_steps to divide the other, but got "
                f"steps_per_generation={self.steps_per_generation} and gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}. Set steps_per_generation to a multiple or a divisor of "
                f"gradient_accumulation_steps (TRL's default is equal), or gate='none'."
            )
        if self.gate != "none" and self.loss_type not in TOKEN_COUNT_LOSSES:
            raise ValueError(
                f"The Kondo gate needs a loss normalized by the batch's token count, but loss_type="
                f"{self.loss_type!r} averages over the rows of each micro-batch, so skipped completions would change "
                f"the scale. Use loss_type in {TOKEN_COUNT_LOSSES} (TRL's default is 'dapo')."
            )

    def _check_no_gate_setting_is_ignored(self) -> None:
        # gate_eta only tempers the 'price' rule's sigmoid; 'threshold' is its eta -> 0 limit and ignores it.
        raise_for_ignored_settings(self, {
            "gate_price": (self.gate in ("price", "threshold"), "gate='price' or gate='threshold'"),
            "gate_eta": (self.gate == "price", "gate='price'"),
            "gate_pass_rate": (self.gate == "pass_rate", "gate='pass_rate'"),
            "gate_history_size": (self.gate == "pass_rate", "gate='pass_rate'"),
            "gate_surprisal": (self.gate != "none", "a gate (gate='price', 'threshold' or 'pass_rate')"),
            "gate_normalizer": (self.gate != "none", "a gate (gate='price', 'threshold' or 'pass_rate')"),
        })

    def _check_trl_entropy_terms(self) -> None:
        """TRL's entropy terms act per micro-batch, which the gate re-packs: refuse them rather than change them."""
        bonus = "use_adaptive_entropy=True" if self.use_adaptive_entropy else f"entropy_coef={self.entropy_coef}"
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                f"`{bonus}` adds TRL's entropy bonus, a mean over each micro-batch's tokens divided by "
                "gradient_accumulation_steps; the Kondo gate skips micro-steps, so the bonus's total weight would "
                "shrink with the number of micro-batches the survivors fill. Set entropy_coef=0.0 and "
                "use_adaptive_entropy=False, or gate='none'."
            )
        if self.top_entropy_quantile != 1.0:
            raise ValueError(
                f"`top_entropy_quantile={self.top_entropy_quantile}` keeps the highest-entropy tokens of each "
                "micro-batch; the Kondo gate packs only survivors into micro-batches, so the quantile would be taken "
                "over survivors instead of TRL's batch. Set top_entropy_quantile=1.0, or gate='none'."
            )


def windows_tile(steps_per_generation: int, gradient_accumulation_steps: int) -> bool:
    """Whether every optimizer window ends on the last micro-step of a packed window.

    Windows are counted in micro-steps from the start of training. When gradient_accumulation_steps (GA) divides
    steps_per_generation (spg), each rollout holds whole optimizer windows and is packed window by window. When
    spg divides GA, each optimizer window holds whole rollouts, is closed by a rollout's last micro-step, and each
    rollout is packed as one window whose last micro-step computes. Otherwise a window can end on a skipped step.
    """
    spg, ga = steps_per_generation, gradient_accumulation_steps
    return spg % ga == 0 or ga % spg == 0


def refuse_image_datasets(args, train_dataset) -> None:
    """The gate re-packs micro-batches row by row, which TRL's image inputs (pixel values with a per-row image
    count) do not allow: refuse an image dataset when the trainer is built rather than at the first rollout."""
    images = image_columns(train_dataset)
    if images and getattr(args, "gate", "none") != "none":
        raise NotImplementedError(
            f"The training dataset has image column(s) {images}, but the Kondo gate (gate={args.gate!r}) re-packs "
            "micro-batches row by row and supports text models only. Use a text-only dataset, or gate='none'."
        )


class SavedDict:
    """Checkpoints a plain dict (e.g. the gate's counters) in place, so that it stays a plain dict for its users."""

    def __init__(self, values: dict):
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.update(state)


class KondoGateMixin:
    """Put before an `ExtGRPOTrainer` subclass in the bases; its config must include `KondoGateArguments`."""

    def __init__(self, *args, **kwargs):
        refuse_sampler_surprisal_without_a_sampler(type(self), args, kwargs)
        super().__init__(*args, **kwargs)
        args = self.args
        if not isinstance(args, KondoGateArguments):
            raise TypeError(f"{type(self).__name__} needs a config that includes KondoGateArguments.")
        refuse_image_datasets(args, self.train_dataset)  # DelightTrainer checks earlier, before loading weights
        self.kondo_gate = KondoGate(args.gate, args.gate_price, args.gate_eta, args.gate_pass_rate,
                                    args.gate_history_size, seed=args.seed)
        # Running totals of the gate's work over the whole run.
        self.gate_counters = {"micro_batches": 0, "micro_batches_skipped": 0, "completions": 0, "completions_kept": 0}
        if args.gate != "none":
            # Only a gate has state: without one, checkpoints of plain GRPOTrainer (no trl_ext state) still resume.
            self.register_state("kondo_gate", self.kondo_gate)
            self.register_state("gate_counters", SavedDict(self.gate_counters))
        # Sharded models (ZeRO-3, FSDP) all-gather weights inside forward, so every rank must run a forward on every
        # micro-step: there, skipped micro-steps run a one-row, zero-weight forward instead of nothing. Plain DDP and
        # single processes skip them entirely.
        self._gate_always_forward = self.is_deepspeed_enabled or self.is_fsdp_enabled

    @property
    def _gate_active(self) -> bool:
        return self.args.gate != "none" and self.model.training

    # ----- what the gate looks at (override in trainers) -------------------------------------------------------
    def _gate_advantages(self, rollout: dict[str, Any]) -> torch.Tensor:
        """The advantage in chi = A * l: by default the one the trainer feeds the loss, (B,) or (B, T)."""
        return rollout["advantages"]

    def _gate_surprisals(self, rollout: dict[str, Any]) -> torch.Tensor:
        if self.args.gate_surprisal == "sampler":
            if "sampling_per_token_logps" not in rollout:  # TRL keeps them only when the backend returned them
                raise ValueError(
                    "gate_surprisal='sampler' prices completions by the generator's log-probs, but this rollout has "
                    "none (vLLM returns them; a `rollout_func` must return `logprobs`). Use gate_surprisal='policy'."
                )
            return surprisal(rollout["sampling_per_token_logps"])
        return surprisal(self.student_logps(rollout))

    # ----- post-rollout: decide ----------------------------------------------------------------------------------
    def _postprocess_rollout(self, inputs, rollout):
        rollout = super()._postprocess_rollout(inputs, rollout)
        if not self._gate_active:
            return rollout
        if any(key in rollout for key in ("pixel_values", "num_images")):
            # Datasets with image columns are refused at construction; images can still come from elsewhere (an
            # iterable dataset without column names, a rollout_func).
            raise NotImplementedError("The Kondo gate re-packs micro-batches row by row and supports text models only.")
        mask = self.loss_mask(rollout)
        chi = sequence_delight(token_delight(self._gate_advantages(rollout), self._gate_surprisals(rollout)), mask)
        # A completion without loss tokens (masked by dynamic sampling or mask_truncated_completions) has nothing to
        # learn: as NaN it never passes and stays out of the price history (not counted as a non-finite delight).
        has_tokens = mask.sum(-1) > 0
        chi = torch.where(has_tokens, chi.float(), torch.nan)
        all_chi, all_has_tokens = self.accelerator.gather((chi, has_tokens.float()))  # one gather of both
        all_has_tokens = all_has_tokens > 0
        keep_all = self.kondo_gate.decide(all_chi)
        rank, local = self.accelerator.process_index, chi.shape[0]
        keep = keep_all[rank * local:(rank + 1) * local].to(mask.device)
        rollout["kondo_keep"] = keep
        if self.args.gate_normalizer == "survivors":
            self._count_survivor_tokens(rollout, keep)

        finite = torch.isfinite(all_chi)
        moments = masked_moments(all_chi, finite)
        # Rates and counts are over the completions there was something to learn from (the gate's decisions).
        decided_rows = all_has_tokens.to(keep_all.device)  # the gate decides on CPU
        decided = int(decided_rows.sum())
        pass_rate = keep_all[decided_rows].float().mean().item() if decided else float("nan")
        self._metrics["train"]["delight/pass_rate"].append(pass_rate)
        self._metrics["train"]["delight/nonfinite_delights"].append(float((~finite & all_has_tokens).sum().item()))
        self._metrics["train"]["delight/completions_skipped"].append(float((~keep_all & decided_rows).sum().item()))
        self._metrics["train"]["delight/price"].append(self.kondo_gate.last_price)
        self._metrics["train"]["delight/sequence_delight_mean"].append(moments.mean.item())
        self._metrics["train"]["delight/sequence_delight_std"].append(moments.std.item())
        self.gate_counters["completions"] += decided
        self.gate_counters["completions_kept"] += int(keep_all.sum())
        return rollout

    def _count_survivor_tokens(self, rollout: dict[str, Any], keep: torch.Tensor) -> None:
        """'survivors': every token count the trainer's loss divides by counts only the completions that passed
        (GRPO's `num_items_in_batch`, and e.g. PGPO's distillation tokens). One all-reduce for all of them."""
        counts = self._loss_normalizers(rollout)
        kept = torch.stack([(tokens * keep).sum() for tokens in counts.values()]).to(torch.float64)
        for key, total in zip(counts, self.reduce_sum(kept), strict=True):
            rollout[key] = total.round().to(dtype=rollout[key].dtype, device=rollout[key].device)

    # ----- buffer: pack survivors --------------------------------------------------------------------------------
    def _prepare_inputs(self, generation_batch):
        fresh = self._gate_active and _compat.will_generate(self)
        batch = super()._prepare_inputs(generation_batch)
        if not fresh:
            return batch
        buffer = _compat.micro_batch_buffer(self)
        window = self.args.gradient_accumulation_steps
        if len(buffer) % window:
            # A rollout shorter than an accumulation window (it divides it: see `windows_tile`): pack it as one.
            window = len(buffer)
        skipped = 0
        for start in range(0, len(buffer), window):
            packed = self._pack_window(buffer[start:start + window])
            buffer[start:start + window] = packed
            skipped += sum("kondo_skip" in chunk for chunk in packed)
        self.gate_counters["micro_batches"] += len(buffer)
        self.gate_counters["micro_batches_skipped"] += skipped
        self._metrics["train"]["delight/backward_passes_skipped"].append(float(skipped))
        self._metrics["train"]["delight/backward_passes"].append(float(len(buffer) - skipped))
        return _compat.current_micro_batch(self)

    def _pack_window(self, chunks: list[dict]) -> list[dict]:
        rows = concat_rows(chunks)
        keep = rows.pop("kondo_keep")
        survivors = torch.tensor([int(keep.sum())], device=self.accelerator.device)
        all_survivors = self.accelerator.gather(survivors).tolist()
        # Every rank runs the same number of forward/backward passes: as many as the busiest rank needs.
        compute = max(chunks_needed(n, self.args.per_device_train_batch_size) for n in all_survivors)
        multi_process = self.accelerator.num_processes > 1
        if compute == 0 and (multi_process or self.loss_closes_each_step):
            # Keep one forward: the window's last micro-step synchronizes gradients across ranks, and a trainer's
            # loss may finish per-step work there (PGPO's step size, ProRL's step signals).
            compute = 1
        # TRL's loss gathers per-row metrics, which needs the same row count on every rank at each micro-step.
        width = max(-(-n // compute) for n in all_survivors) if compute and multi_process else None
        # The micro-steps in which no rank has a survivor: what runs there is padding everywhere.
        sizes = [survivor_chunk_sizes(n, len(chunks), compute) for n in all_survivors]
        empty_everywhere = [not any(rank[position] for rank in sizes) for position in range(len(chunks))]
        packed = []
        for position, index in enumerate(pack_survivors(keep, len(chunks), compute)):
            is_compute = position >= len(chunks) - compute
            if not is_compute and not self._gate_always_forward:
                packed.append({"kondo_skip": torch.tensor(True)})
                continue
            batch = self._padded_micro_batch(rows, index, width if is_compute else 1)
            if empty_everywhere[position]:
                batch["kondo_empty"] = torch.tensor(True)
            packed.append(batch)
        return packed

    @staticmethod
    def _padded_micro_batch(rows: dict, index: torch.Tensor, width: int | None) -> dict:
        """The rows `index`, padded to `width` rows that have nothing to learn (zero completion mask).

        Padding keeps collectives in step across ranks; an all-padding micro-batch is a graph-connected zero loss.
        """
        width = max(width or index.numel(), 1)
        padding = torch.zeros(width - index.numel(), dtype=torch.long)
        batch = take_rows(rows, torch.cat([index, padding]))
        if padding.numel():
            batch["completion_mask"] = batch["completion_mask"].clone()
            batch["completion_mask"][index.numel():] = 0
        return batch

    # ----- loss ----------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if "kondo_skip" in inputs:
            # No rank has a survivor in this micro-step: no forward, no backward compute. The zero still touches
            # every trainable parameter so that the optimizer and gradient accumulation see a well-formed graph.
            return torch.stack([p.sum() for p in model.parameters() if p.requires_grad]).sum() * 0.0
        if "kondo_empty" not in inputs:
            return super()._compute_loss(model, inputs)
        # Padding on every rank (a window nothing passed, or a sharded model's forward-only micro-step): TRL's metrics
        # of it (entropy, KL, clip ratios) would read as measured zeros. They become NaN, which TRL's log leaves out;
        # the trainers' own metrics (their prefixes) are token-weighted or logged per step, and stay.
        inputs = {key: value for key, value in inputs.items() if key != "kondo_empty"}
        metrics = self._metrics[self._mode]
        before = {key: len(values) for key, values in metrics.items()}
        loss = super()._compute_loss(model, inputs)
        own = metric_prefixes(self)
        for key, values in metrics.items():
            if not key.startswith(own):
                values[before.get(key, 0):] = [math.nan] * (len(values) - before.get(key, 0))
        return loss


def refuse_sampler_surprisal_without_a_sampler(trainer_cls: type, args: tuple, kwargs: dict) -> None:
    """Before any weights load: 'sampler' surprisal needs generator log-probs, from vLLM or a `rollout_func` (the
    config alone cannot tell, since the rollout_func is a trainer argument)."""
    # The arguments by name, as the first __init__ after the mixin that names them (not a bare *args, **kwargs) reads
    # them: GRPOTrainer's, or a trl_ext trainer's that adds its own (teachers).
    after_mixin = trainer_cls.__mro__[trainer_cls.__mro__.index(KondoGateMixin) + 1:]
    for cls in after_mixin:
        parameters = inspect.signature(cls.__init__).parameters
        if "args" in parameters and parameters["args"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
    try:
        given = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
    except TypeError:
        return  # the trainer's own __init__ reports bad arguments
    config = given.get("args")
    rollout_func = given.get("rollout_func") or kwargs.get("rollout_func")  # also through a subclass's **kwargs
    if getattr(config, "gate_surprisal", None) != "sampler" or config.use_vllm or rollout_func is not None:
        return
    raise ValueError(
        "`gate_surprisal='sampler'` uses the generator's log-probs, which vLLM or a `rollout_func` returning "
        "`logprobs` provides, but use_vllm=False and no rollout_func was given. Set use_vllm=True, pass such a "
        "rollout_func, or use gate_surprisal='policy'."
    )


def skipped_fraction(counters: dict[str, int]) -> float:
    return counters["micro_batches_skipped"] / max(1, counters["micro_batches"])

