"""Fixtures for the sampling tests: tiny models and one tiny workdir per session."""

import pathlib

import pytest

import sampling_helpers


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("sampling-workdir")
  return sampling_helpers.write_tiny_workdir(root / "wd", sampling_helpers.tokenizer_file(root))
