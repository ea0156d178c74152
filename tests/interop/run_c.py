"""A numpy port of llama2.c's run.c: reads its .bin checkpoint and tokenizer.bin and runs its
forward pass token by token (adjacent-pair rotary, kv_mul head sharing, RMSNorm eps 1e-5),
so tests can check an export without compiling C."""

import struct

import numpy as np


def read_checkpoint(path):
  raw = open(path, "rb").read()
  dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("iiiiiii", raw[:28])
  shared = vocab > 0
  vocab = abs(vocab)
  data = np.frombuffer(raw, dtype="<f4", offset=28)
  hs = dim // n_heads
  kv_dim = n_kv * hs
  shapes = [("tok", (vocab, dim)), ("rms_att", (n_layers, dim)),
            ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)),
            ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
            ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
            ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)),
            ("rms_final", (dim,)), ("freq_real", (seq_len, hs // 2)),
            ("freq_imag", (seq_len, hs // 2))]
  if not shared:
    shapes.append(("wcls", (vocab, dim)))
  w, off = {}, 0
  for name, shape in shapes:
    n = int(np.prod(shape))
    w[name] = data[off:off + n].reshape(shape)
    off += n
  assert off == data.size, "file size does not match the header"
  if shared:
    w["wcls"] = w["tok"]
  cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, vocab=vocab,
             seq_len=seq_len)
  return cfg, w


def read_tokenizer(path, vocab_size):
  raw = open(path, "rb").read()
  (max_len,) = struct.unpack("I", raw[:4])
  off, tokens, scores = 4, [], []
  for _ in range(vocab_size):
    score, n = struct.unpack("fI", raw[off:off + 8])
    tokens.append(raw[off + 8:off + 8 + n])
    scores.append(score)
    off += 8 + n
  assert off == len(raw)
  return max_len, tokens, scores


def _rmsnorm(x, w):
  ss = np.mean(x.astype(np.float64) ** 2) + 1e-5
  return (w * (x / np.sqrt(ss))).astype(np.float32)


def forward_all(cfg, w, tokens):
  """Logits [T, vocab] for one token sequence, computed as run.c does, one position at a time."""
  dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv"]
  hs = dim // n_heads
  kv_dim = n_kv * hs
  kv_mul = n_heads // n_kv
  L = cfg["n_layers"]
  kcache = np.zeros((L, len(tokens), kv_dim), np.float32)
  vcache = np.zeros((L, len(tokens), kv_dim), np.float32)
  out = []
  for pos, token in enumerate(tokens):
    x = w["tok"][token].copy()
    for l in range(L):
      xb = _rmsnorm(x, w["rms_att"][l])
      q = w["wq"][l] @ xb
      k = w["wk"][l] @ xb
      v = w["wv"][l] @ xb
      for i in range(0, dim, 2):
        head_dim = i % hs
        freq = 1.0 / 10000.0 ** (head_dim / hs)
        val = pos * freq
        fcr, fci = np.cos(val), np.sin(val)
        for vec in ((q, k) if i < kv_dim else (q,)):
          v0, v1 = vec[i], vec[i + 1]
          vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
      kcache[l, pos], vcache[l, pos] = k, v
      att_out = np.zeros(dim, np.float32)
      for h in range(n_heads):
        qh = q[h * hs:(h + 1) * hs]
        kh = kcache[l, :pos + 1, (h // kv_mul) * hs:(h // kv_mul + 1) * hs]
        vh = vcache[l, :pos + 1, (h // kv_mul) * hs:(h // kv_mul + 1) * hs]
        att = kh @ qh / np.sqrt(hs)
        att = np.exp(att - att.max())
        att /= att.sum()
        att_out[h * hs:(h + 1) * hs] = att @ vh
      x = x + w["wo"][l] @ att_out
      xb = _rmsnorm(x, w["rms_ffn"][l])
      h1, h3 = w["w1"][l] @ xb, w["w3"][l] @ xb
      h1 = h1 * (1.0 / (1.0 + np.exp(-h1))) * h3
      x = x + w["w2"][l] @ h1
    x = _rmsnorm(x, w["rms_final"])
    out.append(w["wcls"] @ x)
  return np.stack(out)
