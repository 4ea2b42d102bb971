"""Run under torchrun (2 ranks, gloo): FSDP2 collectives of one training step per latent count.

Shards a tiny Qwen2 Coconut as the trainer does (distributed.shard), warms up, then counts the
all-gathers and reduce-scatters of one forward + backward + release_gathered; rank 0 prints one
JSON line {latents: {collective: calls}}.
"""

from __future__ import annotations

import collections
import gc
import json

import torch
import torch.distributed as dist

from coconut import Coconut
from dataset import MyCollator
from distributed import release_gathered, shard
from tests.test_coconut_text import END, EOS, LATENT, PAD, START, sample, tiny_lm

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")


def main() -> None:
    dist.init_process_group("gloo")
    calls: collections.Counter = collections.Counter()
    for name in COLLECTIVES:
        if hasattr(dist, name):  # FSDP2 calls them as dist.<name> at run time
            original = getattr(dist, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
    model = tiny_lm(seed=0).train()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    shard(coconut, model.model.layers, None, None)
    coconut.synced_gpus = True
    result = {}
    for n in (0, 2, 5):
        batch = MyCollator(PAD, LATENT)([sample([5, 6, 7], n, [10, 11, EOS]), sample([8, 9], n, [12, EOS])])
        batch.pop("idx")
        for _ in range(2):  # a warm-up step, then the counted one
            calls.clear()
            coconut(**batch).loss.backward()
            release_gathered(model.model.layers)
        result[n] = dict(calls)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    # Drop FSDP's state (and the collective handles it keeps) while the process group is alive:
    # tearing gloo down under them aborts the process now and then.
    del coconut, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
