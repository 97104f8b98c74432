"""How a vblora model is sharded: torch FSDP2 (`fully_shard`) over the frozen base, the trained tensors kept whole.

With VB-LoRA (and every adapter method) what trains is small: the bank `(h, b)`, the logits `(N, h)` and a trained
head. What is big is frozen: the base's decoder blocks, embeddings and output layer. So:

- every repeated block (the model's `_no_split_modules` class, else the class of the largest `nn.ModuleList`'s
  members) becomes one FSDP2 unit, and the root another (embeddings, final norm, output layer): their *frozen*
  parameters are sharded over the processes (`Shard(0)` DTensors), all-gathered just before use and freed after;
- every *trainable* parameter is left out of FSDP (`ignored_params`): the bank, the logits and a trained head stay
  whole, plain tensors, identical on every process. The root's forward pre-hook still composes all `N` sub-vectors
  once per forward (`vblora.bank.VectorBank.begin_step`), from the whole bank, before any block runs;
- the gradients of those whole tensors are averaged over the processes after backward (FSDP leaves ignored
  parameters alone), so each process holds the gradient one process computes on the global batch (up to float
  rounding; with a mean loss over equal parts per process, or the Trainer's token-count scaling of LM losses).

`shard_model` does all three for a plain loop. `vblora train --fsdp` (train/pipeline.py) shards the same way and
lets the transformers Trainer average the whole tensors' gradients (its handling of a model sharded before it gets
it: no DDP wrap, replicated trainable parameters broadcast from rank 0 and their gradients averaged once per
accumulation window).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from vblora.inject import unwrap
from vblora.train.errors import SetupError


def block_classes(model: nn.Module) -> tuple[type, ...]:
    """The model's repeated block class(es): `_no_split_modules` (transformers' own list of the classes that must
    not be cut, e.g. LlamaDecoderLayer) when present in the model, else the member class of the largest ModuleList."""
    model = unwrap(model)
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if found:
        return tuple(sorted(found, key=lambda c: c.__name__))
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if lists:
        largest = max(lists, key=len)
        cls, count = Counter(type(m) for m in largest).most_common(1)[0]
        if count > 1:
            return (cls,)
    raise SetupError(
        f"--fsdp: found no repeated block in {type(model).__name__} (no _no_split_modules and no "
        f"nn.ModuleList of two or more layers) to shard; train it without --fsdp"
    )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters kept whole: the bank, the logits, trained heads (every parameter with requires_grad)."""
    return [p for p in unwrap(model).parameters() if p.requires_grad]


def device_mesh(device: torch.device | str | None = None):
    """A 1-D mesh over all processes (the default process group must exist: torchrun / init_process_group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise SetupError(
            "--fsdp needs several processes: launch with torchrun --nproc-per-node N -m vblora train "
            "... (or accelerate launch)"
        )
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(kind, (dist.get_world_size(),))


def shard_model(model: nn.Module, mesh=None, *, average_gradients: bool = True) -> nn.Module:
    """Apply FSDP2 to an adapted model in place: each block, then the root; trainable parameters kept whole.

    `average_gradients`: register a hook on each whole (trainable) parameter that averages its gradient over the
    mesh's processes as soon as backward has accumulated it (leave False where the caller averages them, as the
    transformers Trainer does). Blocks are resharded after forward, the root is not (FSDP2's default). Returns the
    model (its class is now FSDP's subclass of the original).
    """
    root = unwrap(model)
    if isinstance(root, FSDPModule):
        raise SetupError("the model is already sharded (FSDP); shard it once")
    whole = set(trainable_parameters(root))
    if not whole:
        raise SetupError("--fsdp: the model has no trainable parameter (add an adapter first)")
    if len(whole) == sum(1 for _ in root.parameters()):
        raise SetupError(
            "--fsdp keeps the trained parameters whole and shards the frozen base; with --method full "
            "everything trains, so nothing would be sharded: use an adapter method, or accelerate's own "
            "FSDP for full fine-tuning"
        )
    check_shardable(root, whole)
    mesh = mesh if mesh is not None else device_mesh()
    classes = block_classes(root)
    kwargs = {"mesh": mesh, "ignored_params": whole}
    for module in root.modules():
        if isinstance(module, classes):
            fully_shard(module, **kwargs)
    fully_shard(root, **kwargs)  # embeddings, final norm, output layer: sharded too; the bank's tensors are ignored
    # FSDP moved what it manages to the mesh's device (this process's GPU under CUDA); whole tensors and buffers follow
    cuda = mesh.device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(mesh.device_type)
    with torch.no_grad():
        for t in [*whole, *root.buffers()]:
            if t.device != device:
                t.data = t.data.to(device)
    if hasattr(root, "generate"):  # generate() reads the embeddings outside forward: unshard around it too
        register_fsdp_forward_method(root, "generate")
    if average_gradients:
        # once per backward, when p.grad holds this backward's whole contribution; averaging after each backward of
        # an accumulation window gives the same sum as averaging once at its end (the earlier part is equal everywhere)
        group = mesh.get_group()
        for p in whole:
            p.register_post_accumulate_grad_hook(lambda t: dist.all_reduce(t.grad, op=dist.ReduceOp.AVG, group=group))
    return model


def check_shardable(model: nn.Module, whole: set) -> None:
    """FSDP2 shards floating-point tensors only: a 4-bit base stored in uint8 (bitsandbytes' default) cannot be
    sharded; `bnb_4bit_quant_storage` set to the compute dtype stores it in a float dtype that can."""
    bad = [n for n, p in model.named_parameters() if p not in whole and not p.is_floating_point()]
    if bad:
        raise SetupError(
            f"--fsdp: {len(bad)} frozen parameters are not floating point (e.g. {bad[0]}, "
            f"{type(model.get_parameter(bad[0])).__name__}); FSDP shards floating-point tensors only. "
            f"For a 4-bit base, load it with BitsAndBytesConfig(bnb_4bit_quant_storage=<compute dtype>)"
        )


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every FSDP unit unsharded (whole base weights on every process) inside the block, sharded again after. A
    collective: enter it on every process. Used to save an adapter, whose header samples a few base weights; the
    peak memory is the whole base once per process for that moment."""
    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
