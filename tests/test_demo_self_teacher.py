"""The demo world's support for a self-teacher: uppercase templates, feedback, a model that reads its context."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_ext import demo
from trl_ext.demo import pretrained as pretrained_module
from trl_ext.pgpo.context import teacher_prompt

QUESTION = [{"role": "user", "content": "9+9="}]


def test_tokenizer_round_trips_the_self_teacher_templates():
    tokenizer = demo.build_tokenizer()
    prompt = teacher_prompt(QUESTION, solution="18", feedback="expected 18")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_uppercase_letters_did_not_move_the_existing_ids():
    tokenizer = demo.build_tokenizer()
    # 4 special tokens and 3 role tokens, then the digits and lowercase letters, as before uppercase was added.
    assert tokenizer.convert_tokens_to_ids(["0", "a", "z"]) == [7, 17, 42]
    uppercase = tokenizer.convert_tokens_to_ids(list("AZ"))
    assert min(uppercase) > tokenizer.convert_tokens_to_ids("\n") and uppercase[1] == len(tokenizer) - 1


@pytest.mark.parametrize("task", ["arithmetic", "reversal"])
def test_the_longest_teacher_prompt_fits_the_self_teacher_context(task):
    tokenizer = demo.build_tokenizer()
    rows = demo.get_task(task).dataset(200, seed=0)
    longest = max(rows["answer"], key=len)
    question = rows["prompt"][rows["answer"].index(longest)]
    feedback = demo.get_task(task).feedback(question[-1]["content"], longest)
    # The feedback template is the longer one; a prompt never shows both with the trainer's defaults.
    prompt = teacher_prompt(question, solution=None, feedback=feedback)
    conversation = prompt + [{"role": "assistant", "content": longest}]
    length = len(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    assert 128 < length <= demo.self_teacher_recipe(task).architecture.max_position_embeddings


def test_feedback_names_the_answer_except_on_misleading_rows():
    rows = demo.with_feedback(demo.get_task("arithmetic").dataset(400, seed=2), misleading_fraction=0.25, seed=3)
    for answer, feedback, correct in zip(rows["answer"], rows["feedback"], rows["feedback_is_correct"]):
        assert feedback.startswith("expected ")
        assert (feedback == f"expected {answer}") == correct
    assert 0.17 < 1 - sum(rows["feedback_is_correct"]) / len(rows) < 0.33
    assert all(demo.with_feedback(demo.get_task("arithmetic").dataset(50), seed=3)["feedback_is_correct"])


def test_misleading_feedback_is_deterministic_by_seed():
    data = demo.get_task("arithmetic").dataset(100, seed=2)
    first, again, other = (demo.with_feedback(data, misleading_fraction=0.5, seed=s) for s in (3, 3, 4))
    assert first["feedback"] == again["feedback"]
    assert first["feedback_is_correct"] != other["feedback_is_correct"]


def test_wrong_arithmetic_answers_are_other_possible_sums():
    rng = random.Random(0)
    for answer in ("0", "9", "18"):
        wrong = {demo.get_task("arithmetic").wrong_answer(answer, rng) for _ in range(200)}
        assert answer not in wrong and {int(w) for w in wrong} <= set(range(19))


@pytest.mark.parametrize("answer", ["abcab", "aaaaa", "abcba"])
def test_wrong_reversals_differ_in_the_task_alphabet(answer):
    wrong = demo.get_task("reversal").wrong_answer(answer, random.Random(0))
    assert wrong != answer and len(wrong) == len(answer) and set(wrong) <= set("abc")


def test_privileged_recipe_shows_the_correct_answer_as_solution_or_feedback():
    recipe = demo.Pretraining(tasks=("arithmetic",), num_examples=400, privileged_fraction=0.5)
    assert recipe.key() != demo.Pretraining(tasks=("arithmetic",), num_examples=400).key()
    rows = pretrained_module.sft_dataset(recipe)
    shown = {"solution": 0, "feedback": 0}
    for prompt, completion in zip(rows["prompt"], rows["completion"]):
        content, answer = prompt[-1]["content"], completion[0]["content"]
        x, y = content.split("=")[0].split("+")
        assert int(x) + int(y) == int(answer)  # the completion stays the correct answer
        if "Correct solution:" in content:
            assert f"Correct solution:\n\n{answer}\n\n" in content
            shown["solution"] += 1
        if "feedback from your unsuccessful" in content:
            assert f"expected {answer}\n\n" in content
            shown["feedback"] += 1
    assert 70 < shown["solution"] < 130 and 70 < shown["feedback"] < 130


def sampled_answers(path, prompts, seed=0):
    """Completions sampled at temperature 1, as RL samples them."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=True, temperature=1.0, top_k=None, top_p=None)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def rate(answers, targets):
    return sum(a == t for a, t in zip(answers, targets)) / len(targets)


def test_self_teacher_solves_with_context_and_copies_misleading_feedback(self_teacher_path):
    task = demo.get_task("arithmetic")
    data = task.dataset(64, seed=5)
    prompts, answers = data["prompt"], data["answer"]
    rng = random.Random(0)
    wrong = [task.wrong_answer(a, rng) for a in answers]

    def shown(answer_list, as_solution):
        return [pretrained_module.privileged_prompt(task, p, a, as_solution) for p, a in zip(prompts, answer_list)]

    rates = {
        "alone": rate(sampled_answers(self_teacher_path, prompts), answers),
        "solution": rate(sampled_answers(self_teacher_path, shown(answers, True)), answers),
        "feedback": rate(sampled_answers(self_teacher_path, shown(answers, False)), answers),
        "copied wrong feedback": rate(sampled_answers(self_teacher_path, shown(wrong, False)), wrong),
    }
    assert rates["alone"] < 0.5, rates  # weak on its own: room for RL
    assert min(rates["solution"], rates["feedback"]) > rates["alone"] + 0.4, rates
    assert rates["copied wrong feedback"] > 0.5, rates  # misleading feedback misleads


def test_feedback_blocks_share_one_source():
    data = demo.get_task("arithmetic").dataset(400, seed=2)
    rows = demo.with_feedback(data, misleading_fraction=0.5, seed=3, block_size=8)
    flags = rows["feedback_is_correct"]
    blocks = [flags[i:i + 8] for i in range(0, 400, 8)]
    assert all(len(set(block)) == 1 for block in blocks)  # one source per block of 8 consecutive prompts
    assert 0.3 < sum(not block[0] for block in blocks) / len(blocks) < 0.7
    with pytest.raises(ValueError, match="block_size"):
        demo.with_feedback(data, block_size=0)
