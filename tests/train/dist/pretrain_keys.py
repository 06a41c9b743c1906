"""Run under torchrun: the real trainer on 2 processes; each rank records the sample keys it trained on."""

import json
import sys

from ssl_hybrid.config import load_config
from ssl_hybrid.train import engine

out_dir, overrides = sys.argv[1], sys.argv[2:]
seen = []
real_to_device = engine.to_device


def recording_to_device(batch, device):
    seen.extend(batch["key"])
    return real_to_device(batch, device)


engine.to_device = recording_to_device
config = load_config(None, overrides)
summary = engine.pretrain(config)
import os  # noqa: E402

from ssl_hybrid.distributed import gloo_threads  # noqa: E402

assert not gloo_threads(), gloo_threads()  # pretrain left no process group for interpreter finalization

rank = int(os.environ["RANK"])
with open(f"{out_dir}/keys_rank{rank}.json", "w") as handle:
    json.dump({"keys": seen, "summary": summary}, handle)
