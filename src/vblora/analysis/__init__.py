"""Analyses of the paper (E2E generation, selection studies, ablations).

Nothing heavy is imported here: import the submodule you need, e.g. ``from vblora.analysis import e2e_metrics``.
"""
