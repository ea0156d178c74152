"""Pallas kernels, each beside a plain-jnp reference with the same signature.

`flash_attention` (GPU: Triton backend; TPU: Mosaic), `cross_entropy` (the fused loss's passes
over its logits; GPU: Triton backend) and `rms_norm` (llama's residual add + RMSNorm; GPU:
Triton backend); see docs/kernels.md.
Submodules are imported on use, so importing this package does not load Pallas.
"""
