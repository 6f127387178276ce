"""Row operations shared by the Kondo gate (micro-batches) and ProRL's refill (rollouts of different widths)."""

import pytest
import torch

from trl_ext.core.rows import concat_rows, take_rows


def test_concat_needs_a_padding_rule_for_different_widths():
    parts = [{"ids": torch.ones(1, 2), "n": torch.tensor(3)}, {"ids": torch.zeros(2, 3), "n": torch.tensor(5)}]
    with pytest.raises(ValueError, match="'ids'"):
        concat_rows(parts)

    def widen(key, tensor, width):  # right-pad with -1
        return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=-1.0)

    merged = concat_rows(parts, widen=widen)
    assert merged["ids"].tolist() == [[1, 1, -1], [0, 0, 0], [0, 0, 0]]
    assert merged["n"].item() == 3  # scalars from the first part ...
    assert "n" not in concat_rows(parts, widen=widen, keep_scalars=False)  # ... or dropped


def test_take_rows_keeps_or_drops_scalars():
    batch = {"ids": torch.arange(6).view(3, 2), "names": ["a", "b", "c"], "n": torch.tensor(4), "none": None}
    picked = take_rows(batch, torch.tensor([2, 0]))
    assert picked["ids"].tolist() == [[4, 5], [0, 1]] and picked["names"] == ["c", "a"]
    assert picked["n"].item() == 4 and picked["none"] is None
    assert set(take_rows(batch, torch.tensor([1]), keep_scalars=False)) == {"ids", "names", "none"}
