"""Which LoRA adapters a saved model holds.

trl_ext trainers add adapters of their own to a PeftModel: PGPO's EMA self-teacher ("teacher"), the reference
reset's frozen reference ("ref", the name TRL gives its own reference adapter). They are trainer state, saved whole
in `trl_ext_state.pt` and restored from there on resume, so the saved model (checkpoints, `save_model`,
`push_to_hub`) keeps only the adapters the user trains; PEFT's `save_pretrained` would otherwise write each extra
adapter into a subfolder of the model repository.
"""

from __future__ import annotations

import contextlib
import functools

from .. import _compat


@contextlib.contextmanager
def saving_adapters_except(model, internal: set[str]):
    """Within the block, `model.save_pretrained` (PEFT) saves every adapter except those named in `internal`."""
    if not _compat.is_peft_model(model) or not internal & set(model.peft_config):
        yield
        return
    kept = [name for name in model.peft_config if name not in internal]
    shadowed = vars(model).get("save_pretrained")  # an instance attribute someone else set, restored after
    # Transformers' Trainer._save calls model.save_pretrained(output_dir, state_dict=..., is_main_process=...); an
    # instance attribute for the duration of the save adds PEFT's own `selected_adapters` to that call.
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=kept)
    try:
        yield
    finally:
        if shadowed is None:
            del model.save_pretrained
        else:
            model.save_pretrained = shadowed
