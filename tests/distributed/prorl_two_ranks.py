"""Run by tests/test_prorl_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

ProRL with refill dynamic sampling and a reference reset, groups spanning both ranks (6 rows per rank, groups of
4). Each rank writes what it saw to <out_dir>/rank<k>.pt: per generation batch the dynamic-sampling decision and
its local rows (answers, kept flags, token counts), then the reset history, the logged KL and parameter checksums.
"""

import os
import re
import sys

import torch

from conftest import cpu_config, end_distributed_run  # tests/ is on PYTHONPATH (see tests/test_prorl_distributed.py)
from trl_ext import demo
from trl_ext.prorl import ProRLConfig, ProRLTrainer

out_dir = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


def parity_reward(completions, answer, **kwargs):
    """Informative exactly for odd answers (even: constant 0.5; odd: 0, 1, 0, 1 by local position)."""
    return [0.5 if int(a) % 2 == 0 else float(i % 2) for i, a in enumerate(answer)]


rows = demo.get_task("arithmetic").dataset(400, seed=5)
even = [i for i, a in enumerate(rows["answer"]) if int(a) % 2 == 0][:48]
odd = [i for i, a in enumerate(rows["answer"]) if int(a) % 2 == 1][:16]
dataset = rows.select(sorted(even + odd))


class RecordingProRLTrainer(ProRLTrainer):
    batches: list = []

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        texts = self.processing_class.batch_decode(out["prompt_ids"], skip_special_tokens=True)
        result = self.last_dynamic_sampling
        self.batches.append(
            {
                "rounds": result.rounds,
                "informative_per_round": result.informative_per_round,
                "selection": (result.selection.rounds, result.selection.groups, result.selection.keep),
                "answers": [sum(map(int, re.search(r"(\d+)\+(\d+)=", t).groups())) for t in texts],
                "kept": (out["completion_mask"].sum(1) > 0).tolist(),
                "tokens": int(out["completion_mask"].sum()),
                "num_items_in_batch": int(out["num_items_in_batch"]),
                "rows": out["completion_ids"].size(0),
            }
        )
        return out


args = cpu_config(
    ProRLConfig,
    os.path.join(out_dir, "run"),
    max_steps=3,
    per_device_train_batch_size=6,  # 12 rows = 3 groups of 4; the middle group spans both ranks
    beta=0.1,
    ref_reset_steps=2,
    dynamic_sampling="refill",
    ddp_find_unused_parameters=False,
)
trainer = RecordingProRLTrainer(model=demo.student_path("arithmetic"), reward_funcs=[parity_reward], args=args,
                                train_dataset=dataset)
trainer.train()


def checksum(parameters):
    return sum(p.detach().double().sum().item() for p in parameters)


torch.save(
    {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "batches": trainer.batches,
        "resets": trainer.reference_reset.history,
        "kl": [entry["kl"] for entry in trainer.state.log_history if "kl" in entry],
        "prorl_logs": [{k: v for k, v in entry.items() if k.startswith("prorl/")}
                       for entry in trainer.state.log_history],
        "policy_checksum": checksum(trainer.model.parameters()),
        "reference_checksum": checksum(trainer.ref_model.parameters()),
    },
    os.path.join(out_dir, f"rank{rank}.pt"),
)
end_distributed_run()
