"""The offline utility: per-teacher rationales purified into one per question, ready for TRL's SFTTrainer."""

import random

import pytest
from datasets import Dataset

from trl_ext.purify import purify_rationales
from trl_ext.purify.dataset import generation_aggregator
from trl_ext.purify.methods import RouterSettings

SETTINGS = RouterSettings(classifier_learning_rate=5e-2, rl_learning_rate=0.2)


def rationale_dataset(num_rows, seed, scored=True):
    """Addition questions "add a b" are answered right by teacher 0, reversal questions "rev w" by teacher 1;
    teacher 2 is wrong everywhere. Each rationale names its teacher so the test can see which one was kept."""
    rng = random.Random(seed)
    rows = {"prompt": [], "rationales": [], "teacher_scores": [], "right": []}
    for _ in range(num_rows):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            question, right = f"add {a} {b}", 0
        else:
            question, right = "rev " + "".join(rng.choice("abc") for _ in range(rng.randint(3, 6))), 1
        rows["prompt"].append([{"role": "user", "content": question}])
        rows["rationales"].append([f"teacher {k} on {question}" for k in range(3)])
        rows["teacher_scores"].append([float(k == right) for k in range(3)] if scored else None)
        rows["right"].append(right)
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("purification", ["plackett_luce", "classifier_router", "similarity_router", "rl_selection"])
def test_routers_pick_the_right_rationale_for_new_questions(purification):
    fit = rationale_dataset(80, seed=0)
    new = rationale_dataset(40, seed=1, scored=False)  # a new dataset: no scores, routed by the question alone
    settings = RouterSettings(classifier_learning_rate=5e-2, rl_learning_rate=0.2, rl_signal_in_state=False)
    out = purify_rationales(new, purification, fit_on=fit, settings=settings)
    assert len(out) == 40 and set(out.column_names) == {"prompt", "completion", "teacher", "right"}
    assert list(out["teacher"]) == list(out["right"])
    for row in out:
        assert row["completion"] == [{"role": "assistant", "content": f"teacher {row['right']} on "
                                      f"{row['prompt'][0]['content']}"}]


def test_rl_selection_with_the_students_improvement_as_reward():
    data = rationale_dataset(60, seed=2)
    # The paper's reward: how much the student improves after training on the rationale; here a stand-in in which
    # only the right teacher's rationale helps.
    improvement = lambda row, teacher: 1.0 if teacher == row["right"] else -1.0  # noqa: E731
    out = purify_rationales(data, "rl_selection", improvement_fn=improvement, settings=SETTINGS)
    assert list(out["teacher"]) == list(out["right"])


def test_none_keeps_every_rationale_and_aggregation_merges_them():
    data = rationale_dataset(5, seed=3)
    everything = purify_rationales(data, "none")
    assert len(everything) == 15 and list(everything["teacher"])[:3] == [0, 1, 2]
    merged = purify_rationales(data, "aggregation", aggregator=lambda prompt, rationales: " | ".join(rationales))
    assert list(merged["teacher"]) == [-1] * 5
    assert merged[0]["completion"][0]["content"] == " | ".join(data[0]["rationales"])


def test_text_prompts_give_text_completions():
    data = Dataset.from_dict({"prompt": ["add 1 2", "rev ab"], "rationales": [["a", "b"], ["c", "d"]],
                              "teacher_scores": [[1.0, 0.0], [0.0, 1.0]]})
    out = purify_rationales(data, "similarity_router", settings=RouterSettings(similarity_neighbors=1))
    assert list(out["completion"]) == ["a", "d"]


def test_output_trains_with_sft_trainer(tmp_path, student_path):
    from trl import SFTConfig, SFTTrainer

    out = purify_rationales(rationale_dataset(16, seed=4), "classifier_router", settings=SETTINGS)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=student_path, args=args, train_dataset=out.remove_columns(["teacher", "right"]))
    trainer.train()
    assert trainer.state.global_step == 1


def test_generation_aggregator_runs_a_chat_model(student_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    aggregate = generation_aggregator(AutoModelForCausalLM.from_pretrained(student_path),
                                      AutoTokenizer.from_pretrained(student_path), max_new_tokens=4)
    merged = purify_rationales(rationale_dataset(2, seed=5), "aggregation", aggregator=aggregate)
    contents = [row["completion"][0]["content"] for row in merged]
    assert len(contents) == 2 and all(isinstance(c, str) and c for c in contents)


def test_bad_input():
    data = rationale_dataset(6, seed=6)
    with pytest.raises(ValueError, match="Unknown purification 'vote'"):
        purify_rationales(data, "vote")
    with pytest.raises(ValueError, match="needs an `aggregator"):
        purify_rationales(data, "aggregation")
    with pytest.raises(ValueError, match="no row has them"):
        purify_rationales(rationale_dataset(6, seed=6, scored=False), "similarity_router")
    with pytest.raises(ValueError, match="no 'answers' column"):
        purify_rationales(data, "none", rationale_column="answers")
    ragged = Dataset.from_dict({"prompt": ["a", "b"], "rationales": [["x", "y"], ["z"]]})
    with pytest.raises(ValueError, match="same number of rationales"):
        purify_rationales(ragged, "none")
    tied = Dataset.from_dict({"prompt": ["a", "b"], "rationales": [["x", "y"], ["z", "w"]],
                              "teacher_scores": [[1.0, 1.0], [0.0, 0.0]]})
    with pytest.raises(ValueError, match="nothing to route on"):
        purify_rationales(tied, "classifier_router")
    with pytest.raises(ValueError, match="empty"):
        purify_rationales(data.select([]), "none")
    missing = Dataset.from_dict({"prompt": ["a", "b"], "rationales": [["x", "y"], ["z", None]]})
    with pytest.raises(ValueError, match="Row 1 of 'rationales' has no rationale from teacher 1"):
        purify_rationales(missing, "similarity_router")
    blank = Dataset.from_dict({"prompt": ["a"], "rationales": [["  ", "y"]]})
    with pytest.raises(ValueError, match="Row 0 .* teacher 0"):
        purify_rationales(blank, "none")
    gold = data.add_column("completion", ["gold"] * len(data))  # would overwrite the purified rationales
    with pytest.raises(ValueError, match=r"\['completion'\] would overwrite"):
        purify_rationales(gold, "similarity_router")
