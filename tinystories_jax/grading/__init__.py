"""LLM-as-teacher grading of story completions (the TinyStories paper's evaluation).

Entry point: `python -m tinystories_jax.grade` (see docs/grading.md). Pure Python on the `openai`
client; never imports jax. `client`, `journal`, `batch` and `pricing` are shared with datagen.
"""
