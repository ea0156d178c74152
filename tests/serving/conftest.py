"""Fixtures for the server tests: a tiny workdir and its story writer."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "sampling"))

import sampling_helpers  # noqa: E402

from tinystories_jax import sampling  # noqa: E402


@pytest.fixture(scope="session")
def serving_workdir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("serving-workdir")
  return sampling_helpers.write_tiny_workdir(root / "wd", sampling_helpers.tokenizer_file(root))


@pytest.fixture(scope="session")
def writer(serving_workdir):
  return sampling.StoryWriter(sampling.load(serving_workdir))
