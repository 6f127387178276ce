"""Contract with TRL's private API: fails loudly, naming the TRL version, when something we rely on moves."""

import pytest
import torch

from trl_ext import _compat


def test_supported_trl_version():
    low, high = _compat.SUPPORTED_TRL
    assert low <= _compat.TRL_VERSION < high, f"trl {_compat.TRL_VERSION} is outside [{low}, {high})"


def test_version_guard_message(monkeypatch):
    from packaging.version import Version

    monkeypatch.setattr(_compat, "TRL_VERSION", Version("1.17.0"))
    with pytest.raises(ImportError, match=r"trl==1.17.0 is installed"):
        _compat.check_trl_version()


def test_private_method_signatures():
    problems = _compat.signature_mismatches()
    assert not problems, f"TRL {_compat.TRL_VERSION} changed private API trl_ext uses: " + "; ".join(problems)


def test_private_helpers_exist():
    for name in ("add_fused_lm_head", "create_model_from_path", "get_config_model_id", "prepare_deepspeed",
                 "prepare_fsdp", "use_adapter", "gather_object", "is_peft_model"):
        assert callable(getattr(_compat, name)), f"TRL {_compat.TRL_VERSION}: {name} moved"


def test_rollout_dict_keys_and_shapes(tmp_path, student_path, teacher_path, arithmetic_dataset):
    """Run TRL's real rollout once and check every key the post-rollout hook reads, with its shape."""
    from conftest import cpu_config

    from trl_ext import GNDPOConfig, GNDPOTrainer

    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path, max_steps=1),
                           train_dataset=arithmetic_dataset, teacher_model=teacher_path)
    seen = {}

    def record(inputs, rollout):
        seen["keys"] = set(rollout)
        seen["shapes"] = {k: tuple(v.shape) for k, v in rollout.items() if hasattr(v, "shape")}
        seen["mask"] = rollout["completion_mask"].clone()
        seen["rewards"] = trainer.rollout_rewards
        seen["completion_ids"] = trainer.rollout_completion_ids
        return rollout

    trainer._postprocess_rollout = record
    trainer.train()
    missing = set(_compat.ROLLOUT_KEYS) - seen["keys"]
    assert not missing, f"TRL {_compat.TRL_VERSION}: rollout dict lost keys {missing}"
    rows, length = seen["shapes"]["completion_ids"]
    assert seen["shapes"]["advantages"] == (rows,)
    assert seen["shapes"]["completion_mask"] == (rows, length)
    assert seen["shapes"]["num_items_in_batch"] == ()
    assert seen["rewards"].shape == (rows, 1)  # _calculate_rewards returned (N, num_reward_funcs)
    # ... and received each completion's generated tokens, which the completion mask marks
    assert [len(ids) for ids in seen["completion_ids"]] == seen["mask"].sum(dim=1).tolist()
    missing_attributes = [a for a in _compat.TRAINER_ATTRIBUTES if not hasattr(trainer, a)]
    assert not missing_attributes, f"TRL {_compat.TRL_VERSION}: GRPOTrainer lost attributes {missing_attributes}"

    # The completions table: one entry per generated row in each column, and a replaced tail reads back.
    table = _compat.completion_log_tail(trainer, rows)
    reward_columns = [path for path in table if path[0] == "rewards"]
    per_row = [table[("prompt",)], table[("completion",)], table[("advantages",)], *(table[c] for c in reward_columns)]
    assert len(reward_columns) == 1 and all(len(column) == rows for column in per_row)
    assert all(None not in column for column in per_row), (
        f"TRL {_compat.TRL_VERSION}: the completions table (_logs) no longer holds one entry per generated row")
    reordered = {name: values[::-1] for name, values in table.items()}
    _compat.replace_completion_log_tail(trainer, reordered)
    assert _compat.completion_log_tail(trainer, rows) == reordered
    assert not trainer._logs["images"]  # an unlogged column stays empty


def test_prompt_tokenization_matches_generation(tmp_path, student_path, arithmetic_dataset):
    """PGPO renders teacher prompts with TRL's own prompt tokenizer: the ids must equal the rollout's prompt ids."""
    from conftest import cpu_config

    from trl_ext import GNDPOConfig, GNDPOTrainer

    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path), train_dataset=arithmetic_dataset,
                           teacher_model=student_path)
    prompts = [row["prompt"] for row in arithmetic_dataset.select(range(2))]
    ids = _compat.tokenize_prompts(trainer, prompts)
    expected = trainer.processing_class.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"]
    assert ids == [list(x) for x in expected]


def test_sync_gradients_marks_the_last_micro_batch(tmp_path, student_path, arithmetic_dataset):
    """transformers sets `accelerator.sync_gradients` before each micro-batch; PGPO sets the step's LR on the last."""
    from conftest import cpu_config

    from trl_ext import GNDPOConfig, GNDPOTrainer

    class Recording(GNDPOTrainer):
        flags = []

        def _compute_loss(self, model, inputs):
            self.flags.append(_compat.is_last_micro_batch(self))
            return super()._compute_loss(model, inputs)

    trainer = Recording(model=student_path, args=cpu_config(GNDPOConfig, tmp_path, gradient_accumulation_steps=3),
                        train_dataset=arithmetic_dataset, teacher_model=student_path)
    trainer.train()
    assert trainer.flags == [False, False, True, False, False, True]


def test_ema_update_model():
    import torch

    source, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.75 * t.detach() + 0.25 * s.detach() for t, s in zip(target.parameters(), source.parameters())]
    _compat.ema_update_model(source, target, 0.25)
    assert all(torch.allclose(t, e) for t, e in zip(target.parameters(), expected))


def test_vllm_weight_sync_leaves_out_internal_adapter_copies():
    # TRL's sync renames only `modules_to_save.default.`; the teacher's and reference's copies of a LoRA
    # `modules_to_save` module would reach vLLM under names it does not know. Runs TRL's real name iteration
    # (vLLM itself is not needed for it) on a tiny PEFT model.
    import contextlib
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.generation.vllm_generation import VLLMGeneration

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"]))
    for adapter in ("teacher", _compat.REFERENCE_ADAPTER):
        model.add_adapter(adapter, model.peft_config["default"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.fill_(0.5)
    generation = VLLMGeneration.__new__(VLLMGeneration)
    generation.model = model
    generation._dist = SimpleNamespace(is_fsdp=False, gather_params=lambda params: contextlib.nullcontext())
    vllm_names = {name for name, _ in LlamaForCausalLM(config).named_parameters()}

    unknown = {name for name, _ in generation._iter_named_params()} - vllm_names
    assert unknown == {"lm_head.modules_to_save.teacher.weight", "lm_head.modules_to_save.ref.weight"}, unknown

    internal = {_compat.REFERENCE_ADAPTER}
    _compat.keep_internal_adapters_out_of_vllm(SimpleNamespace(vllm_generation=generation), internal)
    internal.add("teacher")  # registered after the wrap, as PGPO's teacher adapter is
    pushed = list(generation._iter_named_params())
    assert {name for name, _ in pushed} == vllm_names and len(pushed) == len(vllm_names)
    assert (dict(pushed)["lm_head.weight"] == 0.5).all()  # the trained adapter's copy
    assert model.active_adapter == "default"
