"""Pallas kernels, each beside a plain-jnp reference with the same signature.

`flash_attention` (GPU: Triton backend; TPU: Mosaic) and `cross_entropy` (the fused loss's
passes over its logits; GPU: Triton backend); see docs/kernels.md.
Submodules are imported on use, so importing this package does not load Pallas.
"""
