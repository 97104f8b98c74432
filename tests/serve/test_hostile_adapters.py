"""Hostile adapter files and names (issue 19, items 1, 4, 5, 7 and the path part of 8): a crafted header, a file
replaced under the store, a failed replacement, a symlink or path out of the adapter directory. Each is refused
alone with one clear message, echoes no byte of the file, and the base model and every other adapter keep
producing exactly what they produced before."""

from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
from torch import nn

import vblora
from tiny_models import tiny_llama, tokens
from vblora.serve import AdapterStore
from vblora.serve.mixed import MixedHead, MixedLayer
from vblora.storage.files import read_safetensors, write_safetensors
from vblora.storage.native import encode, read_adapter, write_adapter
from vblora.storage.snapshot import take_snapshot

QV = dict(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=32, vector_length=32)
PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@pytest.fixture
def base():
    torch.manual_seed(0)
    return tiny_llama()


def adapted(base: nn.Module, seed: int, **kw) -> nn.Module:
    model = vblora.add_vblora(copy.deepcopy(base), vblora.VBLoRAConfig(**{**QV, **kw, "seed": seed}))
    with torch.no_grad():
        vblora.get_bank(model).bank.normal_(0, 0.3)
    return model


def save(base, path, seed: int = 1, **kw):
    return vblora.save_adapter(adapted(base, seed, **kw), path)


def crafted(base: nn.Module, path, heads: dict[str, dict[str, torch.Tensor]]):
    """A file that passes every check of the format (digests included) whose `modules_to_save` names `heads`."""
    snap = take_snapshot(adapted(base, 7))
    snap.extras = heads
    return write_adapter(path, *encode(snap))


def edited(source, path, edit) -> None:
    """`source` with its "vblora" JSON header changed by `edit(header)`: its digests no longer match."""
    tensors, metadata, _ = read_safetensors(source)
    header = json.loads(metadata["vblora"])
    edit(header)
    write_safetensors(path, tensors, {**metadata, "vblora": json.dumps(header)})


def save_headed(base: nn.Module, path) -> None:
    """An adapter on q_proj / v_proj carrying a trained copy of lm_head (`modules_to_save`)."""
    model = adapted(base, 6, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.trained.weight.add_(0.5)
    vblora.save_adapter(model, path)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def served_outputs(store: AdapterStore, served: nn.Module, names: list) -> torch.Tensor:
    ids = tokens(len(names), 6)
    with store.rows([store.acquire(n) if n else None for n in names]):
        return logits(served, ids)


def module_types(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()}


def head_cases(base: nn.Module) -> dict[str, dict]:
    inner = {k: v.clone() for k, v in base.model.state_dict().items()}
    return {
        "model": {"model": inner},  # the whole decoder: holds the adapted q_proj / v_proj
        "root": {"": {k: v.clone() for k, v in base.state_dict().items()}},  # the model itself
        "container": {"model.layers": {k: v.clone() for k, v in base.model.layers.state_dict().items()}},
        "adapted": {"model.layers.0.self_attn.q_proj": {"weight": torch.zeros(64, 64)}},  # an adapted module
        "missing": {"nowhere": {"weight": torch.zeros(2, 2)}},
    }


# -- 1: crafted headers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["model", "root", "container", "adapted", "missing", "edited-model", "edited-root"])
def test_crafted_head_is_refused_and_changes_nothing(base, tmp_path, case):
    d = tmp_path / "adapters"
    save(base, d / "good.safetensors")
    if case.startswith("edited-"):  # the probe: a header edited by hand, no valid digests
        target = {"edited-model": "model", "edited-root": ""}[case]
        edited(d / "good.safetensors", d / "bad.safetensors", lambda h: h.update(modules_to_save={target: ["weight"]}))
    else:
        crafted(base, d / "bad.safetensors", head_cases(base)[case])
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)  # a bad file in the directory never stops the store from constructing
    assert store.names() == ["bad", "good"]
    ids = tokens(2, 6)
    want_base = logits(base, ids)
    want_good = logits(vblora.load_adapter(copy.deepcopy(base), d / "good.safetensors"), ids)
    before = served_outputs(store, served, ["good", None])
    types = module_types(served)
    with pytest.raises(vblora.AdapterFormatError, match="bad") as err:
        store.acquire("bad")
    assert "\n" not in str(err.value)
    assert "bad" in store.problems()
    assert module_types(served) == types  # nothing wrapped by the refused file, nothing left half-wrapped
    after = served_outputs(store, served, ["good", None])
    assert torch.equal(before, after)
    assert torch.allclose(after[0:1], want_good[0:1], atol=1e-5, rtol=0)
    assert torch.equal(logits(served, ids), want_base)  # outside rows(...): exactly the base model
    with pytest.raises(vblora.AdapterFormatError):  # asked again: the same refusal, still nothing changed
        store.acquire("bad")
    assert torch.equal(served_outputs(store, served, ["good", None]), before)


