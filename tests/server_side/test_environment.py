"""Where training runs: devices checked before any work, torchrun worlds
of real processes (gloo), reproducibility per device, and the CUDA path on
machines that have a GPU."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgetailor.server_side.environment import resolve_device, resolve_precision
from edgetailor.toolkit.errors import ConfigError

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(ConfigError, match="--device cuda: this torch .* CPU-only build|no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cuda:-1", "gpu0"])
def test_a_bad_device_is_refused(spec):
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(spec)


def test_precision_follows_the_device():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


def test_the_cli_refuses_cuda_before_any_work(tmp_path):
    if CUDA:
        pytest.skip("this machine has a GPU")
    run = subprocess.run([sys.executable, "-m", "edgetailor", "server", "pretrain", "--out", str(tmp_path / "ge"),
                          "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--device cuda" in run.stderr and "--device cpu" in run.stderr
    assert not (tmp_path / "ge").exists() and not (tmp_path / "ge.training").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, nproc=2, timeout=600):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m", "edgetailor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_two_processes_train_one_model_and_rank_0_writes(tmp_path):
    run = _torchrun("server", "pretrain", "--out", str(tmp_path / "ge"), "--epochs", "3", "--device", "cpu")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("trained in") == 1 and "cpu x2" in run.stdout      # rank 0 alone reports
    meta = json.loads((tmp_path / "ge" / "model.json").read_text())
    assert meta["training"]["processes"] == 2 and meta["training"]["images"] > 0
    assert meta["generic_accuracy"] > 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ge"]                  # no stray outputs or state


def _disagree(rank: int, world: int, port: int, out: str, what: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from edgetailor.server_side.environment import session, setup
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.toolkit.data import load_generic_digits

    data = load_generic_digits()
    recipe = load_recipe("fast")
    if rank == 1 and what == "data":        # this machine's copy of the data differs
        data = data.subset(np.arange(len(data) - 1))
    if rank == 1 and what == "run":         # this machine was started with another --epochs
        recipe.pretrain.epochs += 1
    with session(setup("cpu")) as env:
        try:
            pretrain(out, recipe, data, env=env)
        except ConfigError as exc:
            with open(f"{out}.rank{rank}", "w") as f:
                f.write(exc.message)


@pytest.mark.parametrize("what, named", [("data", "the generic data"), ("run", "the run (recipe, model, options)")])
def test_a_world_with_mismatched_data_or_run_stops_before_training(tmp_path, what, named):
    out = str(tmp_path / "ge")
    torch.multiprocessing.spawn(_disagree, args=(2, _free_port(), out, what), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"ge.rank{rank}").read_text()
        assert f"disagree on {named}" in message and "rank(s) 1 differ" in message
    assert not (tmp_path / "ge").exists()


def test_same_seed_same_model_on_this_device(tmp_path):
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.toolkit.config import load_recipe

    recipe = load_recipe("fast")
    recipe.pretrain.epochs = 2
    pretrain(tmp_path / "a", recipe)
    pretrain(tmp_path / "b", recipe)
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs wherever torch.cuda.is_available())")
def test_a_gpu_trained_checkpoint_exports_on_the_cpu(tmp_path):
    from edgetailor.server_side.checkpoint import GECheckpoint
    from edgetailor.server_side.environment import setup
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.server_side.samples import as_store
    from edgetailor.server_side.training import GenericData, test_accuracy
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.toolkit.data import split_generic

    recipe = load_recipe("fast")
    recipe.pretrain.epochs = 3
    env = setup("cuda")
    ckpt = pretrain(tmp_path / "ge", recipe, env=env)
    assert ckpt.meta.training["device"].startswith("cuda") and ckpt.meta.training["precision"] in ("bf16", "fp16")
    again = pretrain(tmp_path / "ge2", recipe, env=env)
    assert (tmp_path / "ge" / "model.pt").read_bytes() == (tmp_path / "ge2" / "model.pt").read_bytes()
    loaded = GECheckpoint.load(tmp_path / "ge")                     # on the CPU
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())
    split = split_generic(as_store(None), seed=recipe.pretrain.seed)
    on_cpu = test_accuracy(loaded.model, GenericData(split.train, split.test, loaded.meta.input, recipe.pretrain))
    assert on_cpu == pytest.approx(ckpt.meta.generic_accuracy, abs=0.01)
    assert again.meta.generic_accuracy == ckpt.meta.generic_accuracy
    from edgetailor.export.bundle import export_bundle

    bundle = export_bundle(tmp_path / "ge", tmp_path / "bundle", formats=["onnx"])   # export runs on the CPU
    assert (bundle / "manifest.json").exists()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux and at least 2 cores")
def test_each_cpu_process_of_a_machine_gets_its_own_cores():
    code = ("import os, json; from edgetailor.server_side.environment import pin_to_own_cores; "
            "mine = pin_to_own_cores(int(os.environ['LOCAL_RANK'])); "
            "print(json.dumps([mine, sorted(os.sched_getaffinity(0))]))")
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // 2
    for rank in (0, 1):
        env = {**os.environ, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        env.pop("EDGETAILOR_NO_PINNING", None)
        mine, now = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                              check=True).stdout)
        assert mine == now == cores[rank * share:(rank + 1) * share]
    env = {**os.environ, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "EDGETAILOR_NO_PINNING": "1"}
    mine, now = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          check=True).stdout)
    assert mine == [] and now == cores
