"""The top-k path of the self-distillation loss: log-probs of a few entries from a blockwise normalizer."""

import torch

from trl_ext.pgpo.divergences import generalized_jsd, shared_support, support_from_top_k
from trl_ext.pgpo.sparse_log_probs import gathered_log_probs, log_normalizer


def test_log_normalizer_is_logsumexp_in_blocks_with_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    before = logits.detach().clone()
    # 10 entries per block: one position (7 entries) at a time, so 10 blocks.
    out = log_normalizer(logits, temperature=0.7, block_elements=10)
    torch.testing.assert_close(out, torch.logsumexp(logits / 0.7, dim=-1))
    assert torch.autograd.gradcheck(lambda x: log_normalizer(x, 0.7, 10), (logits,))
    assert torch.autograd.gradcheck(lambda x: log_normalizer(x, 1.0, 10), (logits,))  # no division at T = 1
    assert torch.equal(logits.detach(), before)  # the input is never written to (the tempering is on a copy)


def test_log_normalizer_keeps_half_precision_logits_and_computes_in_float32():
    torch.manual_seed(1)
    logits = (3 * torch.randn(3, 4, 50)).to(torch.bfloat16).requires_grad_()
    out = log_normalizer(logits, temperature=1.3, block_elements=64)
    assert out.dtype == torch.float32
    reference = torch.logsumexp(logits.detach().float() / 1.3, dim=-1)
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    expected = torch.softmax(logits.detach().float() / 1.3, dim=-1) / 1.3
    torch.testing.assert_close(logits.grad.float(), expected, atol=2e-3, rtol=1e-2)


def test_top_k_support_from_logits_equals_the_full_log_softmax_path():
    """Values and gradients: the support built from gathered log-probs is the one built from the full log-softmax."""
    torch.manual_seed(2)
    temperature, k, alpha = 0.9, 4, 0.5
    student_logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(2, 3, 11, dtype=torch.float64)
    sampled = torch.randint(0, 11, (2, 3, 1))

    def full(logits):
        s = (logits / temperature).log_softmax(-1)
        t = (teacher_logits / temperature).log_softmax(-1)
        support = shared_support(s, t, k, add_tail=True)
        return generalized_jsd(support.student, support.teacher, alpha), s.gather(-1, sampled), support.token_ids

    def sparse(logits):
        s_norm = log_normalizer(logits, temperature, block_elements=11)
        t_norm = log_normalizer(teacher_logits, temperature)
        ids = logits.detach().topk(k, dim=-1).indices
        support = support_from_top_k(gathered_log_probs(logits, ids, s_norm, temperature),
                                     gathered_log_probs(teacher_logits, ids, t_norm, temperature), ids, add_tail=True)
        return (generalized_jsd(support.student, support.teacher, alpha),
                gathered_log_probs(logits, sampled, s_norm, temperature), support.token_ids)

    (d_full, s_full, ids_full), (d_sparse, s_sparse, ids_sparse) = full(student_logits), sparse(student_logits)
    assert torch.equal(ids_full, ids_sparse)
    torch.testing.assert_close(d_sparse, d_full)
    torch.testing.assert_close(s_sparse, s_full)
    weights = torch.rand(2, 3, dtype=torch.float64)
    g_full, = torch.autograd.grad((d_full * weights).sum() + s_full.sum(), student_logits)
    g_sparse, = torch.autograd.grad((d_sparse * weights).sum() + s_sparse.sum(), student_logits)
    torch.testing.assert_close(g_sparse, g_full)


def test_log_normalizer_reads_the_trainers_sliced_logits_without_copying_them():
    """The trainer passes `logits[:, :-1]` (not contiguous); `reshape(-1, V)` of it copied the whole (B, T, V) logits
    in the forward and again in the backward, the copy the blockwise normalizer exists to avoid."""
    torch.manual_seed(3)
    full = torch.randn(3, 6, 9, dtype=torch.float64, requires_grad=True)
    logits = full[:, :-1, :]
    assert not logits.is_contiguous()
    copies = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (isinstance(out, torch.Tensor) and out.numel() >= logits.numel()
                    and out.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()):
                copies.append(getattr(func, "__name__", str(func)))
            return out

    with Spy():
        out = log_normalizer(logits, 0.7, block_elements=20)  # two positions per block
    assert copies == []
    torch.testing.assert_close(out, torch.logsumexp(logits.detach() / 0.7, dim=-1))
    weights = torch.rand(3, 5, dtype=torch.float64)
    grad, = torch.autograd.grad((out * weights).sum(), full)
    expected, = torch.autograd.grad((torch.logsumexp(full[:, :-1] / 0.7, dim=-1) * weights).sum(), full)
    torch.testing.assert_close(grad, expected)
    assert torch.autograd.gradcheck(lambda x: log_normalizer(x[:, :-1], 0.7, 20), (full,))
    assert torch.autograd.gradcheck(lambda x: log_normalizer(x[:, 1:, ::2], 1.0, 7), (full,))  # strided vocabulary
