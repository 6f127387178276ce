"""What the routers see of a prompt: a fixed-size vector computed from the prompt alone (never from its answer).

The paper's routers encode the question with a frozen mDeBERTa-v3 encoder [S]. Two encoders here [I]:

* `ngram` (default): hashed token n-grams (n = 1..order) of the prompt's tokens, log-counts, L2-normalised. No model,
  no training, identical on every process and machine, and free; it tells tasks and input ranges apart well, which
  is what routing between teachers with different strengths needs.
* `teacher_hidden`: the first teacher's final hidden states over the prompt, mean-pooled (a frozen LM encoder, closer
  to the paper's PLM encoder; costs one teacher forward pass over the prompts).

Both are computed per row on each process and gathered, so every process routes on the same features.
"""

from __future__ import annotations

import torch

FEATURES = ("ngram", "teacher_hidden")

# Odd 61-bit multipliers for the polynomial hash of an n-gram; int64 arithmetic wraps, deterministically.
_HASH_MULTIPLIERS = torch.tensor(
    [0x1F3D5B79A2C4E681, 0x2B7E151628AED2A7, 0x3C6EF372FE94F82B, 0x0A54FF53A5F1D36F, 0x1BB67AE8584CAA73],
    dtype=torch.int64,
)
MAX_NGRAM_ORDER = len(_HASH_MULTIPLIERS)


def hashed_ngram_features(token_ids: torch.Tensor, mask: torch.Tensor, dim: int, order: int = 3) -> torch.Tensor:
    """(B, P) token ids and attention mask -> (B, dim) L2-normalised log-counts of hashed 1..order-grams.

    Only n-grams made entirely of unmasked tokens count, so left- or right-padding does not change the features.
    """
    if not 1 <= order <= MAX_NGRAM_ORDER:
        raise ValueError(f"n-gram order must be in [1, {MAX_NGRAM_ORDER}], got {order}.")
    ids = token_ids.long().cpu()
    valid = mask.cpu() != 0
    counts = torch.zeros(ids.size(0), dim, dtype=torch.float64)
    for n in range(1, order + 1):
        if ids.size(1) < n:
            break
        windows = ids.unfold(1, n, 1)  # (B, P - n + 1, n)
        window_valid = valid.unfold(1, n, 1).all(dim=-1)
        hashed = (windows * _HASH_MULTIPLIERS[:n]).sum(dim=-1) + n * 0x9E3779B97F4A7C15 % (2**62)
        buckets = torch.remainder(hashed, dim)
        counts.scatter_add_(1, buckets, window_valid.double())
    features = torch.log1p(counts)
    return torch.nn.functional.normalize(features, dim=1).to(torch.float32)


def text_token_ids(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of each text as token ids, right-padded, with a mask (for prompts given as text)."""
    encoded = [list(text.encode("utf-8")) or [0] for text in texts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.int64)
    mask = torch.zeros(len(encoded), width, dtype=torch.int64)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


@torch.no_grad()
def hidden_state_features(model, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, P) prompts -> (B, H) mean of `model`'s final hidden states over the prompt tokens, L2-normalised.

    Positions count from each prompt's first real token, so a prompt's features do not depend on how much left
    padding its batch gives it (a model with absolute position embeddings would otherwise see it shifted).
    """
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    # logits_to_keep=1: the LM head runs on one position only (a full-vocabulary head over every prompt
    # token would dominate the cost for a large vocabulary).
    out = model(input_ids=token_ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                logits_to_keep=1)
    hidden = out.hidden_states[-1].float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=1).cpu()
