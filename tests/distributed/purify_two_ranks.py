"""Run by tests/test_purify_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

For two purifications (the RL selector, which samples its choices and measures the student's improvement one rollout
later, and the classifier router, which trains an MLP online), each rank trains a few steps on its slice of every
generation batch (groups span ranks) and writes to <out_dir>/<purification>-rank<k>.pt what it saw per rollout (its
local teacher log-likelihoods, the gathered batch, its own decision and the broadcast weights), its final router
state and a parameter checksum.
"""

import copy
import os
import sys

import torch

from conftest import cpu_config, end_distributed_run  # tests/ is on PYTHONPATH (see tests/test_purify_distributed.py)
from trl_ext import demo
from trl_ext.purify import PurifiedDistillConfig, PurifiedDistillTrainer
from trl_ext.purify.signal import sequence_logps

out_dir = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


def char_reward(completions, answer, **kwargs):
    """Per-character agreement with the answer: dense, so that most prompts tell the teachers apart."""
    texts = [demo.completion_text(c).strip() for c in completions]
    return [sum(x == y for x, y in zip(t, a)) / max(len(t), len(a), 1) for t, a in zip(texts, answer)]


class RecordingTrainer(PurifiedDistillTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts = []

    def score_completions(self, model, rollout):
        logps = super().score_completions(model, rollout)
        if any(model is t for t in self.teacher_models):
            self._local_teacher_seq.append(sequence_logps(logps.float(), self.loss_mask(rollout).float()).cpu())
        return logps

    def _postprocess_rollout(self, inputs, rollout):
        self._local_teacher_seq = []
        out = super()._postprocess_rollout(inputs, rollout)
        done = self.last_purification
        self.rollouts.append({
            "local_teacher_seq_logps": torch.stack(self._local_teacher_seq),
            "teacher_seq_logps": done.batch.teacher_seq_logps,
            "features": done.batch.features,
            "signal": done.batch.signal,
            "rewards": done.batch.rewards,
            "decided_weights": done.decision.weights.clone(),  # this rank's own decision, before the broadcast
            "weights": done.weights,
            "advantages": out["advantages"].cpu(),
        })
        return out


teachers = [demo.teacher_path("arithmetic"), demo.student_path("arithmetic"), demo.pretrained_model(demo.untrained(3))]
for purification in ("rl_selection", "classifier_router"):
    args = cpu_config(
        PurifiedDistillConfig,
        os.path.join(out_dir, purification),
        purification=purification,
        **({"router_min_examples": 1} if purification == "classifier_router" else {}),
        max_steps=3,
        per_device_train_batch_size=2,  # x 3 accumulation steps = 6 rows per rank; groups of 4 span both ranks
        gradient_accumulation_steps=3,
        ddp_find_unused_parameters=False,
    )
    trainer = RecordingTrainer(model=demo.student_path("arithmetic"), reward_funcs=[char_reward], args=args,
                               train_dataset=demo.get_task("arithmetic").dataset(64, seed=3), teacher_models=teachers)
    trainer.train()
    torch.save(
        {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "rollouts": trainer.rollouts,
            "purifier": copy.deepcopy(trainer.purifier.state_dict()),
            "log_history": trainer.state.log_history,
            "checksum": sum(p.detach().double().sum().item() for p in trainer.model.parameters()),
        },
        os.path.join(out_dir, f"{purification}-rank{rank}.pt"),
    )
end_distributed_run()
