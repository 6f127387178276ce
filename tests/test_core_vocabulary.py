"""A teacher must share the student's tokenizer, not just its vocabulary size (core/vocabulary.py)."""

import json

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from trl_ext import demo
from trl_ext.core import check_teacher_vocabulary


def save_model(path, vocab_size: int, tokenizer=None) -> str:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def swapped_tokenizer(tmp_path, first: str, second: str):
    """The demo tokenizer with the ids of two characters exchanged: same size, different meaning."""
    folder = tmp_path / "swapped-tokenizer"
    demo.build_tokenizer().save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tokenizer():
    return demo.build_tokenizer()


def test_same_size_but_another_tokenizer_is_refused(tmp_path, tokenizer):
    student = save_model(tmp_path / "student", len(tokenizer), tokenizer)
    other = swapped_tokenizer(tmp_path, "a", "b")
    teacher = save_model(tmp_path / "teacher", len(tokenizer), other)
    a_id = tokenizer.get_vocab()["a"]
    b_id = tokenizer.get_vocab()["b"]
    with pytest.raises(ValueError, match=rf"The teacher X uses another tokenizer .* 2 tokens .*'a' is id {a_id} for "
                                         rf"the student and {b_id} for the teacher"):
        check_teacher_vocabulary(student, {"teacher X": teacher})


def test_the_trainers_processing_class_is_what_is_compared(tmp_path, tokenizer):
    teacher = save_model(tmp_path / "teacher", len(tokenizer), tokenizer)
    student = save_model(tmp_path / "student", len(tokenizer), tokenizer)
    check_teacher_vocabulary(student, {"teacher": teacher})  # the saved tokenizers agree
    with pytest.raises(ValueError, match="another tokenizer"):
        check_teacher_vocabulary(student, {"teacher": teacher}, student_tokenizer=swapped_tokenizer(tmp_path, "x", "y"))


def test_a_padded_teacher_embedding_is_accepted_a_smaller_one_is_not(tmp_path, tokenizer):
    student = save_model(tmp_path / "student", len(tokenizer), tokenizer)
    padded = save_model(tmp_path / "padded", len(tokenizer) + 8, tokenizer)
    check_teacher_vocabulary(student, {"teacher": padded})  # same tokenizer, more rows: every student id has a row
    with pytest.raises(ValueError, match=rf"its output embedding has {len(tokenizer)} rows and the student's has "
                                         rf"{len(tokenizer) + 8}"):
        check_teacher_vocabulary(padded, {"teacher": student})


def test_without_tokenizers_only_equal_sizes_pass(tmp_path, tokenizer):
    student = save_model(tmp_path / "student", len(tokenizer))
    same_size = save_model(tmp_path / "same", len(tokenizer))
    other_size = save_model(tmp_path / "other", len(tokenizer) + 8)
    check_teacher_vocabulary(student, {"teacher": same_size})
    with pytest.raises(ValueError, match=rf"vocabulary of {len(tokenizer) + 8} tokens but the student has "
                                         rf"{len(tokenizer)}"):
        check_teacher_vocabulary(student, {"teacher": other_size})


def test_an_instantiated_model_is_checked_through_the_path_it_came_from(tmp_path, tokenizer):
    student = save_model(tmp_path / "student", len(tokenizer), tokenizer)
    teacher_path = save_model(tmp_path / "teacher", len(tokenizer), swapped_tokenizer(tmp_path, "1", "2"))
    with pytest.raises(ValueError, match="another tokenizer"):
        check_teacher_vocabulary(student, {"teacher": LlamaForCausalLM.from_pretrained(teacher_path)})


def test_a_zero3_partitioned_model_is_sized_by_its_full_shape(tmp_path, tokenizer):
    """Under ZeRO-3 (zero.Init) every rank holds an empty shard of each weight; DeepSpeed keeps the shape in ds_shape."""
    import torch

    from trl_ext.core.vocabulary import vocab_size_of

    model = LlamaForCausalLM.from_pretrained(save_model(tmp_path / "model", len(tokenizer), tokenizer))
    weight = model.get_output_embeddings().weight
    full_shape = tuple(weight.shape)
    weight.data = torch.empty(0)
    weight.ds_shape = full_shape  # what deepspeed.zero.Init leaves on the parameter
    assert vocab_size_of(model) == len(tokenizer)
