"""The self-teacher's privileged context (SDPO, arXiv 2601.20802, official code `_maybe_build_self_distillation_batch`).

The teacher is the policy itself, shown what the student was not: a successful sibling rollout of the same prompt
and/or the environment's feedback. Two pure steps, then tokenization in the trainer:

1. `assign_contexts`: for each completion of the generation batch, which sibling demonstrates a solution and whether
   feedback is used (group logic on gathered rewards);
2. `teacher_prompt`: the reprompted conversation (system turns kept, last user turn rewritten from the templates).

The student's own completion is then scored after that prompt, so both score the same tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

# The official code's templates (verl/trainer/config/actor/actor.yaml), verbatim.
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"

_THINKING = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


@dataclass(frozen=True)
class Templates:
    reprompt: str = REPROMPT_TEMPLATE
    solution: str = SOLUTION_TEMPLATE
    feedback: str = FEEDBACK_TEMPLATE


@dataclass
class ContextAssignment:
    """Per completion of the (gathered) generation batch."""

    demonstration: torch.Tensor  # (N,) long: index of the sibling shown as the solution, -1 for none
    use_feedback: torch.Tensor  # (N,) bool: the feedback is shown
    has_success: torch.Tensor  # (N,) bool: the completion itself succeeded

    @property
    def usable(self) -> torch.Tensor:
        """(N,) bool: the completion has a teacher context (the self-distillation mask of the official code)."""
        return (self.demonstration >= 0) | self.use_feedback


def assign_contexts(
    rewards: torch.Tensor,
    has_feedback: torch.Tensor,
    num_generations: int,
    success_threshold: float,
    exclude_self: bool = True,
    include_feedback: bool = True,
    feedback_only_without_solution: bool = True,
) -> ContextAssignment:
    """Choose each completion's privileged context from its group (consecutive blocks of `num_generations`).

    The demonstration is the first successful sibling (reward >= `success_threshold`), skipping the completion itself
    when `exclude_self` (a success is not reprompted on its own answer). Feedback is used when available and
    `include_feedback`, and, with `feedback_only_without_solution`, only when no demonstration exists.
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be (N,) with N a multiple of {num_generations}, got {tuple(rewards.shape)}")
    success = rewards >= success_threshold
    groups = success.view(-1, num_generations)
    n = num_generations
    # candidate[i, j]: sibling j of completion i's group may demonstrate for i.
    candidate = groups.unsqueeze(1).expand(-1, n, -1).clone()  # (G, n, n)
    if exclude_self:
        candidate &= ~torch.eye(n, dtype=torch.bool, device=rewards.device)
    first = torch.where(candidate.any(-1), candidate.float().argmax(-1), torch.full_like(candidate[..., 0], -1,
                                                                                          dtype=torch.long))
    offsets = torch.arange(groups.size(0), device=rewards.device).unsqueeze(1) * n
    demonstration = torch.where(first >= 0, first + offsets, first).reshape(-1)
    use_feedback = has_feedback.bool() & include_feedback
    if feedback_only_without_solution:
        use_feedback &= demonstration < 0
    return ContextAssignment(demonstration=demonstration, use_feedback=use_feedback, has_success=success)


def strip_thinking(text: str) -> str:
    """Remove `<think>...</think>` blocks from a demonstration (the official `remove_thinking_from_demonstration`)."""
    return _THINKING.sub("", text).strip()


def demonstration_text(completion, decoded: str, special_tokens: tuple[str, ...] = ()) -> str:
    """The text of a successful sibling that the self-teacher is shown.

    A single-turn completion is shown as its decoded text, special tokens removed (as the official code does). A
    multi-turn tool-calling completion, as TRL parses it (assistant turns with tool calls, then tool results), is
    written out turn by turn instead [I]: its decoded text would run the tool calls, the tool results and the chat
    template's role names together into one block. Reasoning a parser moved out of the content comes back as a
    `<think>` block, so that `remove_thinking_from_demonstration` decides about it as for single-turn text.
    """
    if not isinstance(completion, list) or not any(m.get("role") == "tool" or m.get("tool_calls") for m in completion):
        return decoded
    lines = []
    for message in completion:
        text = _message_text(message, special_tokens)
        if message.get("role") == "tool":
            name = f" ({message['name']})" if message.get("name") else ""
            lines.append(f"Tool result{name}: {text}")
            continue
        lines += [text] if text else []
        lines += [_tool_call_text(call) for call in message.get("tool_calls") or []]
    return "\n".join(lines)


def _message_text(message: dict, special_tokens: tuple[str, ...]) -> str:
    """A chat message's text: its reasoning (as `<think>`) and content, typed content blocks flattened, the
    tokenizer's special tokens removed (a parser can leave one in; in a prompt it would be read as a token)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
    reasoning = message.get("reasoning_content") or message.get("thinking")
    text = f"<think>{reasoning}</think>{content}" if reasoning else str(content)
    for token in special_tokens:
        text = text.replace(token, "")
    return text


def _tool_call_text(call: dict) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments")
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return f"Tool call: {function.get('name')}({arguments})"


def reprompt_text(question: str, solution: str | None, feedback: str | None, templates: Templates = Templates()) -> str:
    """The user turn the self-teacher reads: the question, then the solution and/or feedback blocks."""
    solution_block = templates.solution.format(successful_previous_attempt=solution) if solution is not None else ""
    feedback_block = templates.feedback.format(feedback_raw=feedback) if feedback is not None else ""
    return templates.reprompt.format(prompt=question, solution=solution_block, feedback=feedback_block)


def teacher_prompt(prompt, solution: str | None, feedback: str | None, templates: Templates = Templates()):
    """The teacher's prompt, in the prompt's own format.

    Conversational prompts keep every turn before the last, which must be a user turn; its text becomes the
    reprompt. Plain-text prompts become the reprompt text. Without a solution or feedback there is nothing to show
    (the completion gets no loss) and the prompt is returned unchanged.
    """
    if solution is None and feedback is None:
        return prompt
    if isinstance(prompt, str):
        return reprompt_text(prompt, solution, feedback, templates)
    if not prompt or prompt[-1].get("role") != "user":
        role = prompt[-1].get("role") if prompt else None
        raise ValueError(
            f"The self-teacher rewrites the prompt's last user turn, but the last message has role {role!r}. "
            "Prompts ending in an assistant prefill or a tool turn are not supported."
        )
    content = prompt[-1].get("content", "")
    if isinstance(content, list):  # multimodal content parts: the text parts carry the question
        content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return list(prompt[:-1]) + [{"role": "user", "content": reprompt_text(content, solution, feedback, templates)}]
