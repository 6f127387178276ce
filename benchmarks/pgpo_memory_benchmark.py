"""Memory of PGPO's top-k self-distillation loss: full float32 log-softmax vs blockwise normalizer (sparse_log_probs).

For bf16 student and teacher logits of shape (1, T, V) with a growing vocabulary V, one forward and backward of the
top-k (+ tail) generalized-JSD loss, computed two ways from the same logits:

* full: the previous implementation, a float32 log-softmax over the vocabulary for both models, then the top-k
  entries gathered from it (`shared_support`);
* sparse: the current one, `log_normalizer` + `gathered_log_probs` + `support_from_top_k`.

Measured per way: the bytes the autograd graph holds for the backward pass (saved tensors, counted once per storage,
the logits themselves excluded since both ways keep them), the bytes of the vocabulary-wide float tensors the forward
creates (whole (B, T, V) copies, or the sparse way's blocks of positions; teacher included), and the CPU wall time of forward + backward (median of `--repeats`). Both ways must
give the same loss and, up to bf16 rounding, the same gradient (checked; the run fails otherwise).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/pgpo_memory_benchmark.py          # ~1 min, ~3 GB RAM
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/pgpo_memory_benchmark.py --quick  # seconds

Writes `<out-dir>/pgpo_memory.json` and `.png` (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks._shared import versions, write_json  # noqa: E402
from trl_ext.pgpo.divergences import generalized_jsd, shared_support, support_from_top_k  # noqa: E402
from trl_ext.pgpo.sparse_log_probs import gathered_log_probs, log_normalizer  # noqa: E402

RESULT_NAME = "pgpo_memory"
WAYS = ("full", "sparse")


def loss_full(student, teacher, sampled, k, temperature):
    s = (student.float() / temperature).log_softmax(-1)
    with torch.no_grad():
        t = (teacher.float() / temperature).log_softmax(-1)
    support = shared_support(s, t, k, add_tail=True)
    return generalized_jsd(support.student, support.teacher, 0.5).sum() + s.gather(-1, sampled).sum()


def loss_sparse(student, teacher, sampled, k, temperature):
    s_norm = log_normalizer(student, temperature)
    with torch.no_grad():
        t_norm = log_normalizer(teacher, temperature)
    ids = student.detach().topk(k, dim=-1).indices
    support = support_from_top_k(gathered_log_probs(student, ids, s_norm, temperature),
                                 gathered_log_probs(teacher, ids, t_norm, temperature), ids, add_tail=True)
    return (generalized_jsd(support.student, support.teacher, 0.5).sum()
            + gathered_log_probs(student, sampled, s_norm, temperature).sum())


def saved_bytes(fn, student, exclude) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs, once per storage, `exclude` left out."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    student.grad = None
    return sum(storages.values())


def vocabulary_sized_bytes(fn, entries: int, exclude) -> int:
    """Bytes of the float tensors with >= `entries` elements the forward creates (its (B, T, V) copies, or blocks
    of them of at least one row; views of the logits, in `exclude`, are not new)."""
    created: dict[int, torch.Tensor] = {}  # holding the tensors: a freed block's address could be reused

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() >= entries:
                storage = out.untyped_storage()
                if storage.data_ptr() not in exclude:
                    created[storage.data_ptr()] = out
            return out

    with Spy():
        loss = fn()
    del loss
    return sum(t.untyped_storage().nbytes() for t in created.values())


def measure(vocab: int, args) -> dict:
    torch.manual_seed(0)
    student = (4 * torch.randn(1, args.positions, vocab)).to(torch.bfloat16).requires_grad_()
    teacher = (4 * torch.randn(1, args.positions, vocab)).to(torch.bfloat16)
    sampled = torch.randint(0, vocab, (1, args.positions, 1))
    functions = {"full": loss_full, "sparse": loss_sparse}
    exclude = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    row: dict = {"vocab": vocab, "positions": args.positions, "logits_bytes": student.numel() * 2}
    grads = {}
    for way in WAYS:
        fn = functions[way]
        call = lambda: fn(student, teacher, sampled, args.topk, args.temperature)  # noqa: E731
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss = call()
            loss.backward()
            times.append(time.perf_counter() - start)
            grads[way], student.grad = student.grad.float(), None
            row.setdefault("loss", {})[way] = loss.item()
        row[way] = {"saved_for_backward_bytes": saved_bytes(call, student, exclude),
                    "vocabulary_sized_bytes_created": vocabulary_sized_bytes(call, student.size(-1), exclude),
                    "seconds": statistics.median(times)}
    # Relative to the largest gradient entry. Both gradients are bf16 (8 bits of mantissa, 2^-8 = 0.4%): the full way
    # rounds each entry once, the sparse way up to three times (its gathers' and its normalizer's gradients, then
    # their sum); exactness itself is tested in float64 (tests/test_pgpo_sparse_log_probs.py).
    difference = ((grads["full"] - grads["sparse"]).abs().max() / grads["full"].abs().max()).item()
    row["max_gradient_difference_relative"] = difference
    if not abs(row["loss"]["full"] - row["loss"]["sparse"]) <= 1e-3 * abs(row["loss"]["full"]) or difference > 5e-2:
        raise SystemExit(f"V={vocab}: the two ways disagree (loss {row['loss']}, gradient difference {difference})")
    return row


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    vocab = [r["vocab"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for way, color in zip(WAYS, ("tab:gray", "tab:blue")):
        axes[0].plot(vocab, [r[way]["saved_for_backward_bytes"] / 2**20 for r in rows], "o-", color=color,
                     label=f"{way}: saved for backward")
        axes[0].plot(vocab, [r[way]["vocabulary_sized_bytes_created"] / 2**20 for r in rows], "s--", color=color,
                     label=f"{way}: (T, V) float tensors created")
        axes[1].plot(vocab, [1e3 * r[way]["seconds"] for r in rows], "o-", color=color, label=way)
    axes[0].plot(vocab, [r["logits_bytes"] / 2**20 for r in rows], ":", color="black", label="bf16 logits (both)")
    axes[0].set_ylabel("MiB")
    axes[1].set_ylabel("ms, forward + backward (CPU)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PGPO top-{report['config']['topk']} loss, {report['config']['positions']} positions, bf16 logits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=str, default="1024,8192,32768,152064", help="vocabulary sizes")
    p.add_argument("--positions", type=int, default=512, help="completion positions (B x T)")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.positions, args.repeats = "512,4096", 64, 1
    torch.set_num_threads(1)
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        rows.append(measure(vocab, args))
        r = rows[-1]
        print(f"V={vocab:>7}: saved for backward {r['full']['saved_for_backward_bytes'] / 2**20:8.1f} MiB (full) vs "
              f"{r['sparse']['saved_for_backward_bytes'] / 2**20:6.1f} MiB (sparse); vocabulary-sized floats created "
              f"{r['full']['vocabulary_sized_bytes_created'] / 2**20:8.1f} vs "
              f"{r['sparse']['vocabulary_sized_bytes_created'] / 2**20:6.1f} MiB; "
              f"{1e3 * r['full']['seconds']:.0f} vs {1e3 * r['sparse']['seconds']:.0f} ms", flush=True)
    report = {"benchmark": RESULT_NAME, "versions": versions(),
              "config": {"positions": args.positions, "topk": args.topk, "temperature": args.temperature,
                         "repeats": args.repeats, "dtype": "bfloat16", "threads": 1},
              "rows": rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, out_dir / f"{RESULT_NAME}.json")
    plot(report, out_dir / f"{RESULT_NAME}.png")
    print(f"wrote {out_dir / (RESULT_NAME + '.json')} and {out_dir / (RESULT_NAME + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
