"""The one seam between trl_ext and TRL's private API.

TRL rewrites GRPOTrainer often; every private method, helper or dict key we rely on is named here,
so a TRL upgrade breaks in one place and `tests/test_compat.py` says exactly what moved.

What we rely on (TRL 1.16):
- `GRPOTrainer._generate_and_score_completions(inputs) -> dict`: `trl_ext.core.ExtGRPOTrainer` overrides it,
  calls `super()` and post-processes the dict (the post-rollout hook). The keys we read or write are listed in `ROLLOUT_KEYS`.
- `GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list) -> (N, F) tensor`
  gathered over processes: overridden (with `super()`) to keep the raw rewards and `completion_ids_list` (every
  generated token, also of rows `mask_truncated_completions` hides) for the post-rollout hook; PGPO also keeps
  `completions` as TRL parsed them (tool-calling turns as chat messages in transformers' tool-use format).
- `GRPOTrainer._compute_loss(model, inputs) -> loss`: overridden; `super()._compute_loss` gets modified inputs
  (the loss-inputs hook).
- `GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size,
  ...) -> (logps, entropies, aux_loss)`: we call it to score completions with the student and the teacher.
- `Trainer._save_checkpoint(model, trial)`, `_load_optimizer_and_scheduler(checkpoint)` and `_get_output_dir(trial)`
  (transformers, overridden by TRL): extended to save and restore trl_ext trainer state with each checkpoint.
- `Trainer._save(output_dir, state_dict)` (transformers): wrapped so that a saved PeftModel leaves out the adapters
  that are trainer state (`core/saved_adapters.py`); it calls `model.save_pretrained(output_dir, state_dict=...)`.
- `GRPOTrainer._tokenize_prompts(prompts) -> (prompt_ids, images, multimodal_fields)`: PGPO tokenizes its
  self-teacher's prompts exactly as TRL tokenizes the student's (chat template, tools, chat_template_kwargs).
- `GRPOTrainer._logs`, the completions table that `log_completions` prints: ProRL's refill puts the rows it trains on
  there (`completion_log_tail`, `replace_completion_log_tail`); PGPO adds a column of its self-teacher's advantage
  (`add_completion_log_column`, `set_completion_log_values`).
- `accelerator.sync_gradients` is set by transformers' training loop before each micro-batch and is True on the
  last micro-batch of an optimizer step: PGPO sets that step's learning rate there (before the backward in which
  DeepSpeed steps).
- `trl.generation.vllm_generation.VLLMGeneration._iter_named_params()`, the (name, tensor) pairs of a vLLM weight
  sync: wrapped per trainer (`keep_internal_adapters_out_of_vllm`) so that the copies of LoRA `modules_to_save` kept
  by trl_ext's internal adapters (the EMA teacher, the reference) are not pushed to vLLM as unknown weights.
- helpers from `trl.trainer.utils` / `trl.models`: model loading, the fused LM head, DeepSpeed/FSDP preparation,
  adapter switching (`use_adapter`), and the reference-model EMA of `SyncRefModelCallback` (ZeRO-3 aware).
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import torch
from packaging.version import Version

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [min, max)
TRL_VERSION = Version(version("trl"))


def check_trl_version() -> None:
    """Fail at import with a clear message when the installed TRL is outside the supported range."""
    low, high = SUPPORTED_TRL
    if not (low <= TRL_VERSION < high):
        raise ImportError(
            f"trl_ext supports trl>={low},<{high} because it builds on GRPOTrainer's private methods, but trl=="
            f"{TRL_VERSION} is installed. Install a supported version: pip install 'trl>={low},<{high}'."
        )


check_trl_version()

from trl import GRPOTrainer  # noqa: E402
from trl.models import prepare_deepspeed, prepare_fsdp  # noqa: E402,F401
from accelerate.utils import gather_object, is_peft_model  # noqa: E402,F401
from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402
from trl.trainer.utils import (  # noqa: E402,F401
    add_fused_lm_head,
    create_model_from_path,
    get_config_model_id,
    use_adapter,
)

# Keys of the dict returned by `_generate_and_score_completions` that trl_ext reads or writes.
ROLLOUT_KEYS = {
    "prompt_ids": "(B, P) left-padded prompt token ids",
    "prompt_mask": "(B, P) prompt attention mask",
    "completion_ids": "(B, T) right-padded completion token ids",
    "completion_mask": "(B, T) completion mask (1 on real tokens, 0 on padding)",
    "advantages": "(B,) from TRL; the loss also accepts (B, T)",
    "num_items_in_batch": "0-dim global count of loss tokens in the generation batch",
}
# Optional keys: present only in some configurations.
OPTIONAL_ROLLOUT_KEYS = (
    "old_per_token_logps",
    "tool_mask",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
)
# GRPOTrainer attributes (not methods) that trl_ext reads; the contract test checks they exist on a real trainer.
TRAINER_ATTRIBUTES = ("_metrics", "_logs", "_step", "_buffered_inputs", "num_iterations", "num_generations", "beta",
                      "reward_weights", "multi_objective_aggregation", "eos_token_ids", "ref_model",
                      "num_generations_eval", "temperature", "current_gradient_accumulation_steps",
                      "aux_loss_enabled", "router_aux_loss_coef")
REFERENCE_ADAPTER = "ref"  # TRL's frozen reference adapter, selected by name in _generate_and_score_completions
# Multimodal keys the model forward needs besides input ids and attention mask.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
    "num_tiles",
)

# Parameter names of the private methods we override or call; the contract test compares them to TRL's.
PRIVATE_SIGNATURES = {
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_compute_loss": ["self", "model", "inputs"],
    "_get_per_token_logps_and_entropies": [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ],
    # transformers.Trainer private methods that GRPOTrainer overrides and we extend for trainer state.
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_get_output_dir": ["self", "trial"],
    "_save": ["self", "output_dir", "state_dict"],
    "_tokenize_prompts": ["self", "prompts"],
}


def signature_mismatches() -> list[str]:
    """Describe each private method whose leading parameters differ from what trl_ext was written against."""
    problems = []
    for name, expected in PRIVATE_SIGNATURES.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            problems.append(f"GRPOTrainer.{name} no longer exists")
            continue
        actual = list(inspect.signature(method).parameters)[: len(expected)]
        if actual != expected:
            problems.append(f"GRPOTrainer.{name}{tuple(actual)} != expected {tuple(expected)}")
    return problems


def completion_loss_mask(rollout: dict) -> torch.Tensor:
    """The tokens the loss trains on: completion tokens that are not tool output (TRL: completion_mask * tool_mask)."""
    mask = rollout["completion_mask"]
    if rollout.get("tool_mask") is not None:
        mask = mask * rollout["tool_mask"]
    return mask


def per_token_logps(trainer: GRPOTrainer, model, rollout: dict, batch_size: int | None = None) -> torch.Tensor:
    """Log-probs of the sampled completion tokens under `model`, through TRL's fused-head scorer.

    `model` must carry TRL's fused LM head (`add_fused_lm_head`); the temperature is the one the head was built with.
    """
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
    attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
    multimodal = {key: rollout[key] for key in MULTIMODAL_KEYS if rollout.get(key) is not None}
    logps, _entropies, _aux = trainer._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        rollout["completion_ids"].size(1),
        batch_size=batch_size,
        **multimodal,
    )
    return logps


# ----- GRPOTrainer's micro-batch buffer (TRL 1.16 `_prepare_inputs`) -----------------------------------------------
# `_prepare_inputs` generates once every `steps_per_generation * num_iterations` training steps, shuffles, splits the
# generation batch into `steps_per_generation` micro-batches, keeps them in `_buffered_inputs` and returns
# `_buffered_inputs[_step % steps_per_generation]`. The Kondo gate re-packs that buffer right after generation.
BUFFER_ATTRIBUTES = ("_buffered_inputs", "_step")


def will_generate(trainer: GRPOTrainer) -> bool:
    """Whether the next training `_prepare_inputs` call generates a new batch (and refills the buffer)."""
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer._buffered_inputs is None or trainer._step % generate_every == 0


def micro_batch_buffer(trainer: GRPOTrainer) -> list[dict]:
    return trainer._buffered_inputs


def current_micro_batch(trainer: GRPOTrainer) -> dict:
    return trainer._buffered_inputs[trainer._step % trainer.args.steps_per_generation]


def logged_values(trainer: GRPOTrainer, name: str, mode: str = "train") -> list[float]:
    """The values TRL's loss appended to its metric store in this logging window (e.g. 'kl', 'entropy')."""
    return trainer._metrics[mode][name]


