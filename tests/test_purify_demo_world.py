"""The multi-teacher demo world: task variants, in-domain / out-of-domain splits, the blind spot (no model builds)."""

from trl_ext import demo
from trl_ext.demo import teachers as world


def operands(dataset):
    return [int(p[0]["content"].split("+")[0]) for p, t in zip(dataset["prompt"], dataset["task"])
            if t.startswith("arithmetic")]


def words(dataset):
    return [p[0]["content"].split()[1] for p, t in zip(dataset["prompt"], dataset["task"]) if t.startswith("reversal")]


def test_splits_cover_disjoint_input_ranges():
    inside, outside = world.in_domain_dataset(400, seed=0), world.out_of_domain_dataset(400, seed=0)
    assert sorted(set(inside["task"])) == ["arithmetic_in", "reversal_in"]
    assert sorted(set(outside["task"])) == ["arithmetic_out", "reversal_out"]
    assert set(operands(inside)) == set(range(7)) and set(operands(outside)) == {7, 8, 9}
    assert {w[0] for w in words(inside)} == {"a", "b"} and {w[0] for w in words(outside)} == {"c"}
    assert inside["task"].count("arithmetic_in") == 200  # an even mix
    assert world.in_domain_dataset(50, seed=3)["prompt"] == world.in_domain_dataset(50, seed=3)["prompt"]


def test_variants_are_rewarded_by_name():
    rows = world.out_of_domain_dataset(20, seed=1)
    assert demo.task_reward(rows["answer"], task=rows["task"], answer=rows["answer"]) == [1.0] * 20


def test_blind_spot_teaches_wrong_answers_exactly_where_intended():
    rows = world.BLIND_SPOT.dataset(300, seed=0)
    for prompt, answer in zip(rows["prompt"], rows["answer"]):
        a, b = (int(x) for x in prompt[0]["content"].rstrip("=").split("+"))
        assert int(answer) == a + b + (1 if a >= world.BLIND_SPOT_THRESHOLD else 0)
    assert world.right_teachers("arithmetic_in", "3+4=") == {0, 2}
    assert world.right_teachers("arithmetic_out", "8+1=") == {0}
    assert world.right_teachers("reversal_in", "rev abcab") == {1, 2}


def test_recipes_are_distinct_and_reuse_the_default_teachers():
    recipes = world.teacher_recipes()
    assert len({r.key() for r in recipes}) == 3
    assert recipes[0] == demo.teacher_recipe("arithmetic") and recipes[1] == demo.teacher_recipe("reversal")
    assert world.student_recipe().tasks == ("arithmetic", "reversal")
