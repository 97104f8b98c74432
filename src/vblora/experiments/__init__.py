"""Experiments of the paper as loops of run configs over `vblora.train.pipeline.train`: method comparison (Table 1),
ablations (Tables 5-6), a shared bank across tasks, E2E NLG (Table 2). Nothing here trains by itself.

Nothing heavy is imported here: import the submodule you need, e.g. ``from vblora.experiments import e2e_metrics``.
"""
