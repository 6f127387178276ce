"""The embedded offline world: tokenizer, tasks, rewards, cached pretrained models."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_ext import demo
from trl_ext.demo import pretrained as pretrained_module


def test_tokenizer_is_character_level_with_chat_template():
    tokenizer = demo.build_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "rev abc"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nrev abc<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("abc")["input_ids"]
    assert len(ids) == 3 and tokenizer.decode(ids) == "abc"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.padding_side == "left"


def test_saved_tokenizer_reloads_with_the_same_ids(student_path):
    reloaded = AutoTokenizer.from_pretrained(student_path)
    text = "<|im_start|>user\n12+7=<|im_end|>\n"
    assert reloaded(text)["input_ids"] == demo.build_tokenizer()(text)["input_ids"]


def test_tasks_rewards_by_hand():
    assert demo.task_reward(["7", " 7 ", "8"], task=["arithmetic"] * 3, answer=["7"] * 3) == [1.0, 1.0, 0.0]
    # Reversal: per-position accuracy, missing positions count as wrong.
    assert demo.task_reward(["cba", "cxa", "c"], task=["reversal"] * 3, answer=["cba"] * 3) == [
        1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]
    conversational = [[{"role": "assistant", "content": "cba"}]]
    assert demo.task_reward(conversational, task=["reversal"], answer=["cba"]) == [1.0]


def test_datasets_are_deterministic_and_verifiable():
    a = demo.get_task("reversal").dataset(20, seed=5)
    b = demo.get_task("reversal").dataset(20, seed=5)
    assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
    assert a["prompt"] != demo.get_task("reversal").dataset(20, seed=6)["prompt"]
    for prompt, answer in zip(a["prompt"], a["answer"]):
        assert prompt[0]["content"].split()[1][::-1] == answer
    for prompt, answer in zip(demo.get_task("arithmetic").dataset(20)["prompt"],
                              demo.get_task("arithmetic").dataset(20)["answer"]):
        x, y = prompt[0]["content"].rstrip("=").split("+")
        assert int(x) + int(y) == int(answer)
    with pytest.raises(ValueError, match="Unknown demo task"):
        demo.get_task("chess")


def sampled_reward(path, task, n=128):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    data = demo.get_task(task).dataset(n, seed=99)
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in data["prompt"]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=8, do_sample=True)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(demo.task_reward(texts, task=[task] * n, answer=data["answer"])) / n


def test_teacher_is_clearly_better_than_an_untrained_student(teacher_path, tmp_path):
    untrained = demo.pretrained_model(demo.untrained(seed=3), cache_dir=tmp_path)
    teacher_reward = sampled_reward(teacher_path, "arithmetic")
    assert teacher_reward > 0.9
    assert sampled_reward(untrained, "arithmetic") < 0.1
    # The demo's weak student sits in between, so distillation has room to improve it.
    assert 0.1 < sampled_reward(demo.student_path("arithmetic"), "arithmetic") < teacher_reward - 0.3


def test_pretrained_models_are_cached_by_recipe(tmp_path, monkeypatch):
    recipe = demo.Pretraining(tasks=("reversal",), steps=5, batch_size=4, num_examples=16)
    path = demo.pretrained_model(recipe, cache_dir=tmp_path)
    assert (tmp_path / recipe.key() / "model.safetensors").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("a cached recipe was rebuilt")

    monkeypatch.setattr(pretrained_module, "_build", fail)
    assert demo.pretrained_model(recipe, cache_dir=tmp_path) == path
    other = demo.Pretraining(tasks=("reversal",), steps=6, batch_size=4, num_examples=16)
    assert other.key() != recipe.key()


def test_the_cache_key_follows_the_code_that_builds_the_model(tmp_path, monkeypatch):
    # A cache keyed by the recipe alone kept serving models built by earlier code.
    probe = tmp_path / "demo_build_probe.py"
    probe.write_text("STEPS = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = pretrained_module.code_fingerprint(["demo_build_probe"], ["torch"])
    assert pretrained_module.code_fingerprint(["demo_build_probe"], ["torch"]) == before
    probe.write_text("STEPS = 2\n")
    assert pretrained_module.code_fingerprint(["demo_build_probe"], ["torch"]) != before
    assert pretrained_module.code_fingerprint([], ["torch"]) != pretrained_module.code_fingerprint([], [])

    recipe = demo.Pretraining()
    key = recipe.key()
    monkeypatch.setattr(pretrained_module, "build_fingerprint", lambda: "other code")
    assert recipe.key() != key
    # Every module whose code the build runs is fingerprinted.
    build_parts = (pretrained_module._build, pretrained_module.sft_dataset, pretrained_module.teacher_prompt,
                   pretrained_module.build_model, pretrained_module.build_tokenizer, pretrained_module.get_task)
    used = {part.__module__ for part in build_parts}
    assert used <= set(pretrained_module.BUILD_MODULES)


def test_the_cache_inventory_lists_only_models_the_current_code_builds(tmp_path, monkeypatch):
    from trl_ext.demo import cache_inventory

    recipe = demo.Pretraining(tasks=("reversal",), steps=0, seed=5)
    current = Path(demo.pretrained_model(recipe, cache_dir=tmp_path))
    assert cache_inventory.stored_recipe(current) == recipe
    # The same recipe as earlier code keyed it: a leftover nothing asks for any more.
    leftover = tmp_path / "reversal-000000000000"
    shutil.copytree(current, leftover)
    unreadable = tmp_path / "reversal-111111111111"  # a recipe file from a Pretraining with other fields
    shutil.copytree(current, unreadable)
    (unreadable / cache_inventory.RECIPE_FILE).write_text('{"tasks": ["reversal"], "retired_field": 1}')
    assert cache_inventory.current_models(tmp_path) == [current]
    # Under other build code the kept entry is a leftover too.
    monkeypatch.setattr(pretrained_module, "build_fingerprint", lambda: "other code")
    assert cache_inventory.current_models(tmp_path) == []


def test_corrupted_recipe_has_wrong_answers():
    rows = pretrained_module.sft_dataset(demo.Pretraining(tasks=("arithmetic",), num_examples=200,
                                                          corrupt_fraction=0.5))
    wrong = 0
    for prompt, completion in zip(rows["prompt"], rows["completion"]):
        x, y = prompt[0]["content"].rstrip("=").split("+")
        wrong += int(completion[0]["content"]) != int(x) + int(y)
    assert 60 < wrong < 140


def test_registered_task_variants_work_by_name():
    variant = demo.register_task(demo.Reversal(name="reversal-test-h4", length=4, alphabet_size=2))
    rows = demo.get_task("reversal-test-h4").dataset(8, seed=0)
    assert all(len(a) == 4 and set(a) <= {"a", "b"} for a in rows["answer"])
    assert demo.task_reward(rows["answer"], task=rows["task"], answer=rows["answer"]) == [1.0] * 8
    assert demo.register_task(variant) is variant  # re-registering the same settings is fine
    with pytest.raises(ValueError, match="already registered"):
        demo.register_task(demo.Reversal(name="reversal-test-h4", length=5))
    # Recipes on different task settings never share a cache entry.
    assert demo.Pretraining(tasks=("reversal-test-h4",)).key() != demo.Pretraining(tasks=("reversal",)).key()


def test_a_killed_builds_staging_directory_is_removed_and_others_kept(tmp_path):
    recipe = demo.Pretraining(tasks=("reversal",), steps=0, seed=7)
    stale = tmp_path / f".building-{recipe.key()}-12345"
    (stale / "sft").mkdir(parents=True)
    other_build = tmp_path / ".building-reversal-0123456789ab-999"  # another recipe's build, maybe still running
    other_build.mkdir()
    path = demo.pretrained_model(recipe, cache_dir=tmp_path)
    assert not stale.exists() and other_build.is_dir()
    # Like any cache entry made by mkdir, the model directory honours the umask (mkdtemp's would be 0700).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask


def test_a_build_inside_a_launch_runs_with_the_launcher_variables_removed(monkeypatch):
    from trl_ext.demo import build_process

    launcher = ("RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_DEEPSPEED")
    for name in launcher:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert build_process.inside_launch()
    env = build_process.single_process_env()
    assert not [name for name in launcher if name in env]  # named here, not by the rule under test
    assert env["OMP_NUM_THREADS"] == "1"
