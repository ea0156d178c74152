"""Test-wide setup: CPU only, eight fake devices for mesh tests, shared fixtures."""

import os
import pathlib

# Must happen before jax initialises its backend (any test module may import jax).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

try:  # The grading / datagen tests run without jax being importable at all.
  import jax  # noqa: E402

  jax.config.update("jax_num_cpu_devices", 8)
except ImportError:  # pragma: no cover
  jax = None

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "tinystories"


def _has_gpu() -> bool:
  if jax is None:
    return False
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  del config
  if _has_gpu():
    return
  skip_gpu = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real TinyStories samples in ../shared; tests using them skip where absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"needs the TinyStories samples at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture
def cuda_lowering():
  """Lets a test lower Pallas Triton kernels for CUDA on this CPU (`.lower(lowering_platforms=
  ("cuda",))`). From jax 0.11 the Triton backend reads the target GPU from the abstract mesh's
  device and stops with "No supported GPU devices found" where there is none; jax 0.10 fell back
  to compute capability 9.0 by itself. This sets a one-device abstract mesh of an H100 (also
  9.0): a mesh of size 1, which the kernels' wrappers treat as no mesh."""
  # Auto axes, jax 0.10's default (0.11 and later default to Explicit).
  mesh = jax.sharding.AbstractMesh(
      (1,), ("lowering",), axis_types=(jax.sharding.AxisType.Auto,),
      abstract_device=jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                                  platform="gpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    yield