def replace_logged_advantages(trainer: GRPOTrainer, values: list[float]) -> None:
    """TRL's completions table (`log_completions`) records the reward advantages of the rollout it just made, in
    global row order, as the last entries of `_logs["advantages"]`; put the advantages the loss really uses there."""
    replace_completion_log_tail(trainer, {("advantages",): values})


def _completion_log_columns(trainer: GRPOTrainer) -> dict:
    """TRL's completions table (`_logs`): each rollout appends one entry per generated row (all processes, global row
    order) to every column, which keep the latest `generation_batch_size` rows for `log_completions` to print."""
    logs = trainer._logs
    columns = {(name,): logs[name] for name in ("prompt", "completion", "advantages", "images")}
    # Keyed by path, not by a joined string: a reward function's name can be anything, even "" (a reward model
    # built in code).
    columns.update({("rewards", name): column for name, column in logs["rewards"].items()})
    columns.update({("extra", name): column for name, column in logs["extra"].items()})
    return columns


def completion_log_tail(trainer: GRPOTrainer, rows: int) -> dict[tuple[str, ...], list]:
    """The latest `rows` entries of each column of TRL's completions table, keyed by the column's path in `_logs`
    (("prompt",), ("rewards", <function name>), ("extra", <column>), ...), front-filled with None where a column
    holds fewer (an extra column first logged by this rollout, images that are not logged)."""
    tail = {}
    for name, column in _completion_log_columns(trainer).items():
        values = list(column)[len(column) - min(rows, len(column)):]
        tail[name] = [None] * (rows - len(values)) + values
    return tail


