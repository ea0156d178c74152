"""When and how `parallel.distributed` joins a job, and its one-line errors (no JAX start-up)."""

import importlib.util
import socket

import numpy as np
import pytest

from tinystories_jax.parallel import distributed, mesh
from tinystories_jax.parallel.distributed import DistributedError, DistributedOptions
from tinystories_jax.training import config as config_lib

from .conftest import REPO, free_port


def test_one_process_is_a_no_op():
  assert distributed.plan(DistributedOptions(), env={}).source is None
  assert distributed.initialize(DistributedOptions(), env={}) is False
  # One SLURM task, or one TPU host, is still a single-process job.
  assert distributed.plan(DistributedOptions(), env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                                     "SLURM_STEP_NODELIST": "n1"}).source is None
  assert distributed.plan(DistributedOptions(), env={"TPU_WORKER_HOSTNAMES": "a"}).source is None


def test_explicit_flags():
  launch = distributed.plan(DistributedOptions("10.0.0.2:8476", 4, 3, local_device_ids=(1,),
                                               init_timeout_s=30, heartbeat_timeout_s=7), env={})
  assert launch.source == "flags"
  assert launch.kwargs == dict(coordinator_address="10.0.0.2:8476", num_processes=4,
                               process_id=3, local_device_ids=[1],
                               cluster_detection_method="deactivate",
                               initialization_timeout=30, heartbeat_timeout_seconds=7)
  # The address may come from JAX's own variable.
  launch = distributed.plan(DistributedOptions(None, 2, 0),
                            env={"JAX_COORDINATOR_ADDRESS": "head:1234"})
  assert launch.kwargs["coordinator_address"] == "head:1234"


@pytest.mark.parametrize("opts, words", [
    (DistributedOptions(num_processes=2), "--coordinator_address and --process_id missing"),
    (DistributedOptions("h:1", 2, 2), "--process_id=2 is outside [0, --num_processes=2)"),
    (DistributedOptions("h:1", 0, 0), "outside [0, --num_processes=0)"),
    (DistributedOptions("h", 2, 0), "is not host:port"),
    (DistributedOptions("h:99999", 2, 0), "is not host:port"),
    (DistributedOptions(heartbeat_timeout_s=0), "must be positive"),
])
def test_bad_flags_name_the_fix(opts, words):
  with pytest.raises(DistributedError, match=r"\.$") as e:
    distributed.plan(opts, env={})
  assert words in str(e.value)
  assert "\n" not in str(e.value)


def test_cluster_environments():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
           "SLURM_STEP_NODELIST": "gpu[1-2]"}
  launch = distributed.plan(DistributedOptions(), env=slurm)
  assert launch.source == "slurm" and launch.kwargs["cluster_detection_method"] == "slurm"
  ompi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000"}
  assert distributed.plan(DistributedOptions(), env=ompi).source == "ompi"
  with pytest.raises(DistributedError, match="pass --coordinator_address=HEAD:PORT"):
    distributed.plan(DistributedOptions(), env={"OMPI_COMM_WORLD_SIZE": "2"})
  assert distributed.plan(DistributedOptions(),
                          env={"TPU_WORKER_HOSTNAMES": "w0,w1"}).source == "tpu"
  # A TPU VM pod learns its workers from the metadata server: only asked when forced.
  assert distributed.plan(DistributedOptions(force=True), env={}).source == "auto-detect"
  # Explicit flags win over the environment.
  assert distributed.plan(DistributedOptions("h:1", 2, 1), env=slurm).source == "flags"


def test_slurm_gpus_per_task():
  base = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
          "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_STEP_NUM_NODES": "2"}
  # One task per GPU seeing every GPU of its node: JAX picks GPU number SLURM_LOCALID itself.
  per_gpu = dict(base, SLURM_STEP_NUM_TASKS="16", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert "local_device_ids" not in distributed.plan(DistributedOptions(), env=per_gpu).kwargs
  # --gpus-per-task=1: the task's only GPU is its device 0.
  bound = dict(base, SLURM_STEP_NUM_TASKS="16", CUDA_VISIBLE_DEVICES="5")
  assert distributed.plan(DistributedOptions(), env=bound).kwargs["local_device_ids"] == [0]
  # One task per node drives all of the node's GPUs.
  per_node = dict(base, SLURM_STEP_NUM_TASKS="2", SLURM_GPUS_ON_NODE="4")
  assert distributed.plan(DistributedOptions(),
                          env=per_node).kwargs["local_device_ids"] == [0, 1, 2, 3]
  # An explicit --local_device_ids wins.
  assert distributed.plan(DistributedOptions(local_device_ids=(2,)),
                          env=per_node).kwargs["local_device_ids"] == [2]


def test_slurm_allocation_without_srun():
  env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}
  with pytest.raises(DistributedError, match="start the training command with srun"):
    distributed.plan(DistributedOptions(), env=env)


def test_unreachable_coordinator_is_an_error_not_a_hang():
  port = free_port()  # nobody listens here
  opts = DistributedOptions(f"127.0.0.1:{port}", 2, 1, init_timeout_s=1)
  with pytest.raises(DistributedError, match=f"No coordinator answered at 127.0.0.1:{port} "
                     "within 1 s") as e:
    distributed.initialize(opts, env={})
  assert "start process 0" in str(e.value)


def test_taken_coordinator_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(DistributedError, match=f"cannot host the coordinator on port {port}"):
      distributed.initialize(DistributedOptions(f"127.0.0.1:{port}", 2, 0), env={})


class _FakeDevice:
  """Just what the mesh layout reads from a device."""
  platform = device_kind = "cpu"

  def __init__(self, i, slice_index):
    self.id, self.slice_index, self.process_index = i, slice_index, slice_index

  def __repr__(self):
    return f"d{self.id}@s{self.slice_index}"


def _slices(grid):
  return np.vectorize(lambda d: d.slice_index)(grid)


def test_hybrid_grid_puts_only_the_data_axis_across_slices():
  devices = [_FakeDevice(i, i // 4) for i in range(8)]  # two slices of four
  grid = mesh.hybrid_device_grid((4, 1, 2), devices)
  assert grid.shape == (4, 1, 2)
  s = _slices(grid)
  # Moving along fsdp or tensor never leaves a slice; the data axis does.
  assert (s == s[:, :1, :1]).all()
  assert sorted(set(s[:, 0, 0])) == [0, 1]


def test_hybrid_grid_falls_back_to_fsdp_then_refuses():
  devices = [_FakeDevice(i, i // 4) for i in range(8)]
  s = _slices(mesh.hybrid_device_grid((1, 8, 1), devices))
  assert sorted(set(s.ravel())) == [0, 1] and (s[0, :4, 0] == s[0, 0, 0]).all()
  with pytest.raises(mesh.MeshError, match="make mesh.data .* a multiple of 2"):
    mesh.hybrid_device_grid((1, 1, 8), devices)


def test_batch_that_does_not_divide_over_the_processes():
  spec = importlib.util.spec_from_file_location("mh_quickstart",
                                                REPO / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run = config_lib.run_config(module.get_config())  # train.batch_size=32
  config_lib.check_batch_fits(run, 4, 4)
  with pytest.raises(config_lib.ConfigError, match="does not divide over 3 hosts; use a multiple "
                     "of 3"):
    config_lib.check_batch_fits(run, 1, 3)
