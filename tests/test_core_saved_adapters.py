"""A saved PeftModel leaves out the adapters that are trainer state, and keeps every other adapter."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trl_ext.core.saved_adapters import saving_adapters_except

LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")


def test_internal_adapters_are_left_out_and_the_others_kept(tmp_path, student_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student_path), LORA)
    model.add_adapter("teacher", LORA)
    model.add_adapter("users_other", LORA)
    with saving_adapters_except(model, {"teacher", "ref"}):
        model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "saved" / "users_other" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "saved" / "teacher").exists()
    assert "save_pretrained" not in vars(model)  # restored: later saves are PEFT's own again
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "teacher").is_dir()


def test_nothing_changes_without_internal_adapters(tmp_path, student_path):
    plain = AutoModelForCausalLM.from_pretrained(student_path)
    with saving_adapters_except(plain, {"teacher"}):
        assert "save_pretrained" not in vars(plain)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student_path), LORA)
    with saving_adapters_except(model, {"teacher"}):
        assert "save_pretrained" not in vars(model)
