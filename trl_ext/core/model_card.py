"""Model cards rendered from the templates in `model_cards/` (shipped in the wheel as `trl_ext/model_cards/`).

TRL's `_template_file` can only name a file inside TRL's own package, so trl_ext renders its own templates with
the same front matter TRL writes (base model, datasets, tags) plus the method's settings and final metrics.
"""

from __future__ import annotations

import dataclasses
import os
import re
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard, ModelCardData

from .. import _compat

# Settings every card shows besides the method's own config fields.
COMMON_SETTINGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "max_completion_length",
    "temperature",
    "loss_type",
    "beta",
    "epsilon",
    "epsilon_high",
    "steps_per_generation",
    "seed",
)


def template_path(file_name: str) -> Path:
    """Locate a template: the source checkout's `model_cards/`, else the installed `trl_ext.model_cards`."""
    in_checkout = Path(__file__).resolve().parents[2] / "model_cards" / file_name
    if in_checkout.is_file():
        return in_checkout
    installed = files("trl_ext.model_cards").joinpath(file_name)
    return Path(str(installed))


def method_settings(args, base_config_cls) -> dict[str, object]:
    """The config fields a method adds to its base config, plus the common training settings."""
    base_fields = {f.name for f in dataclasses.fields(base_config_cls)}
    settings = {name: getattr(args, name) for name in COMMON_SETTINGS if hasattr(args, name)}
    for field in dataclasses.fields(args):
        if field.name not in base_fields:
            settings[field.name] = getattr(args, field.name)
    return settings


def table_cell(value) -> str:
    """`value` as an inline-code markdown table cell that keeps the table one row per setting.

    Settings can be multi-line text with pipes or backticks (PGPO's prompt templates): a raw newline or `|` would end
    the row or split the cell, so newlines are shown as `\\n` (as in a Python string) and pipes are escaped (GFM
    unescapes `\\|` inside a code span in a table); a value holding backticks gets a longer backtick fence.
    """
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n").replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""  # a code span starting or ending with a backtick needs a space inside the fence
    return f"{fence}{pad}{text}{pad}{fence}"


def final_metrics(log_history: list[dict], prefixes: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of every metric whose name starts with one of `prefixes`, sorted by name (a resumed run
    reloads its log history with sorted keys: the card lists the same rows either way)."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(prefixes) and isinstance(value, int | float):
                metrics[key] = value
    return dict(sorted(metrics.items()))


def metric_prefixes(trainer) -> tuple[str, ...]:
    """The metric prefixes a card shows: the trainer's own and every other trl_ext method's.

    A trainer combining methods logs each one's metrics under that method's prefix (a gated GNDPO trainer logs
    `gndpo/` and, through `KondoGateMixin`, `delight/`), and only metrics that were logged reach the card, so offering
    every trl_ext trainer's prefix shows exactly the methods the trainer runs.
    """
    from .trainer import ExtGRPOTrainer  # here, not at the top: core/trainer.py imports this module

    prefixes, classes = [trainer._metric_prefix], [ExtGRPOTrainer]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        prefix = vars(cls).get("_metric_prefix")
        if cls is not ExtGRPOTrainer and prefix and prefix not in prefixes:
            prefixes.append(prefix)
    return tuple(f"{prefix}/" for prefix in prefixes)


def render_model_card(trainer, model_name=None, dataset_name=None, tags=None) -> ModelCard:
    from trl import GRPOConfig

    model_id = _compat.get_config_model_id(trainer.model.config)
    base_model = model_id if model_id and not os.path.isdir(model_id) else None
    tag_set = {tags} if isinstance(tags, str) else set(tags or ())
    tag_set.update(trainer._tag_names)
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="transformers",
        model_name=model_name,
        tags=["generated_from_trainer", *sorted(tag_set)],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path(trainer._card_template)),
        model_name=model_name or Path(trainer.args.output_dir).name,
        base_model=base_model,
        hub_model_id=trainer.hub_model_id,
        dataset_name=dataset_name,
        trainer_name=trainer._name,
        paper_title=trainer._paper.get("title"),
        paper_id=trainer._paper.get("id"),
        trainer_citation=trainer._paper.get("citation"),
        settings={name: table_cell(value)
                  for name, value in {**method_settings(trainer.args, GRPOConfig), **trainer.card_settings()}.items()},
        metrics=final_metrics(trainer.state.log_history, (*metric_prefixes(trainer), "reward", "train_loss")),
        global_step=trainer.state.global_step,
        is_peft=is_peft_model(trainer.model),
        versions=package_versions(),
    )


def package_versions() -> dict[str, str]:
    found = {}
    for dist in ("trl-ext", "trl", "transformers", "torch", "peft", "accelerate"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass  # e.g. trl_ext used from a source checkout without installing it
    return found
