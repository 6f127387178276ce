"""Two ranks, FSDP2 (fully_shard, gloo on CPU): a sharded module's full state saved by rank 0 and loaded back, and
its weights copied into another sharded module and into an unsharded one (the reference reset's copy)."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from conftest import end_distributed_run  # tests/ is on PYTHONPATH (see conftest.torchrun)
from trl_ext.core.full_state import copy_full_tensors, full_tensors, load_full_tensors

out_dir = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial weights on both ranks
module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
module.register_buffer("scale", torch.arange(3.0))
expected = [t.detach().clone() for t in module.state_dict().values()]  # before sharding: the full weights
expected_parameters = [p.detach().clone() for p in module.parameters()]
fully_shard(module, mesh=init_device_mesh("cpu", (2,)))


def tensors():
    return list(module.state_dict().values())


saved = full_tensors(tensors, list(module.parameters()), zero3=False, keep=rank == 0)
if rank == 0:
    torch.save(saved, f"{out_dir}/state.pt")
dist.barrier()
with torch.no_grad():  # forget the weights, then restore them from what rank 0 saved
    for t in tensors():
        (t.to_local() if hasattr(t, "to_local") else t).fill_(7.0)
load_full_tensors(tensors, list(module.parameters()), zero3=False, values=torch.load(f"{out_dir}/state.pt"))
restored = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors()]
local_rows = [t.to_local().shape[0] for t in tensors() if hasattr(t, "to_local")]

# The reset's copy: into a module sharded the same way, and into a plain one, from different starting weights.
torch.manual_seed(1)
sharded_target = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
plain_target = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
fully_shard(sharded_target, mesh=init_device_mesh("cpu", (2,)))
for target in (sharded_target, plain_target):
    copy_full_tensors(list(zip(module.parameters(), target.parameters())), zero3=False)
copied = {name: [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in target.parameters()]
          for name, target in (("sharded", sharded_target), ("plain", plain_target))}
torch.save({"saved": saved, "expected": expected, "restored": [t.clone() for t in restored],
            "local_rows": local_rows, "copied": copied,
            "expected_parameters": expected_parameters}, f"{out_dir}/rank{rank}.pt")
end_distributed_run()
