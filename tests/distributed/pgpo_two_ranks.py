"""Run by tests/test_pgpo_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

For each information estimator named on the command line (one launch for all: starting two processes costs more than
a run), each rank trains PGPO with gradient accumulation (groups span ranks, feedback on some prompts) and writes,
for every optimizer step, its own local information statistics (summed over its micro-batches) and the I_k / m_k it
used, plus a final parameter checksum and the completions table's self-teacher advantages, to
<out_dir>/<estimator>_rank<k>.pt.
"""

import os
import sys

import torch

from conftest import cpu_config, end_distributed_run  # tests/ is on PYTHONPATH (see conftest.torchrun)
from trl_ext import PGPOConfig, PGPOTrainer, demo
from trl_ext.pgpo.trainer import TEACHER_ADVANTAGE_COLUMN

out_dir, estimators = sys.argv[1], sys.argv[2:]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


class RecordingPGPOTrainer(PGPOTrainer):
    steps: list = []

    def _modulate_step_size(self):
        local = self._step_statistics.clone().cpu()
        super()._modulate_step_size()
        self.steps.append({"local": local, **self.last_step_size,
                           "lr": [group["lr"] for group in self.optimizer.param_groups]})


dataset = demo.get_task("arithmetic").dataset(64, seed=3)
dataset = dataset.add_column("feedback", [f"expected {a}" if i % 3 == 0 else "" for i, a in enumerate(dataset["answer"])])
for estimator in estimators:
    RecordingPGPOTrainer.steps = []
    args = cpu_config(
        PGPOConfig,
        os.path.join(out_dir, f"run_{estimator}"),
        max_steps=3,
        per_device_train_batch_size=4,  # with num_generations=4, groups are split over ranks and micro-batches
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        distillation_topk=8,
        information_estimator=estimator,
        multiplier_min=0.2,
        multiplier_max=5.0,
        ddp_find_unused_parameters=False,
        log_completions=True,
    )
    trainer = RecordingPGPOTrainer(model=demo.student_path("arithmetic"), reward_funcs=[demo.task_reward], args=args,
                                   train_dataset=dataset)
    trainer.train()
    torch.save(
        {
            "world_size": trainer.accelerator.num_processes,
            "steps": trainer.steps,
            "buckets": args.agreement_buckets,
            "checksum": sum(p.detach().double().sum().item() for p in trainer.model.parameters()),
            "teacher_advantages": list(trainer._logs["extra"][TEACHER_ADVANTAGE_COLUMN]),
            "rows": trainer.args.generation_batch_size,
        },
        os.path.join(out_dir, f"{estimator}_rank{rank}.pt"),
    )
end_distributed_run()
