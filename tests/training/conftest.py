"""Fixtures for the training tests: a tiny prepared corpus."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
  """A prepared synthetic corpus: vocab 512, ~2000 stories (a few seconds to make)."""
  from tinystories_jax.data import preparation  # pylint: disable=import-outside-toplevel
  out = tmp_path_factory.mktemp("data") / "synthetic"
  preparation.prepare(preparation.PrepareOptions(inputs="synthetic", output_dir=str(out),
                                                 vocab_size=512, synthetic_stories=2000))
  return out
