"""Interop: import Hugging Face GPT-Neo / Llama checkpoints, export to transformers and llama2.c.

Command line: `python -m tinystories_jax.interop import-hf | export-hf | export-llama2c`
(see `__main__.py` and docs/models.md). Library entry points:
`hf.import_hf`, `hf.export_hf`, `llama2c.export_llama2c`, and `workdir.write_workdir /
read_workdir / load_model` for the checkpoint layout they share with training.
"""