def test_root_head_in_the_directory_is_listed_as_a_problem(base, tmp_path):
    """A header naming the model itself ("") is refused from its header alone: listed in problems at once."""
    save(base, tmp_path / "good.safetensors")
    edited(
        tmp_path / "good.safetensors",
        tmp_path / "rooted.safetensors",
        lambda h: h.update(modules_to_save={"": ["weight"]}),
    )
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    assert "rooted" in store.problems() and "empty" in store.problems()["rooted"]
    store.acquire("good")


def test_only_verified_modules_of_adaptable_kinds_are_wrapped(base, tmp_path):
    """Registration wraps nothing; loading wraps exactly the adapter's modules (and real heads) after verifying."""
    save(base, tmp_path / "qv.safetensors")
    edited(
        tmp_path / "qv.safetensors",
        tmp_path / "norms.safetensors",  # claims to adapt norms and the decoder
        lambda h: h.update(
            modules=[["model.norm", *r[1:]] for r in h["modules"][:1]] + [["model", *r[1:]] for r in h["modules"][1:]]
        ),
    )
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    assert not any(isinstance(m, (MixedLayer, MixedHead)) for m in served.modules())
    with pytest.raises(vblora.AdapterFormatError):
        store.acquire("norms")
    assert not any(isinstance(m, (MixedLayer, MixedHead)) for m in served.modules())
    store.acquire("qv")
    wrapped = sorted(n for n, m in served.named_modules() if isinstance(m, MixedLayer))
    assert wrapped == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


def test_real_head_still_served(base, tmp_path):
    """The rules refuse non-heads only: an adapter with a trained lm_head serves it, per row."""
    save_headed(base, tmp_path / "headed.safetensors")
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    out = served_outputs(store, served, ["headed", None])
    ref = vblora.load_adapter(copy.deepcopy(base), tmp_path / "headed.safetensors")
    ids = tokens(2, 6)
    assert torch.allclose(out[0:1], logits(ref, ids[0:1]), atol=1e-5, rtol=0)
    assert torch.equal(out[1:2], logits(base, ids[1:2]))


def test_adapter_clashing_with_a_loaded_head_is_refused(base, tmp_path):
    """An adapter adapting a module that another adapter carries as a head cannot be applied there (its update would
    be silently lost inside the head): refused, the first adapter and the base unchanged."""
    save_headed(base, tmp_path / "headed.safetensors")
    save(base, tmp_path / "onhead.safetensors", 3, target_modules=["lm_head"])
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    before = served_outputs(store, served, ["headed", None])
    types = module_types(served)
    with pytest.raises(vblora.AdapterFormatError, match=r"onhead.*inside head lm_head"):
        store.acquire("onhead")
    assert module_types(served) == types
    assert torch.equal(served_outputs(store, served, ["headed", None]), before)


