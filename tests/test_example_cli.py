"""The example scripts' argument handling (trl_ext/demo/cli.py): reward functions by name or import path, as in
TRL's grpo.py, and arguments that the chosen mode would ignore are refused."""

import sys

import pytest
from trl import ModelConfig

from trl_ext import GNDPOConfig
from trl_ext.demo.cli import ExampleScriptArguments, load_reward_func, load_rewards, parse_example_args

TYPES = (ExampleScriptArguments, GNDPOConfig, ModelConfig)


def test_reward_funcs_by_trl_registry_name():
    from trl.rewards import accuracy_reward, think_format_reward

    assert load_reward_func("accuracy_reward") is accuracy_reward
    assert load_reward_func("think_format_reward") is think_format_reward
    assert callable(load_reward_func("get_soft_overlong_punishment"))


def test_reward_funcs_by_dotted_path_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_cli_rewards.py").write_text(
        "def constant(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_cli_rewards", raising=False)
    args = ExampleScriptArguments(reward_funcs=["my_cli_rewards.constant", "accuracy_reward"],
                                  reward_model_name_or_path="some/reward-model")
    rewards = load_rewards(args)
    assert rewards[0] == "some/reward-model"  # TRL's grpo.py order: the reward model first
    assert rewards[1].__name__ == "constant" and rewards[1](["a", "b"]) == [1.0, 1.0]
    assert rewards[2].__name__ == "accuracy_reward"


def test_unknown_reward_funcs_name_the_argument_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--reward_funcs 'accuracy'.*'accuracy_reward'"):
        load_reward_func("accuracy")
    with pytest.raises(ValueError, match=r"--reward_funcs 'no_such_module.reward' could not be imported"):
        load_reward_func("no_such_module.reward")
    with pytest.raises(ValueError, match=r"--reward_funcs 'trl.rewards.no_such_reward' could not be imported"):
        load_reward_func("trl.rewards.no_such_reward")


@pytest.mark.parametrize("flags, named", [
    (["--dataset_name", "trl-lib/DeepMath-103K"], "--dataset_name 'trl-lib/DeepMath-103K'"),
    (["--reward_funcs", "accuracy_reward"], "--reward_funcs ['accuracy_reward']"),
    (["--reward_model_name_or_path", "some/rm"], "--reward_model_name_or_path 'some/rm'"),
    (["--dataset_test_split", "validation"], "--dataset_test_split 'validation'"),
])
def test_demo_mode_refuses_real_run_arguments(tmp_path, flags, named):
    with pytest.raises(ValueError, match="only apply to a run on real models") as error:
        parse_example_args(TYPES, {}, ["--output_dir", str(tmp_path), *flags])
    assert named in str(error.value)


def test_real_run_refuses_demo_arguments_and_demo_mode_takes_them(tmp_path):
    with pytest.raises(ValueError, match="--demo_task 'reversal' only apply to the embedded demo"):
        parse_example_args(TYPES, {}, ["--output_dir", str(tmp_path), "--model_name_or_path", "m", "--demo_task",
                                       "reversal"])
    script_args, _, _ = parse_example_args(TYPES, {}, ["--output_dir", str(tmp_path), "--demo_task", "reversal"])
    assert script_args.demo_task == "reversal"


def test_real_runs_pass_the_model_loading_options_as_trls_grpo_script(tmp_path):
    from unittest.mock import patch

    from trl_ext.demo.cli import real_model_setup

    script_args = ExampleScriptArguments(dataset_name="org/dataset", reward_funcs=["accuracy_reward"])
    training_args = GNDPOConfig(output_dir=str(tmp_path), trust_remote_code=True, report_to="none", use_cpu=True)
    model_args = ModelConfig(model_name_or_path="org/model", model_revision="v2", dtype="float32")
    with patch("trl_ext.demo.cli.load_split", return_value="the split"):
        model, train, evaluation, rewards = real_model_setup(script_args, training_args, model_args)
    assert (model, train, evaluation) == ("org/model", "the split", None)
    assert training_args.model_init_kwargs == {"revision": "v2", "trust_remote_code": True,
                                               "attn_implementation": None, "dtype": "float32"}
