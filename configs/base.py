"""Every configuration key, once, with its default and meaning. Variants override these.

Train a model described by this file alone (a llama2.c 260K-shaped model on a prepared data
directory; see configs/quickstart.py for the offline demo):

  python -m tinystories_jax.prepare --input=synthetic --output_dir=runs/quickstart-data \
      --vocab_size=1024
  python -m tinystories_jax.train --config=configs/base.py --workdir=runs/base \
      --config.data.dir=runs/quickstart-data
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.dir = "runs/quickstart-data"  # a `tinystories_jax.prepare` output directory
  c.data.packed = False                # pack whole stories with segment ids instead of windows
  c.data.worker_count = 0              # Grain worker processes (0: load in the main process)
  c.data.worker_buffer_size = 2        # batches each Grain worker prepares ahead

  c.model = ml_collections.ConfigDict()
  c.model.family = "llama"             # "llama" (llama2.c shapes) or "gpt_neo" (the paper's)
  c.model.name = "260k"                # a preset of that family (models/presets.py)
  c.model.attention = "auto"           # attention kernel: auto|reference|xla|cudnn|pallas|cpu
  c.model.dtype = "float32"            # compute dtype (float32|bfloat16); weights stay float32
  c.model.remat = "none"               # "block" recomputes each block in the backward pass
  c.model.scan_layers = False          # run the blocks as one lax.scan (same parameters)
  c.model.norm = "xla"                 # llama's residual add + RMSNorm: "xla" (jnp) or
  #                                      "pallas" (one kernel each way; GPUs)
  c.model.qkv = "xla"                  # llama's q/k/v into attention: "xla" (split, rotated,
  #                                      gradients stacked by XLA) or "pallas" (the attention
  #                                      kernels read and write the stacked projection; GPUs)
  c.model.mlp = "xla"                  # llama's SwiGLU backward through the activation: "xla"
  #                                      (a fusion) or "pallas" (one kernel; GPUs)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000                 # optimizer steps in the whole run (resume continues to it)
  c.train.batch_size = 32              # sequences per micro-batch, over all devices and hosts
  c.train.grad_accum_steps = 1         # micro-batches per optimizer step (effective batch
                                       # = batch_size * grad_accum_steps)
  c.train.seq_len = 256                # tokens per sequence
  c.train.seed = 0                     # parameter init and data order
  c.train.log_every = 50               # steps between metric lines (console, jsonl, TensorBoard)
  c.train.eval_every = 500             # steps between validation passes (0: only at the end)
  c.train.eval_batches = 0             # validation batches per pass (0: the whole valid split)
  c.train.checkpoint_every = 500       # steps between checkpoints (one is always saved at the end)
  c.train.keep_checkpoints = 3         # most recent checkpoints kept on disk
  c.train.async_checkpoints = True     # write checkpoints in the background while training
  c.train.loss = "fused"               # output loss: "fused", "chunked" or "plain" (loss.py)
  c.train.loss_chunk = 128             # positions per block of the chunked loss
  c.train.loss_vocab_multiple = 128    # fused loss: output rows padded to this multiple (1: none)
  c.train.loss_kernel = "auto"         # fused loss passes: auto (pallas on GPUs, else xla),
  #                                      "xla", "xla_online", "pallas" (GPUs) or
  #                                      "pallas_fwd_grad" (GPUs: the gradient made in the
  #                                      forward, docs/training.md)
  c.train.z_loss = 0.0                 # weight of the logsumexp^2 penalty (PaLM: 1e-4)
  c.train.on_nonfinite = "stop"        # NaN/Inf loss: "stop" the run, or "skip" the update
  c.train.peak_flops = 0.0             # per-device peak FLOP/s for MFU (0: look the device up)
  c.train.progress_bar = True          # show a progress bar when stderr is a terminal

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 5e-4                # peak learning rate
  c.optimizer.schedule = "constant"    # after warmup: "constant" | "cosine" | "linear"
  c.optimizer.warmup_steps = 0         # linear warmup from 0 to lr
  c.optimizer.final_lr_ratio = 0.0     # cosine/linear decay ends at lr * this
  c.optimizer.b1 = 0.9                 # AdamW beta1
  c.optimizer.b2 = 0.95                # AdamW beta2
  c.optimizer.eps = 1e-8               # AdamW epsilon
  c.optimizer.weight_decay = 0.1       # decoupled weight decay on matrices
  c.optimizer.clip_norm = 1.0          # global gradient-norm clip (0: off)
  c.optimizer.decay_embeddings = False       # also decay embedding / position tables
  c.optimizer.decay_norms_and_biases = False  # also decay norm scales and biases
  c.optimizer.flatten_below = 0        # update parameters with fewer elements than this as
  #                                      flat vectors: fewer, larger kernels (0: each alone;
  #                                      docs/training.md); they must not be split by the mesh

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                     # data-parallel axis size (-1: the remaining devices)
  c.mesh.fsdp = 1                      # parameter-sharded data-parallel axis size
  c.mesh.tensor = 1                    # tensor-parallel axis size (heads, MLP, vocab)
  c.mesh.cpu_devices = -1              # CPU devices: -1 one per core (dividing the batch), 0 one, n
  c.mesh.distributed = False           # call jax.distributed.initialize() (multi-host runs)
  return c
