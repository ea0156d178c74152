"""Training: configs -> sharded state -> jitted steps -> loop with metrics and Orbax checkpoints.

  config.py      ConfigDict -> frozen dataclasses, validation, workdir config checks
  state.py       abstract model layout, shardings, directly-sharded initialisation
  optimizer.py   AdamW with a decay mask, schedules, clipping
  loss.py        plain, chunked and fused output-layer cross-entropy
  step.py        the pure train / eval steps and their single jit call site
  evaluate.py    validation loss and bits per byte
  checkpoint.py  Orbax save / restore with fallback
  metrics.py     console + metrics.jsonl + TensorBoard, MFU peak table, progress bar
  loop.py        `train(run, workdir)`, what `python -m tinystories_jax.train` calls
  benchmark.py   `measure_train_throughput` for benchmarks/
"""
