"""Run under torchrun (2 ranks, gloo) with check names as arguments; rank 0 prints one JSON line,
{check: result}. The checks run in the order given, on one tiny Qwen2 Coconut sharded as the
trainer shards it (distributed.shard):

- `collectives`: the all-gathers and reduce-scatters of one forward + backward + release_gathered
  (after a warm-up step), per latent count: {latents: {collective: calls}}.
- `compiled`: loss and gradients of one step with compile_latent_passes="default" against the
  same step eager, each on a fresh copy of the model with one decoder layer (the option is fixed
  when Coconut is built; compiling takes most of this worker's time and grows with the layers,
  while one sharded layer under the root meets FSDP's hooks as two do):
  {"graphs": compiled graphs, "loss": [eager, compiled], "max_grad_diff": ...,
  "max_grad": ...}.
- `fresh_optimizer`: an optimizer built after an evaluation forward (what reset_optimizer does at
  a new epoch): {"plain_after_eval": parameters left gathered (plain tensors), "stale_refused":
  check_optimizer_params refused one built then, "fresh_state_entries": state entries of one built
  after release_gathered and stepped, "trainable": trainable parameters}.
- `uneven_latents`: rank 0's batch has latents (2 per sample), rank 1's none; each normalises by the
  global label count. Against one unsharded process on all four samples: {"loss": [the ranks' summed
  losses, the process's], "max_grad_diff": ..., "max_grad": ...}.
"""

from __future__ import annotations

import collections
import gc
import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from coconut import Coconut
from dataset import Batch, MyCollator
from tests.helpers.text_lm import END, EOS, LATENT, PAD, START, sample, tiny_lm
from training.distributed import check_optimizer_params, release_gathered, shard

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")


def batch_with(n_latents: int) -> Batch:
    return MyCollator(PAD, LATENT)([sample([5, 6, 7], n_latents, [10, 11, EOS]), sample([8, 9], n_latents, [12, EOS])])


def sharded_coconut(layers: int = 2, **options: Any) -> Coconut:
    """The tiny Qwen2 (seed 0) in Coconut, sharded as the trainer shards it, ranks synced."""
    model = tiny_lm(seed=0, layers=layers).train()
    coconut = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD, synced_gpus=True, **options)
    shard(coconut, model.model.layers, None, None)
    return coconut


def step(coconut: Coconut, batch: Batch) -> torch.Tensor:
    loss = coconut(batch).loss
    loss.backward()
    release_gathered(coconut.base_causallm.model.layers)
    return loss.detach()


def collectives(coconut: Coconut) -> dict[str, Any]:
    calls: collections.Counter = collections.Counter()
    for name in COLLECTIVES:
        if hasattr(dist, name):  # FSDP2 calls them as dist.<name> at run time
            original = getattr(dist, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
    result = {}
    for n in (0, 2, 5):
        batch = batch_with(n)
        for _ in range(2):  # a warm-up step, then the counted one
            calls.clear()
            step(coconut, batch)
        result[n] = dict(calls)
    return result


def compiled(_: Coconut) -> dict[str, Any]:
    batch = batch_with(3)

    def grads(coconut: Coconut) -> dict[str, torch.Tensor]:
        return {n: p.grad.full_tensor().clone() for n, p in coconut.named_parameters() if p.grad is not None}

    eager_model = sharded_coconut(layers=1)
    eager_loss = step(eager_model, batch)
    eager = grads(eager_model)
    compiled_model = sharded_coconut(layers=1, compile_latent_passes="default")
    compiled_loss = step(compiled_model, batch)
    ours = grads(compiled_model)
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "loss": [float(eager_loss), float(compiled_loss)],
        "max_grad_diff": max(float((ours[k] - eager[k]).abs().max()) for k in eager),
        "max_grad": max(float(g.abs().max()) for g in eager.values()),
    }


def fresh_optimizer(coconut: Coconut) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    batch = batch_with(2)
    step(coconut, batch)
    coconut.zero_grad(set_to_none=True)
    with torch.no_grad():  # evaluation: no backward reshards what the forward gathered
        coconut(batch)
    plain = sum(not isinstance(p, DTensor) for p in coconut.parameters())
    trainable = [p for p in coconut.parameters() if p.requires_grad]
    stale = torch.optim.AdamW(trainable)
    release_gathered(coconut)
    try:
        check_optimizer_params(coconut, stale)
        refused = False
    except RuntimeError:
        refused = True
    # (stepping `stale`, or gathering its state, which steps it once, ends in SIGSEGV: its tensors were freed)
    fresh = torch.optim.AdamW([p for p in coconut.parameters() if p.requires_grad])
    check_optimizer_params(coconut, fresh)
    step(coconut, batch)
    fresh.step()
    fresh.zero_grad(set_to_none=True)
    state = get_optimizer_state_dict(coconut, fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {
        "plain_after_eval": plain,
        "stale_refused": refused,
        "fresh_state_entries": len(state.get("state", {})),
        "trainable": len(trainable),
    }  # (the full state is gathered on rank 0, which reports)


def uneven_latents(_: Coconut) -> dict[str, Any]:
    features = [
        [sample([5, 6, 7], 2, [10, 11, EOS]), sample([8, 9], 2, [12, 13, 14, EOS])],  # rank 0: latents
        [sample([20, 21, 22], 0, [23, EOS]), sample([24], 0, [25, 26, EOS])],  # rank 1: markers, no latents
    ]
    collate = MyCollator(PAD, LATENT)
    batch = collate(features[dist.get_rank()])
    labels = torch.tensor(float((batch.labels[:, 1:] != -100).sum()))
    dist.all_reduce(labels)
    sharded = sharded_coconut()
    loss = sharded(batch, num_items_in_batch=labels / dist.get_world_size()).loss
    loss.backward()
    release_gathered(sharded.base_causallm.model.layers)  # the decoder layers' gradients reduced, as a step does
    ours = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    model = tiny_lm(seed=0).train()
    reference = Coconut(model, LATENT, START, END, EOS, pad_token_id=PAD)
    ref_loss = reference(collate(features[0] + features[1])).loss
    ref_loss.backward()
    ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    return {
        "loss": [float(summed) / dist.get_world_size(), float(ref_loss)],
        "same_parameters": sorted(ours) == sorted(ref),
        "max_grad_diff": max(float((ours[k] - ref[k]).abs().max()) for k in ref.keys() & ours.keys()),
        "max_grad": max(float(g.abs().max()) for g in ref.values()),
    }


CHECKS = {
    "collectives": collectives,
    "compiled": compiled,
    "fresh_optimizer": fresh_optimizer,
    "uneven_latents": uneven_latents,
}


def run_checks(checks: list[str]) -> dict[str, Any] | None:
    """The checks' results on rank 0 (None on the others), in a process group joined and left here."""
    dist.init_process_group("gloo")
    coconut = sharded_coconut()
    result = {check: CHECKS[check](coconut) for check in checks}
    # Drop FSDP's state (and the collective handles it keeps) while the process group is alive:
    # tearing gloo down under them aborts the process now and then.
    del coconut
    gc.collect()
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return result if rank == 0 else None


def main(checks: list[str]) -> None:
    result = run_checks(checks)
    if result is not None:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1:])
