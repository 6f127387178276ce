"""Log-probabilities of a few vocabulary entries without a (B, T, V) float32 log-softmax.

The distillation loss only reads each position's top-k entries (plus the tail bucket, which is computed from them)
and the sampled token, so the full log-softmax over the vocabulary is never needed, only its normalizer:

    log p(v) = logits[v] / T - logsumexp(logits / T)

`log_normalizer` computes logsumexp in float32 a block of positions at a time and, under autograd, keeps only the
logits (in the model's dtype) for the backward pass, where softmax = d logsumexp / d logits is recomputed block by
block. Measured (benchmarks/pgpo_memory_benchmark.py, bf16 logits, 512 positions, vocabulary 152k): the loss holds
2 MiB for the backward pass instead of 299 MiB (the float32 log-softmax), creates 594 MiB of vocabulary-wide float
tensors over the forward instead of 1,782 (teacher included; one float32 block at a time instead of whole copies),
and its forward + backward takes 10-30% longer on CPU at that size (the softmax is recomputed in the backward
pass); at vocabularies up to 32k the times are within noise of each other.
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


class _LogNormalizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, block_elements: int) -> torch.Tensor:
        flat = logits.reshape(-1, logits.size(-1))
        out = torch.empty(flat.size(0), dtype=_compute_dtype(logits.dtype), device=logits.device)
        step = _rows_per_block(flat.size(1), block_elements)
        for start in range(0, flat.size(0), step):
            out[start:start + step] = torch.logsumexp(_tempered(flat[start:start + step], out.dtype, temperature), -1)
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.block_elements = temperature, block_elements
        return out.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, out = ctx.saved_tensors
        flat = logits.reshape(-1, logits.size(-1))
        grad = grad_output.reshape(-1, 1).to(out.dtype)
        grad_logits = torch.empty_like(flat)
        step = _rows_per_block(flat.size(1), ctx.block_elements)
        for start in range(0, flat.size(0), step):
            block = slice(start, start + step)
            # Recomputed with the fused softmax kernel: fewer passes over the block than exp(x / T - normalizer).
            softmax = torch.softmax(_tempered(flat[block], out.dtype, ctx.temperature), dim=-1)
            grad_logits[block] = softmax.mul_(grad[block] / ctx.temperature).to(flat.dtype)
        return grad_logits.view(logits.shape), None, None


def log_normalizer(logits: torch.Tensor, temperature: float = 1.0,
                   block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """(..., V) logits -> (...) logsumexp(logits / temperature) in at least float32, differentiable."""
    return _LogNormalizer.apply(logits, float(temperature), int(block_elements))


def gathered_log_probs(logits: torch.Tensor, index: torch.Tensor, normalizer: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (..., k) vocabulary ids and the (...) normalizer -> (..., k) log-probs of those ids."""
    picked = logits.gather(-1, index).to(normalizer.dtype)
    return picked / temperature - normalizer.unsqueeze(-1)