def test_scan_survives_any_single_file(base, tmp_path):
    save(base, tmp_path / "good.safetensors")
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    before = served_outputs(store, served, ["good", None])
    peft = tmp_path / "peft"
    vblora.export_peft(tmp_path / "good.safetensors", peft)
    conf = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**conf, "modules_to_save": 5}))
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    edited(
        tmp_path / "good.safetensors",
        tmp_path / "rooted.safetensors",
        lambda h: h.update(modules_to_save={"": ["weight"]}),
    )
    (tmp_path / "passwd.safetensors").write_bytes(PASSWD)
    added, removed = store.scan()
    assert added == ["deep", "passwd", "peft", "rooted"] and removed == []
    assert set(store.problems()) == {"deep", "passwd", "peft", "rooted"}
    for name in added:
        with pytest.raises(vblora.VBLoRAError):
            store.acquire(name)
    assert torch.equal(served_outputs(store, served, ["good", None]), before)


# -- 4: a file replaced under the store ------------------------------------------------------------------------------


def test_file_replaced_before_first_use_serves_the_new_file(base, tmp_path):
    save(base, tmp_path / "a.safetensors", 1)
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    # replaced before anyone used it, by an adapter of other modules and rank (no rescan)
    save(base, tmp_path / "a.safetensors", 2, target_modules=["o_proj", "up_proj"], rank=2)
    handle = store.acquire("a")
    assert handle.info["rank"] == 2 and handle.info["bytes_on_disk"] == (tmp_path / "a.safetensors").stat().st_size
    ids = tokens(1, 6)
    with store.rows([handle]):
        out = logits(served, ids)
    want = logits(vblora.load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors"), ids)
    assert torch.allclose(out, want, atol=1e-5, rtol=0)
    assert not torch.allclose(out, logits(base, ids), atol=1e-3)  # not the base model


def test_replaced_by_a_damaged_file_is_refused_then_a_fixed_file_loads(base, tmp_path, monkeypatch):
    import vblora.serve.store as store_module
    from vblora.serve.loaded import verified

    reads = []
    monkeypatch.setattr(store_module, "verified", lambda *a, **k: reads.append(1) or verified(*a, **k))
    save(base, tmp_path / "a.safetensors", 1)
    save(base, tmp_path / "b.safetensors", 2)
    edited(tmp_path / "b.safetensors", tmp_path / "b.safetensors", lambda h: h.update(modules_to_save={"x": ["w"]}))
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    (tmp_path / "a.safetensors").write_bytes(PASSWD)  # replaced before first use
    with pytest.raises(vblora.AdapterFormatError, match="not a safetensors file"):
        store.acquire("a")
    assert "a" in store.problems()
    reads.clear()
    for _ in range(3):  # a refused file is refused again without being read again, while it is unchanged
        with pytest.raises(vblora.AdapterFormatError, match="tensor keys differ"):
            store.acquire("b")
    assert len(reads) == 1 and "tensor keys differ" in store.problems()["b"]
    save(base, tmp_path / "a.safetensors", 3)  # fixed in place: the next use reads it, no rescan needed
    handle = store.acquire("a")
    assert "a" not in store.problems()
    ids = tokens(1, 6)
    with store.rows([handle]):
        out = logits(store.model, ids)
    assert torch.allclose(
        out, logits(vblora.load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors"), ids), atol=1e-5, rtol=0
    )


def test_same_size_same_mtime_replacement_is_noticed(base, tmp_path):
    """A replacement that keeps size and modification time (`cp -p` of a same-shaped adapter) is still seen."""
    path = tmp_path / "a.safetensors"
    save(base, path, 1)
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    st = path.stat()
    save(base, tmp_path / "other" / "a.safetensors", 2)
    assert (tmp_path / "other" / "a.safetensors").stat().st_size == st.st_size
    os.replace(tmp_path / "other" / "a.safetensors", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.scan() == (["a"], ["a"])


# -- 5: a failed replacement -----------------------------------------------------------------------------------------


def test_failed_replacement_keeps_the_working_adapter(base, tmp_path):
    files = tmp_path / "files"
    save(base, files / "good.safetensors", 1)
    save(base, files / "next.safetensors", 2)
    save(base, files / "flipped.safetensors", 4)
    data = bytearray((files / "flipped.safetensors").read_bytes())
    data[-10] ^= 0xFF  # a tensor byte: the header reads fine, the digest does not match
    (files / "flipped.safetensors").write_bytes(bytes(data))
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    save(other, files / "foreign.safetensors", 5)
    (files / "passwd.safetensors").write_bytes(PASSWD)
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    store.add("x", files / "good.safetensors")
    before = served_outputs(store, served, ["x", None])
    for bad, error in (
        ("flipped", vblora.AdapterFormatError),
        ("foreign", vblora.AdapterFormatError),
        ("passwd", vblora.AdapterFormatError),
        ("missing", FileNotFoundError),
    ):
        with pytest.raises(error):
            store.add("x", files / f"{bad}.safetensors")
        assert store.acquire("x").info["path"] == str(files / "good.safetensors"), bad
        assert torch.equal(served_outputs(store, served, ["x", None]), before), bad
    handle = store.add("x", files / "next.safetensors")  # a good replacement does replace
    assert handle.info["path"] == str(files / "next.safetensors")
    ids = tokens(2, 6)
    want = logits(vblora.load_adapter(copy.deepcopy(base), files / "next.safetensors"), ids[0:1])
    assert torch.allclose(served_outputs(store, served, ["x", None])[0:1], want, atol=1e-5, rtol=0)


# -- 7: messages, symlinks, paths ------------------------------------------------------------------------------------


def test_messages_do_not_echo_file_bytes(base, tmp_path):
    leaked = str(struct.unpack("<Q", PASSWD[:8])[0])  # 3475222254926655346: "root:x:0" read as a length
    (tmp_path / "passwd.safetensors").write_bytes(PASSWD)
    (tmp_path / "latin.safetensors").write_bytes(struct.pack("<Q", 6) + b'{"\xff\xfe":1}' + b"\0" * 8)
    store = AdapterStore(copy.deepcopy(base), tmp_path)
    problems = store.problems()
    assert "header length out of range" in problems["passwd"] and leaked not in problems["passwd"]
    assert "not UTF-8" in problems["latin"] and "0xff" not in problems["latin"].lower()
    for name in ("passwd", "latin"):
        with pytest.raises(vblora.AdapterFormatError) as err:
            store.acquire(name)
        assert leaked not in str(err.value) and "root:x" not in str(err.value) and "0xff" not in str(err.value)
    with pytest.raises(vblora.AdapterFormatError) as err:
        vblora.load_adapter(copy.deepcopy(base), tmp_path / "passwd.safetensors")
    assert leaked not in str(err.value)


def test_symlinks_out_of_the_directory_are_not_listed(base, tmp_path):
    outside, d = tmp_path / "outside", tmp_path / "adapters"
    save(base, outside / "secret.safetensors", 1)
    (outside / "passwd").write_bytes(PASSWD)
    vblora.export_peft(outside / "secret.safetensors", outside / "peft")
    save(base, d / "good.safetensors", 2)
    (d / "leak.safetensors").symlink_to(outside / "passwd")
    (d / "stolen.safetensors").symlink_to(outside / "secret.safetensors")
    (d / "stolendir").symlink_to(outside)  # would hold adapter.safetensors? no: a directory of other things
    (d / "nd").mkdir()
    (d / "nd" / "adapter.safetensors").symlink_to(outside / "secret.safetensors")
    (d / "pd").mkdir()
    (d / "pd" / "adapter_config.json").write_text((outside / "peft" / "adapter_config.json").read_text())
    (d / "pd" / "adapter_model.safetensors").symlink_to(outside / "peft" / "adapter_model.safetensors")
    (d / "peftlink").symlink_to(outside / "peft")
    (d / "loop.safetensors").symlink_to(d / "loop.safetensors")
    (d / "inner.safetensors").symlink_to(d / "good.safetensors")  # inside: fine
    store = AdapterStore(copy.deepcopy(base), d)
    assert store.names() == ["good", "inner"] and store.problems() == {}
    assert store.scan() == ([], [])
    from vblora.serve.sources import find

    for name in ("leak", "stolen", "nd", "pd", "peftlink", "loop", "../outside/secret", "inner/../good"):
        with pytest.raises(FileNotFoundError):
            find(d, name)
    assert find(d, "inner").name == "inner"


def test_add_is_confined_to_the_directory(base, tmp_path):
    from vblora.serve.sources import PathNotAllowedError

    outside, d = tmp_path / "outside", tmp_path / "adapters"
    save(base, outside / "x.safetensors", 1)
    (outside / "passwd").write_bytes(PASSWD)
    save(base, d / "good.safetensors", 2)
    (d / "link.safetensors").symlink_to(outside / "x.safetensors")
    store = AdapterStore(copy.deepcopy(base), d)
    messages = []
    for path in (
        outside / "x.safetensors",
        outside / "passwd",
        outside / "none",
        d / ".." / "outside" / "x.safetensors",
        d / "link.safetensors",
        "/etc/passwd",
    ):
        with pytest.raises(PathNotAllowedError) as err:
            store.add("x", path)
        assert isinstance(err.value, vblora.VBLoRAError) and isinstance(err.value, PermissionError)
        messages.append(str(err.value).replace(str(path), "PATH"))
        assert "allow_outside_paths" in messages[-1]
    assert len(set(messages)) == 1  # the same answer whether the path exists or not, whatever it holds
    assert "x" not in store.names()
    store.add("inside", d / "good.safetensors")  # inside the directory: fine
    alias = tmp_path / "alias"  # the directory named through a symlink: its files are inside it, by either name
    alias.symlink_to(d)
    via = AdapterStore(copy.deepcopy(base), alias)
    assert via.names() == ["good"]
    via.add("real", d / "good.safetensors")
    with pytest.raises(PathNotAllowedError):
        via.add("x", alias / "link.safetensors")
    assert AdapterStore(copy.deepcopy(base), d, allow_outside_paths=True).add("x", outside / "x.safetensors")
    assert AdapterStore(copy.deepcopy(base)).add("x", outside / "x.safetensors")  # no directory: any path
    closed = AdapterStore(copy.deepcopy(base), allow_outside_paths=False)  # a server with no adapter directory
    with pytest.raises(PathNotAllowedError, match="no adapter directory"):
        closed.add("x", outside / "x.safetensors")
    assert closed.names() == []


def test_find_and_verified_are_the_one_path(base, tmp_path):
    """What a resolver outside the store (e.g. vLLM's) calls: `find` a name in a directory, `verified` against a
    base: the same checks and messages as the store's loads."""
    from vblora.serve.loaded import verified
    from vblora.serve.sources import find

    save(base, tmp_path / "good.safetensors", 1)
    crafted(base, tmp_path / "bad.safetensors", head_cases(base)["model"])
    modules = dict(base.named_modules())
    snap, heads = verified(find(tmp_path, "good"), base, modules)
    want = read_adapter(tmp_path / "good.safetensors")[0]
    assert torch.equal(snap.indices, want.indices) and heads == {}
    with pytest.raises(vblora.AdapterFormatError, match=r"adapter 'bad'.*model holds or is an adapted module"):
        verified(find(tmp_path, "bad"), base, modules)
    with pytest.raises(FileNotFoundError):
        find(tmp_path, "nothing")
    shared = adapted(base, 2)  # a shared-bank adapter: its bank found through bank_index
    vblora.save_bank(shared, tmp_path / "shared-bank.safetensors")
    vblora.save_adapter(shared, tmp_path / "ref.safetensors", bank="reference")
    from vblora.serve.sources import bank_index

    banks = bank_index(tmp_path)
    assert list(banks.values()) == [tmp_path / "shared-bank.safetensors"]
    snap, _ = verified(find(tmp_path, "ref"), base, modules, banks)
    assert torch.equal(snap.bank, vblora.get_bank(shared).bank)
    with pytest.raises(vblora.AdapterFormatError, match="shared bank"):
        verified(find(tmp_path, "ref"), base, modules)
    with pytest.raises(FileNotFoundError):  # a bank file is no adapter
        find(tmp_path, "shared-bank")