def replace_completion_log_tail(trainer: GRPOTrainer, table: dict[tuple[str, ...], list]) -> None:
    """Replace the latest entries of each column of TRL's completions table with `table`'s (as many as `table` has
    rows; the keys of `completion_log_tail`). A column that is all None and not logged stays empty."""
    logs = trainer._logs
    for path, values in table.items():
        column = logs[path[0]] if len(path) == 1 else logs[path[0]][path[1]]
        if not column and all(v is None for v in values):
            continue
        for _ in range(min(len(values), len(column))):
            column.pop()
        column.extend(values)


def add_completion_log_column(trainer: GRPOTrainer, name: str, rows: int) -> None:
    """Give the rollout just logged an extra column `name` in TRL's completions table, empty (None) for now: one
    entry per row, as TRL's own extra columns (`log_extra`) have."""
    trainer._logs["extra"][name].extend([None] * rows)


def set_completion_log_values(trainer: GRPOTrainer, name: str, rows: list[int], values: list, batch_rows: int) -> None:
    """Fill rows `rows` (global indices into the latest rollout, of `batch_rows` rows) of extra column `name`."""
    column = trainer._logs["extra"][name]
    offset = len(column) - batch_rows
    for row, value in zip(rows, values):
        column[offset + row] = value


# ----- used by PGPOTrainer ---------------------------------------------------------------------------------------
def tokenize_prompts(trainer: GRPOTrainer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt, rendered and tokenized exactly as GRPOTrainer does for generation."""
    prompt_ids, _images, _multimodal = trainer._tokenize_prompts(prompts)
    return [list(ids) for ids in prompt_ids]


def router_aux_loss_enabled(trainer: GRPOTrainer) -> bool:
    """Whether GRPOTrainer adds an MoE model's router load-balancing loss (`router_aux_loss_coef` times the forward's
    `aux_loss`, requested with `output_router_logits=True`) to its loss; the coefficient is
    `trainer.router_aux_loss_coef`."""
    return bool(trainer.aux_loss_enabled)


def is_last_micro_batch(trainer: GRPOTrainer) -> bool:
    """Whether the micro-batch being computed is the last one before the optimizer steps."""
    return bool(trainer.accelerator.sync_gradients)


def ema_update_model(source: torch.nn.Module, target: torch.nn.Module, rate: float) -> None:
    """target <- (1 - rate) * target + rate * source, parameter by parameter (gathers ZeRO-3 shards, as TRL does for
    its TR-DPO reference model)."""
    SyncRefModelCallback.sync_target_model(source, target, rate)


def keep_internal_adapters_out_of_vllm(trainer: GRPOTrainer, internal_adapters: set[str]) -> None:
    """TRL's vLLM weight sync merges the active LoRA adapter and renames only `modules_to_save.default.` copies;
    the copies of `modules_to_save` that every other adapter keeps (`lm_head.modules_to_save.teacher.weight`) would
    be pushed under names vLLM does not know. Drop the copies of the adapters in `internal_adapters` (a live set:
    adapters added later are dropped too). The filter sits after TRL's gathers, so every process still takes part
    in each collective."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return
    iterate = generation._iter_named_params

    def named_params_without_internal_copies():
        for name, param in iterate():
            if not any(f"modules_to_save.{adapter}." in name for adapter in internal_adapters):
                yield name, param

    generation._iter_named_params = named_params_without_internal_copies
