"""The training code leans on transformers' public API (issue 20): at most three overrides of `Trainer` methods whose
names start with `_`, each with its signature pinned against the installed transformers (an upgrade that changes one
fails here instead of misbehaving), and no write to a private attribute of the Trainer or the model anywhere.

Read with `ast` like tests/test_architecture.py; the checker is shown to catch planted violations.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vblora"
FILES = sorted([*(SRC / "train").glob("*.py"), SRC / "integrations.py"])
MAX_PRIVATE_OVERRIDES = 3
# the private Trainer methods still overridden, with the parameters (after self) the override relies on
PINNED = {"_get_train_sampler": ["train_dataset"]}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def base_names(cls: ast.ClassDef) -> list[str]:
    return [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in cls.bases]


def trainer_classes(trees: list[ast.AST]) -> set[str]:
    """Names of the classes that are Trainers: a base whose name ends in `Trainer`, or a base that is one; and
    mixins: every other base of a Trainer class (`class T(CheckpointHooks, Trainer)` makes CheckpointHooks one)."""
    classes = [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    names: set[str] = set()
    while True:
        more = set(names)
        for cls in classes:
            bases = base_names(cls)
            if cls.name.endswith("Trainer") or any(b.endswith("Trainer") or b in names for b in bases):
                more |= {cls.name, *bases}
        if more == names:
            return names
        names = more


def is_trainer(cls: ast.ClassDef, trainers: set[str]) -> bool:
    return cls.name in trainers or any(b.endswith("Trainer") or b in trainers for b in base_names(cls))


def private_overrides(tree: ast.AST, trainers: set[str] = frozenset()) -> list[tuple[str, int]]:
    """`_`-methods defined in Trainer classes (`trainer_classes`)."""
    trainers = trainers or trainer_classes([tree])
    found = []
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        if is_trainer(cls, trainers):
            found += [
                (f.name, f.lineno)
                for f in cls.body
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(f.name)
            ]
    return found


def own_state(tree: ast.AST, trainers: set[str]) -> set[int]:
    """Ids of the nodes inside classes that are no Trainer: there `self._name = ...` is the object's own state."""
    inside = set()
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        if not is_trainer(cls, trainers):
            inside |= {id(n) for n in ast.walk(cls)}
    return inside


def private_writes(tree: ast.AST, trainers: set[str] = frozenset()) -> list[tuple[str, int]]:
    """Assignments / deletions of `x._name` and `setattr(x, "_name", ...)` / `delattr`: on any object (a Trainer's,
    a model's, an accelerator's), `self` of a Trainer subclass included; `self._name` of a class of our own that is
    no Trainer is its own state and allowed."""
    found, own = [], own_state(tree, trainers or trainer_classes([tree]))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and private(sub.attr) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                    mine = id(node) in own and isinstance(sub.value, ast.Name) and sub.value.id == "self"
                    if not mine:
                        found.append((sub.attr, node.lineno))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            found.append((node.args[1].value, node.lineno))
    return found


def scan(files=FILES) -> tuple[dict, list[str]]:
    trees = {f: ast.parse(f.read_text()) for f in files}
    trainers = trainer_classes(list(trees.values()))
    overrides, writes = {}, []
    for f, tree in trees.items():
        for name, line in private_overrides(tree, trainers):
            overrides.setdefault(name, []).append(f"{f.name}:{line}")
        writes += [f"{f.name}:{line}: {name}" for name, line in private_writes(tree, trainers)]
    return overrides, writes


def test_at_most_three_private_trainer_overrides_and_each_is_pinned():
    overrides, _ = scan()
    assert len(overrides) <= MAX_PRIVATE_OVERRIDES, overrides
    assert set(overrides) <= set(PINNED), f"pin the signature of each private override in PINNED: {overrides}"


def test_no_private_attribute_written():
    _, writes = scan()
    assert not writes, "writes to private attributes:\n" + "\n".join(writes)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_private_signatures_match_installed_transformers(name):
    from transformers import Trainer

    params = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert params[0] == "self" and params[1:] == PINNED[name], (name, params)


def test_public_hooks_we_rely_on_have_the_expected_signatures():
    """The public methods AdapterTrainer overrides and the switches the pipeline uses, as the installed
    transformers defines them (a rename would silently bypass the override)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    expect = {
        "save_model": ["output_dir", "_internal_call"],
        "training_step": ["model", "inputs", "num_items_in_batch"],
        "train": ["resume_from_checkpoint", "trial", "ignore_keys_for_eval"],
        "log": ["logs", "start_time"],
    }
    for name, params in expect.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters)[1 : 1 + len(params)] == params, name
    assert isinstance(inspect.getattr_static(TrainingArguments, "place_model_on_device"), property)
    assert {"on_save", "on_pre_optimizer_step", "on_train_begin", "on_epoch_end"} <= set(vars(TrainerCallback))


PLANTED = """
class MyTrainer(vblora.AdapterTrainer):
    def _save(self, output_dir=None, state_dict=None):
        pass

    def on_step(self):
        self._tr_loss += 1
        model._hf_peft_config_loaded = True
        setattr(self.model, "_keys_to_ignore_on_save", [])

class Hooks:  # a mixin: a Trainer's base below
    def _load_rng_state(self, checkpoint):
        self._total_loss_scalar = 0.0

class PipelineTrainer(Hooks, transformers.Trainer):
    pass

class Recorder:
    def _helper(self, trainer):
        self._cache = {}
        trainer._globalstep_last_logged = 0
"""


def test_the_checker_catches_planted_violations():
    tree = ast.parse(PLANTED)
    # the mixin's override counts; Recorder._helper is no Trainer override
    assert sorted(private_overrides(tree)) == [("_load_rng_state", 12), ("_save", 3)]
    assert sorted(name for name, _ in private_writes(tree)) == [  # Recorder's own self._cache is allowed
        "_globalstep_last_logged",
        "_hf_peft_config_loaded",
        "_keys_to_ignore_on_save",
        "_total_loss_scalar",
        "_tr_loss",
    ]


def test_the_checker_fails_on_the_code_before_issue_20():
    """The pipeline as it was (ten private overrides, four private Trainer attributes and the model's
    `_hf_peft_config_loaded` written), kept as text in git history: both checks fail on it."""
    import subprocess

    root = SRC.parents[1]
    old = {}
    for name in ("pipeline.py", "checkpoints.py"):
        try:
            old[name] = subprocess.run(
                ["git", "show", f"766611f:src/vblora/train/{name}"],
                cwd=root,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("git history not available")
    trees = [ast.parse(t) for t in old.values()]
    trainers = trainer_classes(trees)
    overrides = {n for tree in trees for n, _ in private_overrides(tree, trainers)}
    writes = {n for tree in trees for n, _ in private_writes(tree, trainers)}
    assert len(overrides) == 10 and len(overrides) > MAX_PRIVATE_OVERRIDES
    assert {
        "_tr_loss",
        "_total_loss_scalar",
        "_globalstep_last_logged",
        "_initial_global_step",
        "_hf_peft_config_loaded",
    } <= writes
