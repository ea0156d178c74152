"""Fixtures for the training tests: a tiny prepared corpus."""

import pathlib

import jax
import pytest

from train_helpers import CACHE_DIR

# Every test here compiles a train step; several compile the same one (a run and its resume, the
# three processes of the kill/resume test). JAX's persistent cache turns the repeats into loads.
# Only compilations over a second are cached, so other areas' small test programs are unaffected.
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
  """A prepared synthetic corpus: vocab 512, ~2000 stories (a few seconds to make)."""
  from tinystories_jax.data import preparation  # pylint: disable=import-outside-toplevel
  out = tmp_path_factory.mktemp("data") / "synthetic"
  preparation.prepare(preparation.PrepareOptions(inputs="synthetic", output_dir=str(out),
                                                 vocab_size=512, synthetic_stories=2000))
  return out
