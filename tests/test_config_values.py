"""Every field a trl_ext config adds refuses values of the wrong kind at construction (NaN passes `x <= 0` checks)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from conftest import GatedGNDPOConfig, cpu_config
from trl import GRPOConfig

from trl_ext import DelightConfig, GNDPOConfig, PGPOConfig, ProRLConfig, PurifiedDistillConfig
from trl_ext.core.field_values import declared_kinds
from trl_ext.core.reset_triggers import ResetSchedule

CONFIGS = (GNDPOConfig, PGPOConfig, DelightConfig, PurifiedDistillConfig, ProRLConfig, GatedGNDPOConfig)
GRPO_FIELDS = {f.name for f in fields(GRPOConfig)}
BAD_VALUES = {"float": (float("nan"), float("inf"), "0.5"), "int": (2.5, "3"), "bool": ("false",)}


def _bad_cases():
    for config_cls in CONFIGS:
        for f in fields(config_cls):
            kinds, _ = declared_kinds(config_cls, f.name)
            if f.name in GRPO_FIELDS or len(kinds) != 1 or not kinds <= set(BAD_VALUES):
                continue
            for value in BAD_VALUES[next(iter(kinds))]:
                yield pytest.param(config_cls, f.name, value, id=f"{config_cls.__name__}-{f.name}-{value!r}")


@pytest.mark.parametrize("config_cls, name, value", list(_bad_cases()))
def test_a_value_of_the_wrong_kind_fails_at_construction(tmp_path, config_cls, name, value):
    with pytest.raises(ValueError, match=f"`{name}={value!r}` must be"):
        cpu_config(config_cls, tmp_path, **{name: value})


def test_declared_types_survive_the_cli_parser(tmp_path):
    # transformers' parser rewrites `Field.type` (`int | None` -> `int`) for every later user of the class, which
    # made the check refuse the None default of `distillation_topk` once an example had parsed its arguments.
    from trl import TrlParser

    TrlParser(PGPOConfig), TrlParser(ProRLConfig)
    assert declared_kinds(PGPOConfig, "distillation_topk") == ({"int"}, True)
    assert cpu_config(PGPOConfig, tmp_path, distillation_topk=None).distillation_topk is None
    assert cpu_config(ProRLConfig, tmp_path, ref_reset_steps=None).ref_reset_steps is None


def test_the_sweep_covers_every_numeric_field():
    # A field whose annotation the check cannot read would drop out of the sweep above and of the check itself.
    names = {case.values[1] for case in _bad_cases()}
    assert {"score_clip", "distillation_topk", "gate_price", "gate_history_size", "rl_evidence_prior",
            "eos_penalty", "ref_reset_min_delta", "ref_reset_kl_share", "success_reward_threshold",
            "multiplier_ratchet"} <= names
    assert len(names) >= 50


@pytest.mark.parametrize("config_cls, values", [
    (PGPOConfig, dict(distillation_topk=None, distillation_is_clip=None)),
    (ProRLConfig, dict(ref_reset_steps=None, ref_reset_kl_share=None)),
    (GNDPOConfig, dict(score_clip=5, teacher_temperature=2)),  # ints where floats are declared are numbers
])
def test_optional_and_integral_values_are_accepted(tmp_path, config_cls, values):
    config = cpu_config(config_cls, tmp_path, **values)
    assert all(getattr(config, name) == value for name, value in values.items())


@pytest.mark.parametrize("config_cls", [GNDPOConfig, PurifiedDistillConfig])
def test_teacher_init_kwargs_that_are_not_json_name_the_field(tmp_path, config_cls):
    with pytest.raises(ValueError, match="`teacher_model_init_kwargs` is not valid JSON"):
        cpu_config(config_cls, tmp_path, teacher_model_init_kwargs="{bad json")
    config = cpu_config(config_cls, tmp_path, teacher_model_init_kwargs='{"dtype": "float32"}')
    assert config.teacher_model_init_kwargs == {"dtype": "float32"}


@pytest.mark.parametrize("template, message", [
    ("{prompt}{solution}{feedback}{extra}", r"placeholder\(s\) \{extra\}, which PGPO does not fill"),
    ("{prompt}{solution}{feedback} a set {1, 2}", r"placeholder\(s\) \{1, 2\}"),
    ("{prompt}{solution}{feedback} {", "not a valid format string"),
    ("{prompt}{feedback}", r"must contain \{solution\}"),
])
def test_reprompt_template_placeholders_are_checked(tmp_path, template, message):
    with pytest.raises(ValueError, match=message):
        cpu_config(PGPOConfig, tmp_path, reprompt_template=template)


def test_reprompt_template_with_escaped_braces_is_accepted(tmp_path):
    template = "{prompt}{solution}{feedback} Answer as {{\"answer\": ...}}."
    assert cpu_config(PGPOConfig, tmp_path, reprompt_template=template).reprompt_template == template


@pytest.mark.parametrize("overrides", [
    dict(environment_feedback_only_without_solution=False),
    dict(feedback_template="Feedback: {feedback_raw}"),
    dict(feedback_column="errors"),
])
def test_feedback_settings_without_feedback_fail(tmp_path, overrides):
    with pytest.raises(ValueError, match="without include_environment_feedback=True"):
        cpu_config(PGPOConfig, tmp_path, include_environment_feedback=False, **overrides)


@pytest.mark.parametrize("metric", ["", "  "])
def test_an_empty_reset_metric_fails(tmp_path, metric):
    with pytest.raises(ValueError, match="names no metric"):
        cpu_config(ProRLConfig, tmp_path, beta=0.01, eval_strategy="steps", eval_steps=1, ref_reset_metric=metric)
    with pytest.raises(ValueError, match="must name an evaluation metric"):
        ResetSchedule(metric=metric)


def test_reset_schedule_refuses_a_nan_min_delta():
    # NaN would make every evaluation a stall (no value beats best + NaN), so each patience window would reset.
    with pytest.raises(ValueError, match="`min_delta` must be >= 0, got nan"):
        ResetSchedule(metric="eval_reward", min_delta=float("nan"))


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_the_cli_can_print_every_fields_help(config_cls):
    # argparse %-formats help texts: a '%' in one (e.g. "~10% of its peak") crashed `examples/pgpo.py --help`.
    from trl import ModelConfig, TrlParser

    from trl_ext.demo.cli import ExampleScriptArguments

    text = TrlParser((ExampleScriptArguments, config_cls, ModelConfig)).format_help()
    assert all(f"--{f.name}" in text for f in fields(config_cls))
