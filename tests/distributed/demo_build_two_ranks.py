"""Run by tests/test_demo_build_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Both ranks ask for the same tiny recipe on a cold cache after the process group is up, as an example script does
(its config joins the group before the demo models are requested). The recipe's task is registered here at run
time, as the purification demo registers its teachers' tasks, so the build process must be sent it. Each rank
writes the path it got to <cache_dir>/rank<k>.txt.
"""

import os
import sys
from pathlib import Path

from accelerate import PartialState

from conftest import end_distributed_run  # tests/ is on PYTHONPATH (see conftest.torchrun)
from trl_ext import demo

cache_dir = Path(sys.argv[1])
state = PartialState(cpu=True)  # joins the process group, as parsing a training config does
assert state.num_processes == 2, state
demo.register_task(demo.Arithmetic(name="arithmetic-registered-at-run-time", max_operand=3))
recipe = demo.Pretraining(tasks=("arithmetic-registered-at-run-time",), steps=2, batch_size=4, num_examples=16, seed=5)
path = demo.pretrained_model(recipe, cache_dir=cache_dir)
(cache_dir / f"rank{os.environ['RANK']}.txt").write_text(path)
end_distributed_run()
