"""What the vLLM plugin hands to vLLM, checked without vLLM: adapters found by name in an adapter directory,
verified against a base built on the meta device (its sampled weights read from the checkpoint), composed exactly
into a PEFT LoRA directory in a content-addressed cache bounded in bytes. The LoRA directory is loaded back with
HF PEFT's LoRA and must equal `vblora.load_adapter` on the same base."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import vblora
from tiny_models import tiny_llama, tokens
from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.serve.lora_dirs import LoRADirCache, cache_from_env, dir_bytes, parse_bytes

CFG = dict(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=32, vector_length=32)


def adapted(base, seed: int, **kw):
    model = vblora.add_vblora(copy.deepcopy(base), vblora.VBLoRAConfig(**{**CFG, **kw, "seed": seed}))
    with torch.no_grad():
        vblora.get_bank(model).bank.normal_(0, 0.3)
    return model


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")  # what the engine serves: a model directory
    d = tmp_path / "adapters"
    vblora.save_adapter(adapted(base, 1), d / "file.safetensors")
    vblora.export_peft(adapted(base, 2), d / "peft", save_only_topk_weights=True)
    shared = adapted(base, 3)
    vblora.save_adapter(shared, d / "ref.safetensors", bank="reference")
    vblora.save_bank(shared, d / "bank.safetensors")
    return base, str(tmp_path / "base"), d, LoRADirCache(d, tmp_path / "cache", 1 << 30)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["file", "peft", "ref"])
def test_lora_directory_equals_load_adapter(setup, name):
    peft = pytest.importorskip("peft")
    base, model_dir, d, cache = setup
    got = cache.resolve(name, model_dir)
    assert not got.cached and got.rank == 4
    ids = tokens(2, 7)
    as_lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(got.path)).eval()
    if name == "peft":
        ref = vblora.import_peft(copy.deepcopy(base), d / "peft")
    else:
        ref = vblora.load_adapter(
            copy.deepcopy(base), d / f"{name}.safetensors", bank_path=d / "bank.safetensors" if name == "ref" else None
        )
    assert torch.allclose(logits(as_lora, ids), logits(ref, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base, ids), logits(ref, ids), atol=1e-3)  # the adapter matters
    again = cache.resolve(name, model_dir)
    assert again.path == got.path and again.cached


def test_changed_adapter_gets_a_new_entry(setup):
    base, model_dir, d, cache = setup
    first = cache.resolve("file", model_dir).path
    vblora.save_adapter(adapted(base, 9), d / "file.safetensors")
    second = cache.resolve("file", model_dir).path
    assert second != first and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "extra file", "emptied"])
def test_an_entry_from_another_process_is_used_only_when_whole(setup, tmp_path, damage):
    """Entries are written without fsync (they are derived data, composed again in milliseconds): one left damaged
    by a power cut, or altered, is written again; a whole one is used as it is."""
    _, model_dir, d, cache = setup
    entry = cache.resolve("file", model_dir).path
    good = {p.name: p.read_bytes() for p in entry.iterdir()}
    weights = entry / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(good[weights.name][:-4])
    elif damage == "zeroed":
        weights.write_bytes(bytes(len(good[weights.name])))
    elif damage == "extra file":
        (entry / "adapter_model.bin").write_bytes(b"not ours")
    else:
        for p in entry.iterdir():
            p.unlink()
    restarted = LoRADirCache(d, tmp_path / "cache", 1 << 30)  # a new process on the same cache
    again = restarted.resolve("file", model_dir)
    assert again.path == entry and not again.cached
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == good
    whole = LoRADirCache(d, tmp_path / "cache", 1 << 30).resolve("file", model_dir)
    assert whole.cached and {p.name: p.read_bytes() for p in entry.iterdir()} == good


def test_unknown_and_escaping_names_are_not_found(setup, tmp_path):
    base, model_dir, d, cache = setup
    vblora.save_adapter(adapted(base, 5), tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    for name in ("nosuch", "../outside", "sub/file", ".hidden", "", "bank\0", "link", "bank"):
        assert cache.resolve(name, model_dir) is None, name  # a link out of the directory is not listed


def test_refusals_name_the_reason(setup, tmp_path):
    base, model_dir, d, cache = setup
    (d / "damaged.safetensors").write_bytes((d / "file.safetensors").read_bytes()[:-200])
    with pytest.raises(AdapterFormatError, match=r"corrupt|truncated"):
        cache.resolve("damaged", model_dir)
    other = copy.deepcopy(base)  # same shapes, other weights: the sampled base weights tell them apart
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterFormatError, match="weights differ"):
        cache.resolve("file", str(tmp_path / "other"))
    vblora.save_adapter(adapted(base, 6, target_modules=["q_proj"], modules_to_save=["lm_head"]), d / "head")
    with pytest.raises(AdapterFormatError, match="modules_to_save: lm_head"):
        cache.resolve("head", model_dir)
    vblora.save_adapter(
        adapted(tiny_llama(intermediate=96), 7, target_modules=["up_proj"]), d / "wrongshape.safetensors"
    )
    with pytest.raises(AdapterFormatError, match="does not fit"):
        cache.resolve("wrongshape", model_dir)
    assert not list((tmp_path / "cache").iterdir())  # nothing unverified was written


def test_a_remembered_base_check_still_refuses_other_weights(setup, tmp_path):
    """The base check is remembered per adapter description (targets, module table, sampled base weights): an
    adapter of the same layout trained on other base weights is still refused once one of this layout passed; the
    torch thread setting is restored after a resolve."""
    base, model_dir, d, cache = setup
    threads = torch.get_num_threads()
    cache.resolve("file", model_dir)
    assert torch.get_num_threads() == threads and len(cache.base(model_dir).fits) == 1
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    vblora.save_adapter(adapted(other, 1), d / "other.safetensors")  # same targets and shapes, other base
    with pytest.raises(AdapterFormatError, match="weights differ"):
        cache.resolve("other", model_dir)
    cache.resolve("file", model_dir)  # the pass is remembered: no second entry
    assert len(cache.base(model_dir).fits) == 1


def test_cache_bounded_in_bytes_keeps_what_it_handed_out(setup, tmp_path):
    _, model_dir, d, cache = setup
    entry = cache.resolve("file", model_dir).path
    size = dir_bytes(entry)
    later = LoRADirCache(d, tmp_path / "cache", int(size * 1.5))  # another process, a bound of one entry
    kept = later.resolve("peft", model_dir).path
    assert not entry.exists() and kept.exists()  # the earlier process's entry evicted, least recently used first
    later.resolve("ref", model_dir)
    assert kept.exists() and later.over_bound > 0  # handed out here: kept, and the excess reported


def test_settings_from_the_environment(tmp_path):
    with pytest.raises(VBLoRAError, match="VBLORA_ADAPTERS is not set"):
        cache_from_env({})
    with pytest.raises(VBLoRAError, match="does not exist"):
        cache_from_env({"VBLORA_ADAPTERS": str(tmp_path / "none")})
    c = cache_from_env(
        {"VBLORA_ADAPTERS": str(tmp_path), "VBLORA_LORA_CACHE": str(tmp_path / "c"), "VBLORA_LORA_CACHE_BYTES": "512M"}
    )
    assert c.max_bytes == 512 << 20 and c.cache == tmp_path / "c" and c.threads == 1
    assert cache_from_env({"VBLORA_ADAPTERS": str(tmp_path), "VBLORA_COMPOSE_THREADS": "4"}).threads == 4
    for bad in ("0", "-2", "many", ""):
        with pytest.raises(VBLoRAError, match="VBLORA_COMPOSE_THREADS"):
            cache_from_env({"VBLORA_ADAPTERS": str(tmp_path), "VBLORA_COMPOSE_THREADS": bad})
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("1000") == 1000 and parse_bytes("2GiB") == 2 << 30
    for bad in ("", "-1", "lots", "0"):
        with pytest.raises(VBLoRAError, match="VBLORA_LORA_CACHE_BYTES"):
            parse_bytes(bad)
