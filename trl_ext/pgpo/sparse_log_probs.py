"""Log-probabilities of a few vocabulary entries without a (B, T, V) float32 log-softmax.

The distillation loss only reads each position's top-k entries (plus the tail bucket, which is computed from them)
and the sampled token, so the full log-softmax over the vocabulary is never needed, only its normalizer:

    log p(v) = logits[v] / T - logsumexp(logits / T)

`log_normalizer` computes logsumexp in float32 a block of positions at a time and, under autograd, keeps only the
logits (in the model's dtype) for the backward pass, where softmax = d logsumexp / d logits is recomputed block by
block. The logits are read in place, a view of rows at a time, also when they are a slice of the model's output (the
trainer's `logits[:, :-1]`, not contiguous, which a `reshape` would copy whole). Measured
(benchmarks/pgpo_memory_benchmark.py, bf16 logits, 512 positions, vocabulary 152k): the loss holds 2 MiB for the
backward pass instead of 299 MiB (the float32 log-softmax), creates 594 MiB of vocabulary-wide float tensors over
the forward instead of 1,782 (teacher included; one float32 block at a time instead of whole copies), and its
forward + backward takes 10-30% longer on CPU at that size (the softmax is recomputed in the backward pass); at
vocabularies up to 32k the times are within noise of each other.
"""

from __future__ import annotations

import torch

# Entries (positions x vocabulary) per float32 block: 64M floats = 256 MB, few blocks for a large batch.
BLOCK_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 for half precision, float64 stays float64


def _rows_per_block(vocab: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, vocab))


def _tempered(block: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """A fresh `dtype` copy of `block` / temperature (in place on the copy: one pass fewer)."""
    scaled = block.to(dtype, copy=True)
    return scaled if temperature == 1.0 else scaled.div_(temperature)


def _row_blocks(logits: torch.Tensor, block_elements: int):
    """(rows, block) pairs covering the positions of (..., V) `logits` a block of rows at a time, without copying it.

    The trainer passes a slice of the model's output (`logits[:, :-1]`, not contiguous), which `reshape(-1, V)` would
    copy whole; leading dimensions are walked one index at a time instead, until the rest is a view of rows.
    `rows` indexes the flattened leading dimensions.
    """
    vocab = logits.size(-1)
    step = _rows_per_block(vocab, block_elements)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)

    def walk(tensor: torch.Tensor, offset: int):
        try:
            rows = tensor.view(-1, vocab)  # a view, never a copy
        except RuntimeError:  # not viewable as rows: one index of the first dimension at a time
            per_index = tensor[0].numel() // vocab if tensor.size(0) else 0
            for i in range(tensor.size(0)):
                yield from walk(tensor[i], offset + i * per_index)
            return
        for start in range(0, rows.size(0), step):
            block = rows[start:start + step]
            yield slice(offset + start, offset + start + block.size(0)), block

    yield from walk(logits, 0)


class _LogNormalizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, block_elements: int) -> torch.Tensor:
        out = torch.empty(logits.shape[:-1].numel(), dtype=_compute_dtype(logits.dtype), device=logits.device)
        for rows, block in _row_blocks(logits, block_elements):
            out[rows] = torch.logsumexp(_tempered(block, out.dtype, temperature), -1)
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.block_elements = temperature, block_elements
        return out.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, out = ctx.saved_tensors
        grad = grad_output.reshape(-1, 1).to(out.dtype)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        flat_grad = grad_logits.view(-1, logits.size(-1))
        for rows, block in _row_blocks(logits, ctx.block_elements):
            # Recomputed with the fused softmax kernel: fewer passes over the block than exp(x / T - normalizer).
            softmax = torch.softmax(_tempered(block, out.dtype, ctx.temperature), dim=-1)
            flat_grad[rows] = softmax.mul_(grad[rows] / ctx.temperature).to(logits.dtype)
        return grad_logits, None, None


def log_normalizer(logits: torch.Tensor, temperature: float = 1.0,
                   block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """(..., V) logits -> (...) logsumexp(logits / temperature) in at least float32, differentiable."""
    return _LogNormalizer.apply(logits, float(temperature), int(block_elements))


def gathered_log_probs(logits: torch.Tensor, index: torch.Tensor, normalizer: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (..., k) vocabulary ids and the (...) normalizer -> (..., k) log-probs of those ids."""
    picked = logits.gather(-1, index).to(normalizer.dtype)
    return picked / temperature - normalizer.unsqueeze(-1)
