"""Shipped training recipes (YAML): `vblora train --recipe NAME`."""
