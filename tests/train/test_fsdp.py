"""Sharded training (train/sharding.py): FSDP2 over 2 CPU processes (gloo) gives the loss, the bank and logits
gradients and the parameters after a few AdamW steps of one process on the same global batch, float32."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

from vblora.train.errors import SetupError

H, B, RANK, K = 16, 32, 4, 2
STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama(tied: bool = True):
    """A 2-layer LLaMA (hidden 64) from a config, adapted with VB-LoRA on all linear modules; same on every process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import vblora

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return vblora.add_vblora(
        LlamaForCausalLM(cfg),
        vblora.VBLoRAConfig(target_modules="all-linear", num_vectors=H, vector_length=B, rank=RANK, topk=K),
    )


def _optimizer(model):
    import vblora

    return torch.optim.AdamW(vblora.parameter_groups(model, lr_bank=1e-2, lr_logits=5e-2), betas=(0.9, 0.999))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One process: the sharded model on its part of each global batch, and (for comparison, no collectives) one
    unsharded copy on the whole global batch, the one-process run. Rank 0 writes what it saw to `out`."""
    import torch.distributed as dist

    from vblora import get_bank
    from vblora.storage.snapshot import take_snapshot
    from vblora.train import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_llama()
        one = copy.deepcopy(model)  # the one-process run
        frozen_before = {n: p.detach().clone() for n, p in one.named_parameters() if not p.requires_grad}
        sharding.shard_model(model, sharding.device_mesh("cpu"))
        bank, bank_one = get_bank(model), get_bank(one)
        compositions = []
        compose = bank.compose_rows
        bank.compose_rows = lambda *a, **kw: (compositions.append(1), compose(*a, **kw))[1]  # counts compositions
        opt, opt_one = _optimizer(model), _optimizer(one)
        g = torch.Generator().manual_seed(1)
        seen = {
            "loss": [],
            "loss_one": [],
            "grad_bank": [],
            "grad_logits": [],
            "grad_bank_one": [],
            "grad_logits_one": [],
            "compositions": [],
        }
        for _ in range(STEPS):
            ids = torch.randint(0, 96, (GLOBAL_BATCH, LENGTH), generator=g)  # (B, T): no padding, equal token counts
            part = ids.chunk(world)[rank]
            compositions.clear()
            loss = model(input_ids=part, labels=part).loss
            seen["compositions"].append(len(compositions))
            loss.backward()
            loss_one = one(input_ids=ids, labels=ids).loss
            loss_one.backward()
            mean = loss.detach().clone()
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            seen["loss"].append(float(mean))
            seen["loss_one"].append(loss_one.item())
            for name, b in (("", bank), ("_one", bank_one)):
                seen["grad_bank" + name].append(b.bank.grad.clone())
                seen["grad_logits" + name].append(b.logits.grad.clone())
            for o in (opt, opt_one):
                o.step()
                o.zero_grad()
        base = model.model.layers[0].self_attn.q_proj.base.weight
        seen.update(
            bank=bank.bank.detach().clone(),
            logits=bank.logits.detach().clone(),
            bank_one=bank_one.bank.detach().clone(),
            logits_one=bank_one.logits.detach().clone(),
            base_type=type(base).__name__,
            base_local_rows=base.to_local().shape[0],
            base_rows=base.shape[0],
            bank_type=type(bank.bank).__name__,
            logits_type=type(bank.logits).__name__,
        )
        with sharding.gathered(model):  # collective; then one process reads the whole weights (adapter save)
            state = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            seen["sample"] = take_snapshot(model).weight_sample if rank == 0 else None
        seen["sample_one"] = take_snapshot(one).weight_sample
        seen["frozen_unchanged"] = all(torch.equal(state[n], t) for n, t in frozen_before.items())
        seen["frozen_names"] = sorted(state) == sorted(frozen_before)
        if rank == 0:
            torch.save(seen, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Run `_worker` on 2 processes (forked: the parent's imports are reused, so this takes a few seconds)."""
    import torch.multiprocessing as mp

    import vblora.storage.snapshot
    import vblora.train.sharding  # noqa: F401  (imported for the fork: the workers reuse the parent's modules)

    with torch.no_grad():  # transformers' lazy imports (model classes, generation, masks) loaded before the fork too
        tiny_llama()(input_ids=torch.zeros(1, 2, dtype=torch.long))
    out = str(tmp_path_factory.mktemp("fsdp") / "seen.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="fork")
    return torch.load(out, weights_only=False)


def test_two_processes_equal_one_process(two_processes):
    s = two_processes
    assert s["loss"] == pytest.approx(s["loss_one"], abs=1e-6)
    for what in ("grad_bank", "grad_logits"):
        for step, (got, want) in enumerate(zip(s[what], s[what + "_one"], strict=True)):
            size = float(want.abs().max())
            assert size > 1e-6, (what, step)  # a gradient that could be wrong
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * size, msg=f"{what} step {step}")
    for what in ("bank", "logits"):  # after STEPS AdamW steps
        # AdamW divides by sqrt(v): a logit gradient of 1e-8 (Adam's eps) that differs in its last bits moves that
        # logit differently; 1e-5 is 2e-4 of one step (lr 5e-2)
        torch.testing.assert_close(s[what], s[what + "_one"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(s["grad_bank"][0], s["grad_bank"][-1])  # the parameters moved between the steps


def test_base_sharded_bank_whole_composed_once(two_processes):
    s = two_processes
    assert s["base_type"] == "DTensor" and s["base_local_rows"] * 2 == s["base_rows"]  # half the rows on each process
    assert s["bank_type"] == s["logits_type"] == "Parameter"  # plain, whole tensors
    assert s["compositions"] == [1] * STEPS  # one composition per forward, for all adapted modules
    assert s["frozen_names"] and s["frozen_unchanged"]  # the base never changed
    assert s["sample"] == s["sample_one"] and s["sample"]  # the adapter header's base weight sample, gathered


def test_block_classes_found_generically():
    from torch import nn

    from vblora.train import sharding

    model = tiny_llama()
    assert [c.__name__ for c in sharding.block_classes(model)] == ["LlamaDecoderLayer"]
    model._no_split_modules = None  # no transformers hint: the repeated members of the largest ModuleList
    assert [c.__name__ for c in sharding.block_classes(model)] == ["LlamaDecoderLayer"]
    with pytest.raises(SetupError, match="no repeated block"):
        sharding.block_classes(nn.Sequential(nn.Linear(2, 2)))


def test_fsdp_settings_refused_in_one_line(tmp_path):
    from vblora.train.config import build_config

    files = {"train_file": str(tmp_path / "t.csv"), "model": "x"}
    with pytest.raises(SetupError, match="--method full"):
        build_config(None, {**files, "fsdp": True, "method": "full"})
    with pytest.raises(SetupError, match="--quantize 8bit"):
        build_config(None, {**files, "fsdp": True, "quantize": "8bit"})
    assert build_config(None, {**files, "fsdp": True, "quantize": "4bit"}).quantize == "4bit"


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_vblora_train_fsdp_matches_one_process(tiny_llama, tmp_path, quantize):
    """`torchrun --nproc-per-node 2 -m vblora train --fsdp` (the Trainer, gloo) on the tiny LLaMA ends where one
    process with the same global batch ends: validation loss per epoch, test metrics, the saved bank. With
    `--quantize 4bit` (QLoRA, float32 compute on the CPU) both runs train on the NF4 base; under --fsdp it is stored
    in float32 and sharded, in one process in uint8: the same values."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from vblora.train.config import build_config
    from vblora.train.pipeline import train

    files = {}
    for split, n, shift in (("train", 32, 0), ("validation", 8, 1), ("test", 8, 2)):
        words = ["good", "bad", "very good", "dull"]
        rows = [
            {
                "instruction": "what sentiment",
                "input": f"the film was {words[k % 4]}",
                "output": ["positive", "negative"][k % 2],
            }
            for k in range(shift, shift + n)
        ]
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))
        files[f"{split}_file"] = str(tmp_path / f"{split}.json")
    settings = {
        "model": tiny_llama,
        **files,
        "dataset": None,
        "task": "causal-lm",
        "device": "cpu",
        "epochs": 2,
        "eval_batch_size": 8,
        "max_length": 64,
        "vector_length": 32,
        "num_vectors": 16,
        "lr_bank": 1e-2,
        "lr_logits": 5e-2,
        "logging_steps": 1000,
        "max_new_tokens": 2,
        "num_samples": 2,
        "generate_eval": 4,
        "overwrite": True,
    }
    if quantize:
        pytest.importorskip("bitsandbytes")
        settings.update(quantize=quantize, compute_dtype="float32")
    one = train(build_config(None, {**settings, "batch_size": 8, "output": str(tmp_path / "one")}), log=lambda *a: None)
    args = []
    for k, v in {**settings, "batch_size": 4, "output": str(tmp_path / "two")}.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, "none" if v is None else str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "vblora",
            "train",
            "--fsdp",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(Path(tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["config"]["fsdp"] is True and two["config"]["quantize"] == quantize
    losses = [e["validation"]["loss"] for e in one["per_epoch"]]
    assert [e["validation"]["loss"] for e in two["per_epoch"]] == pytest.approx(losses, abs=1e-5)
    assert abs(losses[1] - losses[0]) > 1e-3  # the weights moved: the match is not trivial
    for split in ("validation", "test"):
        assert two["metrics"][split] == pytest.approx(one["metrics"][split], abs=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def _load_4bit(path: str, storage: torch.dtype):
    """The tiny LLaMA checkpoint in 4-bit NF4 (bitsandbytes' CPU backend), VB-LoRA on all linear modules."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import vblora

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=["lm_head"],
    )
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    return vblora.add_vblora(
        model, vblora.VBLoRAConfig(target_modules="all-linear", num_vectors=H, vector_length=B, rank=RANK, topk=K)
    )


def _worker_4bit(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist

    from vblora import get_bank
    from vblora.train import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, one = _load_4bit(path, torch.float32), _load_4bit(path, torch.float32)
        sharding.shard_model(model, sharding.device_mesh("cpu"))
        ids = torch.randint(0, 96, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
        part = ids.chunk(world)[rank]
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        loss_one = one(input_ids=ids, labels=ids).loss
        loss_one.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        bank, bank_one = get_bank(model), get_bank(one)
        weight = model.model.layers[0].self_attn.q_proj.base.weight
        if rank == 0:
            torch.save(
                {
                    "loss": mean.item(),
                    "loss_one": loss_one.item(),
                    "bank": bank.bank.grad,
                    "bank_one": bank_one.bank.grad,
                    "logits": bank.logits.grad,
                    "logits_one": bank_one.logits.grad,
                    "weight": type(weight).__name__,
                    "local": weight.to_local().shape[0],
                    "rows": weight.shape[0],
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def test_4bit_base_with_float_storage_shards_and_matches(tmp_path):
    """bitsandbytes NF4 with `bnb_4bit_quant_storage=float32` (FSDP shards float tensors only): sharded, and one
    step's gradients equal one process's. The default uint8 storage is refused in one line, before any collective."""
    pytest.importorskip("bitsandbytes")
    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    from vblora.train import sharding

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(SetupError, match="bnb_4bit_quant_storage"):
        sharding.shard_model(_load_4bit(str(tmp_path / "llama"), torch.uint8))
    with torch.no_grad():  # lazy imports loaded before the fork
        _load_4bit(str(tmp_path / "llama"), torch.float32)(input_ids=torch.zeros(1, 2, dtype=torch.long))
    out = str(tmp_path / "seen.pt")
    mp.start_processes(
        _worker_4bit, args=(2, _free_port(), str(tmp_path / "llama"), out), nprocs=2, start_method="fork"
    )
    s = torch.load(out, weights_only=False)
    assert s["weight"] == "DTensor" and s["local"] * 2 == s["rows"]  # the packed 4-bit weight is sharded
    assert s["loss"] == pytest.approx(s["loss_one"], abs=1e-6)
    for what in ("bank", "logits"):
        size = float(s[what + "_one"].abs().max())
        assert size > 1e-6
        torch.testing.assert_close(s[what], s[what + "_one"], rtol=1e-5, atol=1e-5 * size)
