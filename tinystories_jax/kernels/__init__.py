"""Pallas kernels, each beside a plain-jnp reference with the same signature.

`flash_attention` (GPU: Triton backend; TPU: Mosaic) is the one kernel here; see docs/kernels.md.
Submodules are imported on use, so importing this package does not load Pallas.
"""
