"""The adapter store: registration from a directory (native files and directories, PEFT VB-LoRA directories, shared
bank files), lazy verified loading, one bank per content hash, the byte-bounded cache of compositions, adapters
added and removed while running, damaged files failing alone."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import vblora
from tiny_models import tiny_llama, tokens
from vblora.serve import AdapterHandle, AdapterStore, UnknownAdapterError

CFG = dict(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=32, vector_length=32)


def adapted(base: nn.Module, seed: int, **kw) -> nn.Module:
    model = vblora.add_vblora(copy.deepcopy(base), vblora.VBLoRAConfig(**{**CFG, **kw, "seed": seed}))
    with torch.no_grad():
        vblora.get_bank(model).bank.normal_(0, 0.3)
    return model


@pytest.fixture
def base():
    torch.manual_seed(0)
    return tiny_llama()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def alone(base: nn.Module, path, **kw) -> nn.Module:
    return vblora.load_adapter(copy.deepcopy(base), path, **kw)


def check_rows(store, served, base, refs: dict, names: list) -> None:
    """Each row served in one mixed batch equals its reference model alone."""
    ids = tokens(len(names), 6)
    with store.rows([store.acquire(n) if isinstance(n, str) else n for n in names]):
        out = logits(served, ids)
    for i, n in enumerate(names):
        key = n.name if isinstance(n, AdapterHandle) else n
        ref = logits(refs[key] if key else base, ids[i : i + 1])
        assert torch.allclose(out[i : i + 1], ref, atol=1e-5, rtol=0), (i, key)


def test_directory_kinds_and_info(base, tmp_path):
    d = tmp_path / "adapters"
    vblora.save_adapter(adapted(base, 1), d / "file.safetensors")  # native file
    vblora.save_adapter(adapted(base, 2), d / "dir")  # native directory
    vblora.export_peft(adapted(base, 3), d / "peft", save_only_topk_weights=True)  # PEFT VB-LoRA directory
    (d / "notes").mkdir()  # not an adapter: ignored
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)
    assert store.names() == ["dir", "file", "peft"]
    assert store.stats()["loaded"] == 0  # registration reads headers only
    info = store.acquire("file").info
    assert info["bytes_on_disk"] == (d / "file.safetensors").stat().st_size
    assert info["task_type"] == "CAUSAL_LM" and info["rank"] == 4 and info["format"] == "native"
    assert len(info["bank_sha256"]) == 64
    assert store.acquire("peft").info["format"] == "peft"
    refs = {
        "file": alone(base, d / "file.safetensors"),
        "dir": alone(base, d / "dir"),
        "peft": vblora.import_peft(copy.deepcopy(base), d / "peft"),
    }
    check_rows(store, served, base, refs, ["peft", "file", None, "dir"])


@pytest.mark.parametrize("topk_only", [True, False])
def test_peft_directory_equals_its_native_twin(base, tmp_path, topk_only):
    model = adapted(base, 5)
    vblora.save_adapter(model, tmp_path / "native.safetensors")
    vblora.export_peft(tmp_path / "native.safetensors", tmp_path / "twin", save_only_topk_weights=topk_only)
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    ids = tokens(2, 6)
    outs = []
    for name in ("native", "twin"):
        with store.rows([store.acquire(name)] * 2):
            outs.append(logits(served, ids))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=0)
    assert torch.allclose(outs[0], logits(alone(base, tmp_path / "native.safetensors"), ids), atol=1e-5, rtol=0)


def test_shared_bank_held_once(base, tmp_path):
    """Adapters referencing one bank file (as `--freeze-bank` runs save them) and adapters embedding the same bank
    bytes all use one bank tensor."""
    first = adapted(base, 1)
    bank = vblora.get_bank(first).bank.detach().clone()
    models = []
    for seed in (1, 2, 3, 4):
        m = adapted(base, seed)
        with torch.no_grad():
            vblora.get_bank(m).bank.copy_(bank)
            vblora.get_bank(m).logits.normal_(0, 1)  # distinct selections
        models.append(m)
    vblora.save_bank(first, tmp_path / "bank.safetensors")
    for i, m in enumerate(models[:3]):
        vblora.save_adapter(m, tmp_path / f"ref{i}.safetensors", bank="reference")
    vblora.save_adapter(models[3], tmp_path / "embedded.safetensors")
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path, allow_outside_paths=True)  # adds a run directory beside it, below
    assert store.names() == ["embedded", "ref0", "ref1", "ref2"]  # the bank file is not an adapter
    handles = [store.acquire(n) for n in store.names()]
    assert len({id(h.adapter.bank) for h in handles}) == 1
    assert len({id(h.adapter.layout) for h in handles}) == 1  # one module table held for all of them
    stats = store.stats()
    assert stats["distinct_banks"] == 1 and stats["bank_bytes"] == bank.numel() * 4
    ref_file = tmp_path / "ref0.safetensors"
    assert handles[1].info["bytes_on_disk"] == ref_file.stat().st_size
    assert handles[1].adapter.resident_bytes < bank.numel() * 4  # per adapter: indices and weights only
    refs = {
        f"ref{i}": alone(base, tmp_path / f"ref{i}.safetensors", bank_path=tmp_path / "bank.safetensors")
        for i in range(3)
    }
    refs["embedded"] = alone(base, tmp_path / "embedded.safetensors")
    check_rows(store, served, base, refs, ["ref0", "embedded", "ref2", None, "ref1"])
    # a `vblora train --freeze-bank` run directory: run/adapter/adapter.safetensors, the bank at run/bank.safetensors
    run = tmp_path.parent / f"{tmp_path.name}-run"
    vblora.save_adapter(models[0], run / "adapter", bank="reference")
    vblora.save_bank(first, run)
    store.add("run", run / "adapter")
    assert store.acquire("run").adapter.bank is handles[0].adapter.bank
    refs["run"] = refs["ref0"]
    check_rows(store, served, base, refs, ["run", "ref1"])


def test_reference_without_bank_is_a_clear_error(base, tmp_path):
    vblora.save_adapter(adapted(base, 1), tmp_path / "lonely.safetensors", bank="reference")
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    with pytest.raises(vblora.AdapterFormatError, match=r"lonely.*shared bank.*save_bank"):
        store.acquire("lonely")


def test_cache_bounded_in_bytes_and_recomposition_equal(base, tmp_path):
    for i in range(4):
        vblora.save_adapter(adapted(base, i), tmp_path / f"a{i}.safetensors")
    served = copy.deepcopy(base)
    probe = AdapterStore(copy.deepcopy(base), tmp_path)
    probe.rows([probe.acquire("a0")]).__enter__()  # composes one adapter to learn its size
    one = probe.stats()["cache_bytes"]
    assert one > 0
    store = AdapterStore(served, tmp_path, cache_bytes=int(2.5 * one))
    ids = tokens(1, 6)
    first = {}
    for round_ in range(2):
        for i in range(4):
            with store.rows([store.acquire(f"a{i}")]):
                out = logits(served, ids)
            s = store.stats()
            assert s["cache_bytes"] <= s["cache_cap_bytes"] and s["cache_entries"] <= 2
            if round_ == 0:
                first[i] = out
            else:  # recomposed after eviction: same outputs
                assert torch.equal(out, first[i])
    s = store.stats()
    assert s["evictions"] >= 6 and s["misses"] == 8 and s["hits"] == 0
    with store.rows([store.acquire("a3")]):  # most recently used: a hit
        pass
    assert store.stats()["hits"] == 1
    with pytest.raises(ValueError):
        AdapterStore(copy.deepcopy(base), cache_bytes=-1)


def test_add_remove_while_running(base, tmp_path):
    d = tmp_path / "dir"
    vblora.save_adapter(adapted(base, 1), d / "one.safetensors")
    vblora.save_adapter(adapted(base, 2), tmp_path / "two.safetensors")
    vblora.save_adapter(adapted(base, 3, target_modules=["o_proj", "up_proj"], rank=2), tmp_path / "three.safetensors")
    served = copy.deepcopy(base)
    store = AdapterStore(served, d, allow_outside_paths=True)  # adds files outside d
    refs = {
        "one": alone(base, d / "one.safetensors"),
        "two": alone(base, tmp_path / "two.safetensors"),
        "three": alone(base, tmp_path / "three.safetensors"),
    }
    one = store.acquire("one")
    store.add("two", tmp_path / "two.safetensors")
    store.add("three", tmp_path / "three.safetensors")  # other targets: wrapped when added (after verifying)
    assert store.names() == ["one", "three", "two"]
    check_rows(store, served, base, refs, ["three", "one", "two", None])
    store.remove("one")
    with pytest.raises(UnknownAdapterError, match="'one'") as err:
        store.acquire("one")
    assert isinstance(err.value, KeyError) and isinstance(err.value, vblora.VBLoRAError)
    with pytest.raises(UnknownAdapterError):
        store.remove("one")
    check_rows(store, served, base, refs, [one, "two"])  # the handle acquired before remove still works
    assert one.adapter not in store.cache  # nor is it cached any more

    # from other threads while this one runs forwards: add / acquire / remove, no error, rows stay right
    errors = []

    def churn():
        try:
            for i in range(20):
                store.add(f"tmp{i}", tmp_path / "two.safetensors")
                store.acquire(f"tmp{i}")
                store.remove(f"tmp{i}")
        except Exception as e:  # reported below
            errors.append(e)

    worker = threading.Thread(target=churn)
    worker.start()
    for _ in range(5):
        check_rows(store, served, base, refs, ["two", "three", None])
    worker.join()
    assert not errors and store.names() == ["three", "two"]


def test_scan_reports_added_and_removed(base, tmp_path):
    vblora.save_adapter(adapted(base, 1), tmp_path / "a.safetensors")
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    vblora.save_adapter(adapted(base, 2), tmp_path / "b.safetensors")
    (tmp_path / "a.safetensors").unlink()
    assert store.scan() == (["b"], ["a"])
    assert store.scan() == ([], [])
    vblora.save_adapter(adapted(base, 3), tmp_path / "b.safetensors")  # replaced file: re-registered
    assert store.scan() == (["b"], ["b"])


def test_damaged_file_fails_alone(base, tmp_path):
    vblora.save_adapter(adapted(base, 1), tmp_path / "good.safetensors")
    vblora.save_adapter(adapted(base, 2), tmp_path / "flipped.safetensors")
    data = bytearray((tmp_path / "flipped.safetensors").read_bytes())
    data[-10] ^= 0xFF  # a tensor byte (an index or a weight)
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    assert store.names() == ["flipped", "garbage", "good"]
    assert "garbage" in store.problems()
    with pytest.raises(vblora.AdapterFormatError, match=r"flipped\.safetensors: (index|.*sha256|mixing)"):
        store.acquire("flipped")
    with pytest.raises(vblora.AdapterFormatError, match=r"garbage.*corrupt"):
        store.acquire("garbage")
    check_rows(store, served, base, {"good": alone(base, tmp_path / "good.safetensors")}, ["good", None])
    with pytest.raises(vblora.AdapterFormatError, match="corrupt"):
        store.add("again", tmp_path / "garbage.safetensors")
    with pytest.raises(FileNotFoundError):
        store.add("nothing", tmp_path / "missing")


def test_adapter_of_another_base_is_refused(base, tmp_path):
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    vblora.save_adapter(adapted(other, 1), tmp_path / "foreign.safetensors")
    vblora.save_adapter(adapted(base, 2), tmp_path / "mine.safetensors")
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    with pytest.raises(vblora.AdapterFormatError, match=r"foreign.*weights differ"):
        store.acquire("foreign")
    store.acquire("mine")
    with pytest.raises(vblora.TargetError):
        AdapterStore(adapted(base, 3))


def test_unknown_names_and_bad_entries(base, tmp_path):
    vblora.save_adapter(adapted(base, 1), tmp_path / "a.safetensors")
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    with pytest.raises(UnknownAdapterError, match=r"'zzz'.*registered: a"):
        store.acquire("zzz")
    with pytest.raises(UnknownAdapterError), store.rows(["zzz"]):
        pass
    with pytest.raises(vblora.VBLoRAError, match="AdapterHandles"), store.rows([42]):
        pass
    with store.rows(["a", None]):  # names are accepted too
        logits(served, tokens(2, 4))
