"""Fuzz: mutated adapter files (truncated, flipped bytes, edited JSON, wrong dtypes/shapes, missing or extra keys)
either load correctly (same outputs) or raise AdapterFormatError; nothing else, never a crash."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save

from vblora.errors import AdapterFormatError
from vblora.storage import load_adapter, save_adapter

try:  # tests/ may or may not be a package
    from _storage_models import adapted, output
except ImportError:
    from tests._storage_models import adapted, output

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (file bytes, tensors, metadata, reference output of the intact file)}, base model; small adapters
    (fp32, and int8 with packed indices)."""
    model, base = adapted("llama", num_vectors=12, vector_length=32, rank=1)
    out = {}
    for name, kw in {"fp32": {}, "int8": dict(precision="int8", pack_indices=True)}.items():
        path = save_adapter(model, tmp_path_factory.mktemp(name), **kw)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        out[name] = (path.read_bytes(), load_file(path), meta, output(load_adapter(copy.deepcopy(base), path)))
    return out, base


def check(data: bytes, base, ref, tmp_path) -> None:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(data)
    try:
        model = load_adapter(copy.deepcopy(base), path)
    except AdapterFormatError:
        return
    assert (output(model) - ref).abs().max() <= 1e-6 * ref.abs().max()  # a load that succeeds is a correct load


def header_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from header_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from header_paths(v, (*prefix, i))


def set_path(obj, path, value):
    if not path:
        return value
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70000),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.lists(st.integers(-1, 40), max_size=4),
    st.just({}),
)
variant = st.sampled_from(["fp32", "int8"])


@settings(max_examples=120, **SETTINGS)
@given(variant, st.data())
def test_flipped_bytes_and_truncation(saved, tmp_path, name, data):
    files, base = saved
    raw, ref = bytearray(files[name][0]), files[name][3]
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
            raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    check(bytes(raw), base, ref, tmp_path)


@settings(max_examples=120, **SETTINGS)
@given(variant, st.data())
def test_edited_json_header(saved, tmp_path, name, data):
    files, base = saved
    _, tensors, meta, ref = files[name]
    header = json.loads(meta["vblora"])
    if data.draw(st.booleans(), label="structured"):
        path = data.draw(st.sampled_from(list(header_paths(header))), label="path")
        text = json.dumps(set_path(header, path, data.draw(values, label="value")))
    else:  # raw text edit: may break the JSON itself
        text = meta["vblora"]
        pos = data.draw(st.integers(0, len(text) - 1), label="pos")
        text = text[:pos] + data.draw(st.text(min_size=0, max_size=3), label="insert") + text[pos + 1 :]
    check(save(tensors, metadata={"format": "pt", "vblora": text}), base, ref, tmp_path)


@settings(max_examples=80, **SETTINGS)
@given(variant, st.data())
def test_wrong_tensors(saved, tmp_path, name, data):
    files, base = saved
    _, tensors, meta, ref = files[name]
    tensors = dict(tensors)
    key = data.draw(st.sampled_from(sorted(tensors)), label="key")
    action = data.draw(st.sampled_from(["dtype", "drop", "extra", "reshape", "values"]), label="action")
    if action == "dtype":
        tensors[key] = tensors[key].to(data.draw(st.sampled_from(DTYPES), label="dtype"))
    elif action == "drop":
        del tensors[key]
    elif action == "extra":
        tensors["unexpected"] = torch.zeros(3)
    elif action == "reshape":
        tensors[key] = tensors[key].reshape(-1)[: max(0, tensors[key].numel() - 1)]
    else:  # same dtype and shape, other values (hash mismatch, or range/NaN checks first)
        fill = data.draw(st.sampled_from([0, 1, 255, float("nan"), -1.0]), label="fill")
        t = tensors[key].clone()
        with contextlib.suppress(RuntimeError):
            t.view(-1)[0] = fill  # an integer tensor refuses NaN: keep its values
        tensors[key] = t
    check(save(tensors, metadata=meta), base, ref, tmp_path)
