"""The paper's own setting, offline: purify per-teacher rationales into one rationale per question for `SFTTrainer`.

Input: a `datasets.Dataset` with a prompt column (text or conversational), a column with the K teachers' rationales
(one list per row, teachers always in the same order) and, for the learning methods, a column with each teacher's
score on the question: the paper's signal, the correctness of the teacher's own answer (1/0, or any score in
[0, 1]; None = unknown). Output: prompt-completion rows (`prompt`, `completion`, `teacher`) that TRL's
`SFTTrainer` trains on directly, plus the input's other columns (a column of the input with one of those three names
is an error, not overwritten). Every teacher needs a rationale on every question.

    none               every rationale kept, one row per (question, teacher): TinyLLM's naive multi-teacher data
    aggregation        `aggregator(prompt, rationales) -> str` writes one merged rationale (the paper: GPT-4);
                       `generation_aggregator(model, tokenizer)` builds one from any chat model
    plackett_luce      \
    classifier_router   } fitted on the rows with scores (or on `fit_on`), then route every row by its question alone
    similarity_router  /
    rl_selection       a REINFORCE policy over teachers; its reward is `improvement_fn(row, teacher)` (the paper: the
                       student's negative loss after training on that rationale) or, by default, the chosen
                       teacher's score (a proxy [I])

Routers see only the question (hashed byte n-grams of its text), so they also purify questions without scores
(a new dataset: the paper's "transferable" routers). Never fit them on test questions: the scores use gold labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from .features import hashed_ngram_features, text_token_ids
from .methods import PURIFICATIONS, RouterSettings, build_purifier

OUTPUT_COLUMNS = ("prompt", "completion", "teacher")  # what SFTTrainer reads, and which teacher was kept
DEFAULT_AGGREGATION_INSTRUCTION = (
    "Several teachers answered the question below, each with a rationale. Merge them into one rationale that is "
    "correct and consistent: keep the reasoning the teachers agree on, resolve their conflicts, and drop mistakes."
)


def prompt_text(prompt: Any) -> str:
    """The text of a prompt, plain or conversational (message contents joined by newlines)."""
    if isinstance(prompt, list):
        return "\n".join(str(message.get("content", "")) for message in prompt)
    return str(prompt)


def as_completion(prompt: Any, text: str) -> Any:
    """A completion in the prompt's format: an assistant message for conversational prompts, else text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def check_rationales_present(rationales: list[list[Any]], rationale_column: str) -> None:
    """Every teacher needs a rationale on every question: a router could otherwise choose a missing one, and the
    student would learn an empty completion."""
    for row, texts in enumerate(rationales):
        for teacher, text in enumerate(texts):
            if text is None or not str(text).strip():
                raise ValueError(
                    f"Row {row} of {rationale_column!r} has no rationale from teacher {teacher} ({text!r}). Every "
                    "teacher needs a rationale on every question: drop such rows first (dataset.filter) or fill them."
                )


def question_features(prompts: list[Any], dim: int = 512, order: int = 3) -> torch.Tensor:
    ids, mask = text_token_ids([prompt_text(p) for p in prompts])
    return hashed_ngram_features(ids, mask, dim, order)


def score_matrix(dataset: Dataset, score_column: str | None, num_teachers: int) -> torch.Tensor:
    """(N, K) teacher scores, NaN where unknown (no column, None, or a row without scores)."""
    if score_column is None or score_column not in dataset.column_names:
        return torch.full((len(dataset), num_teachers), float("nan"))
    rows = []
    for index, scores in enumerate(dataset[score_column]):
        if scores is None:
            rows.append([float("nan")] * num_teachers)
            continue
        if len(scores) != num_teachers:
            raise ValueError(f"Row {index} of {score_column!r} has {len(scores)} scores for {num_teachers} teachers.")
        rows.append([float("nan") if s is None else float(s) for s in scores])
    return torch.tensor(rows, dtype=torch.float32)


