"""Whether a teacher can score the student's tokens: the same token id must mean the same string for both.

Token-level distillation looks up the student's sampled token ids in the teacher's distribution, so the two must
share a tokenizer; an equal vocabulary SIZE is not enough (Llama-2 and Mistral both have 32,000 tokens). Where both
tokenizers can be loaded, their vocabularies (string -> id) are compared. The embedding matrices may then differ in
size, because models pad them (Qwen2.5-0.5B has 151,936 rows, Qwen2.5-7B 152,064), as long as the teacher has a row
for every id the student can sample. Where a tokenizer cannot be loaded (a model built in memory, a folder without
tokenizer files), only the sizes can be compared, and they must be equal.
"""

from __future__ import annotations

import logging

from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)


def vocab_size_of(model_or_path: str | PreTrainedModel, trust_remote_code: bool = False) -> int:
    """Rows of the output embedding, read from the config (no weights are loaded for a path)."""
    if isinstance(model_or_path, str):
        config = AutoConfig.from_pretrained(model_or_path, trust_remote_code=trust_remote_code)
    else:
        embeddings = model_or_path.get_output_embeddings()
        weight = getattr(embeddings, "weight", None) if embeddings is not None else None
        if weight is not None:
            # Under ZeRO-3 a loaded parameter is an empty shard; DeepSpeed keeps its full shape in `ds_shape`.
            return int(getattr(weight, "ds_shape", weight.shape)[0])
        config = model_or_path.config
    return int(config.get_text_config().vocab_size)


def tokenizer_vocabulary(tokenizer_or_processor) -> dict[str, int]:
    """string -> id of a tokenizer, or of the tokenizer inside a processor."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor).get_vocab()


def load_vocabulary(model_or_path: str | PreTrainedModel, trust_remote_code: bool = False) -> dict[str, int] | None:
    """The vocabulary of the tokenizer saved with a model (its path, or the path it was loaded from); None if none."""
    source = model_or_path if isinstance(model_or_path, str) else getattr(model_or_path.config, "_name_or_path", "")
    if not source:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:  # no tokenizer files, or a config AutoTokenizer cannot map
        logger.info("No tokenizer could be loaded from %r (%s); comparing vocabulary sizes only.", source, error)
        return None
    return tokenizer_vocabulary(tokenizer)


def check_teacher_vocabulary(
    student: str | PreTrainedModel,
    teachers: dict[str, str | PreTrainedModel],
    trust_remote_code: bool = False,
    student_tokenizer=None,
) -> None:
    """Raise a ValueError naming the first teacher (`teachers`: display name -> teacher) that cannot score the
    student's sampled token ids.

    `student_tokenizer` is the trainer's `processing_class` when the user passed one (it is what the student samples
    with); otherwise the tokenizer saved with the student is loaded (once, for all teachers).
    """
    student_size = vocab_size_of(student, trust_remote_code)
    student_vocab = (tokenizer_vocabulary(student_tokenizer) if student_tokenizer is not None
                     else load_vocabulary(student, trust_remote_code))
    for teacher_name, teacher in teachers.items():
        teacher_size = vocab_size_of(teacher, trust_remote_code)
        teacher_vocab = load_vocabulary(teacher, trust_remote_code)
        if student_vocab is None or teacher_vocab is None:
            if student_size != teacher_size:
                raise ValueError(
                    f"The {teacher_name} has a vocabulary of {teacher_size} tokens but the student has {student_size}. "
                    "Token-level distillation scores the student's sampled token ids under the teacher, so both must "
                    "use the same tokenizer and vocabulary size. Choose a teacher from the student's model family (or "
                    "resize the embeddings so both match)."
                )
            continue
        if student_vocab != teacher_vocab:
            differing = sorted(t for t in student_vocab.keys() | teacher_vocab.keys()
                               if student_vocab.get(t) != teacher_vocab.get(t))
            example = differing[0]
            raise ValueError(
                f"The {teacher_name} uses another tokenizer than the student: {len(differing)} tokens have different "
                f"ids (e.g. {example!r} is id {student_vocab.get(example)} for the student and "
                f"{teacher_vocab.get(example)} for the teacher; None = absent). Token-level distillation scores the "
                "student's sampled token ids under the teacher, so both must share one tokenizer. Choose a teacher "
                "from the student's model family."
            )
        if teacher_size < student_size:
            raise ValueError(
                f"The {teacher_name} shares the student's tokenizer, but its output embedding has {teacher_size} rows "
                f"and the student's has {student_size}: the student could sample ids the teacher has no row for. Use "
                f"a teacher with at least {student_size} rows (e.g. teacher.resize_token_embeddings({student_size}))."
            )
