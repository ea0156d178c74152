"""LLM story generation as the TinyStories paper made its dataset, and the Instruct variant.

Entry point: `python -m tinystories_jax.generate_data` (see docs/datagen.md). Built on the
grading package's client, journal and Batch API runner; never imports jax.
"""