def purify_rationales(
    dataset: Dataset,
    purification: str,
    *,
    prompt_column: str = "prompt",
    rationale_column: str = "rationales",
    score_column: str | None = "teacher_scores",
    fit_on: Dataset | None = None,
    settings: RouterSettings | None = None,
    aggregator: Callable[[Any, list[str]], str] | None = None,
    improvement_fn: Callable[[dict, int], float] | None = None,
    epochs: int = 50,
    feature_dim: int = 512,
    ngram_order: int = 3,
) -> Dataset:
    """One rationale per question (K per question for "none"), as prompt-completion rows for `SFTTrainer`.

    Args:
        fit_on: rows with scores to fit the learning methods on (default: the rows of `dataset` that have scores).
        epochs: training rounds of the learning methods: for the classifier router, rounds of `classifier_steps`
            minibatch updates on the remembered questions; for the RL selector, REINFORCE updates, each over every
            scored question. Plackett-Luce and the similarity router fit once and ignore it.
    """
    if purification not in PURIFICATIONS:
        raise ValueError(f"Unknown purification {purification!r}; choose one of {list(PURIFICATIONS)}.")
    for column in (prompt_column, rationale_column):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column (columns: {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to purify.")
    rationales = dataset[rationale_column]
    num_teachers = len(rationales[0])
    if num_teachers == 0:
        raise ValueError(f"{rationale_column!r} must hold one rationale per teacher; the first row has none.")
    if any(len(r) != num_teachers for r in rationales):
        raise ValueError(f"Every row of {rationale_column!r} must have the same number of rationales ({num_teachers}).")
    check_rationales_present(rationales, rationale_column)
    prompts = dataset[prompt_column]
    extra = [c for c in dataset.column_names if c not in (prompt_column, rationale_column, score_column)]
    clashing = sorted(set(extra) & set(OUTPUT_COLUMNS))
    if clashing:
        raise ValueError(
            f"The dataset's column(s) {clashing} would overwrite the purified output's {list(OUTPUT_COLUMNS)} "
            f"columns. Rename them first (dataset.rename_column), or remove them (dataset.remove_columns)."
        )

    def rows_for(choices: list[tuple[int, int, str]]) -> Dataset:  # (row, teacher, text)
        out = {"prompt": [prompts[i] for i, _, _ in choices],
               "completion": [as_completion(prompts[i], text) for i, _, text in choices],
               "teacher": [k for _, k, _ in choices]}
        for column in extra:
            values = dataset[column]
            out[column] = [values[i] for i, _, _ in choices]
        return Dataset.from_dict(out)

    if purification == "none":
        return rows_for([(i, k, rationales[i][k]) for i in range(len(dataset)) for k in range(num_teachers)])
    if purification == "aggregation":
        if aggregator is None:
            raise ValueError(
                "purification='aggregation' writes a new, merged rationale and needs an `aggregator(prompt, "
                "rationales) -> str` (the paper uses GPT-4). Build one from any chat model with "
                "trl_ext.purify.generation_aggregator(model, tokenizer)."
            )
        return rows_for([(i, -1, aggregator(prompts[i], list(rationales[i]))) for i in range(len(dataset))])

    purifier, features = _fitted_purifier(dataset, purification, num_teachers, score_column, fit_on, settings,
                                          improvement_fn, epochs, feature_dim, ngram_order, prompt_column)
    scores = score_matrix(dataset, score_column, num_teachers)
    weights = purifier.decide(features, scores, explore=False).weights
    chosen = weights.argmax(dim=1).tolist()  # ties: the first of the tied teachers
    return rows_for([(i, k, rationales[i][k]) for i, k in enumerate(chosen)])


def _fitted_purifier(dataset, purification, num_teachers, score_column, fit_on, settings, improvement_fn, epochs,
                     feature_dim, ngram_order, prompt_column):
    fit = fit_on if fit_on is not None else dataset
    scores = score_matrix(fit, score_column, num_teachers)
    labeled = ~torch.isnan(scores).any(dim=1)
    if not labeled.any():
        raise ValueError(
            f"purification={purification!r} learns from per-teacher scores, but no row has them: give each row a "
            f"{score_column!r} list (e.g. whether each teacher's answer is correct), or pass `fit_on=` a scored split."
        )
    base = settings or RouterSettings()
    # Offline, every scored question is remembered and any amount of evidence is used.
    settings = dataclasses.replace(base, memory_size=max(base.memory_size, int(labeled.sum())), min_examples=1)
    features = question_features(fit[prompt_column], feature_dim, ngram_order)[labeled]
    scores = scores[labeled]
    purifier = build_purifier(purification, num_teachers, feature_dim, settings)
    if purifier.learns_from_improvement:
        fit_rows = [row for row, keep in zip(fit, labeled.tolist()) if keep]
        for _ in range(epochs):
            actions = purifier.decide(features, scores, explore=True).actions
            if improvement_fn is not None:
                reward = torch.tensor([float(improvement_fn(r, int(a))) for r, a in zip(fit_rows, actions)])
            else:
                reward = scores.gather(1, actions.unsqueeze(1)).squeeze(1)
            purifier.learn_from_improvement(features, scores, actions, reward)
    else:
        purifier.learn(features, scores)
        for _ in range(epochs - 1 if purification == "classifier_router" else 0):
            purifier.learn(features[:0], scores[:0])  # more replay steps on the same memory
    if purifier.learns_from_signal and purifier.memory.seen == 0:
        raise ValueError(
            "No scored question tells the teachers apart (on every one, all teachers have the same score): there "
            "is nothing to route on. Use purification='none' or 'aggregation', or add questions where they differ."
        )
    return purifier, question_features(dataset[prompt_column], feature_dim, ngram_order)


def generation_aggregator(
    model, tokenizer, instruction: str = DEFAULT_AGGREGATION_INSTRUCTION, max_new_tokens: int = 256,
    **generate_kwargs,
) -> Callable[[Any, list[str]], str]:
    """An `aggregator` for `purify_rationales(..., "aggregation")` that asks a chat model to merge the rationales.

    Greedy decoding unless `generate_kwargs` say otherwise. The model should be much stronger than the student; the
    paper uses GPT-4.
    """
    generate_kwargs.setdefault("do_sample", False)

    @torch.no_grad()
    def aggregate(prompt: Any, rationales: list[str]) -> str:
        listed = "\n".join(f"Teacher {k + 1}: {r}" for k, r in enumerate(rationales))
        message = f"{instruction}\n\nQuestion: {prompt_text(prompt)}\n\n{listed}\n\nMerged rationale:"
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = message
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **generate_kwargs)
        return tokenizer.decode(output[0, encoded["input_ids"].size(1):], skip_special_tokens=True).strip()

    return aggregate
