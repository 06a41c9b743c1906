"""launch/: every Accelerate config parses with Accelerate's own loader, the process arithmetic holds,
and the SLURM script computes ranks and process counts correctly (dry run)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

LAUNCH = Path(__file__).resolve().parent.parent / "launch"

# config file -> (machines, processes per machine)
EXPECTED = {
    "1gpu.yaml": (1, 1),
    "8gpu.yaml": (1, 8),
    "multinode_2x8.yaml": (2, 8),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_process_arithmetic_holds(name):
    config = load_config_from_file(str(LAUNCH / name))
    machines, per_machine = EXPECTED[name]
    assert config.num_machines == machines
    assert config.num_processes == machines * per_machine
    assert 0 <= config.machine_rank < config.num_machines
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


def slurm_dry_run(nodes: int, gpus: int, *args: str) -> list[str]:
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": str(nodes), "GPUS_PER_NODE": str(gpus),
           "MASTER_ADDR": "node-0"}
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/quickstart.yaml", *args],
                            capture_output=True, text=True, env=env, cwd=LAUNCH.parent, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("nodes, gpus", [(2, 8), (4, 8), (1, 4)])
def test_slurm_total_processes_is_nodes_times_gpus(nodes, gpus):
    summary, command = slurm_dry_run(nodes, gpus, "train.steps=10")
    assert f"num_processes={nodes * gpus}" in summary
    assert f"--num_machines {nodes} --num_processes {nodes * gpus}" in command
    # each node's task expands its own rank at run time
    assert "--machine_rank $SLURM_NODEID" in command
    assert "--main_process_ip node-0" in command
    assert command.endswith("pretrain -c recipes/quickstart.yaml train.steps=10")


def test_slurm_requeues_on_sigterm():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "trap requeue TERM" in text and "scontrol requeue" in text


def test_slurm_outside_allocation_fails_clearly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/quickstart.yaml"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode != 0 and "SLURM_NNODES" in result.stderr


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch"])
def test_shell_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_cpu_pretraining_through_launch_torchrun(tmp_path, free_port):
    """launch/torchrun.sh 2 RECIPE: two gloo processes train; both write their rank state, one exports.
    (On CPU, `accelerate launch` starts a single process unless MPI is set up, so torchrun is the CPU path.)"""
    import json
    import shutil

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    overrides = ["name=two", f"train.output_dir={tmp_path}", "model.name=hybrid_nano", "data.image_size=32",
                 "data.local_image_size=16", "data.num_workers=0", "train.steps=2", "train.batch_size=8",
                 "train.checkpoint_every=0", "train.knn_every=0", "data.val="]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port)}
    result = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "2", "recipes/quickstart.yaml", *overrides],
                            capture_output=True, text=True, env=env, cwd=LAUNCH.parent, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes on cpu" in result.stderr
    run = tmp_path / "two"
    checkpoint = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    assert (run / "model" / "model.safetensors").exists()
    assert json.loads((run / "model" / "config.json").read_text())["architecture"] == "hybrid_nano"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 2 and len(steps) == len(set(steps))  # one writer, no duplicate lines
