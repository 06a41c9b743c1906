"""Run under torchrun (gloo): DDP gradients of the SimCLR objective on this rank's half of a batch.

Rank r takes rows [r*B, (r+1)*B) of a seeded batch; rank 1's images are also scaled, so the two
halves differ in content and statistics (asymmetric inputs). Rank 0 writes the averaged gradients.
"""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dist_model import build_model, make_batch  # noqa: E402

from ssl_hybrid.distributed import end_distributed, gloo_threads  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = torch.nn.parallel.DistributedDataParallel(build_model())
view0, view1 = make_batch()
per_rank = view0.shape[0] // world
rows = slice(rank * per_rank, (rank + 1) * per_rank)
loss = model(view0[rows], view1[rows])
loss.backward()
if rank == 0:
    torch.save({n: p.grad for n, p in model.module.named_parameters()}, sys.argv[1])
dist.barrier()
del model  # the DDP wrapper holds the process group (and gloo's threads) past destroy_process_group
end_distributed()
assert not gloo_threads(), gloo_threads()  # nothing left for interpreter finalization to tear down
