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


# What srun and accelerate do with the script's command, reduced to the part that matters here: srun runs the
# task once per node with that node's SLURM_NODEID; accelerate records the arguments it got (NUL-separated,
# so nothing can blur where one ends) and the shutdown timeout its elastic agent would use.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done
"""
FAKE_ACCELERATE = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_OUT/argv.$SLURM_NODEID"
echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$FAKE_OUT/shutdown_timeout.$SLURM_NODEID"
"""
README_OVERRIDE = "data.train=pipe:aws s3 cp s3://b/s-{000000..004095}.tar -"


def run_slurm_script(tmp_path: Path, nodes: int, *args: str) -> dict[int, tuple[list[str], str]]:
    """Run launch/slurm.sbatch under bash with the fakes on PATH; {node: (accelerate's argv, shutdown timeout)}."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out), "SLURM_NNODES": str(nodes),
           "GPUS_PER_NODE": "8", "MASTER_ADDR": "node-0", "SLURM_JOB_ID": "7"}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/quickstart.yaml", *args],
                            capture_output=True, text=True, env=env, cwd=LAUNCH.parent, timeout=30)
    assert result.returncode == 0, result.stderr
    return {node: ((out / f"argv.{node}").read_text().split("\0")[:-1],
                   (out / f"shutdown_timeout.{node}").read_text().strip()) for node in range(nodes)}


@pytest.mark.fault(injected="overrides with spaces, quotes and braces (the README's `pipe:aws s3 cp ...{000000..004095}"
                            ".tar -` shard spec) given to launch/slurm.sbatch",
                   did="each reaches the trainer as one argument, exactly as typed, on every node",
                   lost="nothing (the script joined them into one string that a shell split and brace-expanded)")
def test_slurm_script_passes_every_override_as_one_argument(tmp_path):
    overrides = [README_OVERRIDE, "name=two words", "train.output_dir=/runs/it's here", "train.steps=10"]
    launched = run_slurm_script(tmp_path, 2, *overrides)
    for node, (argv, _) in launched.items():
        assert argv[:3] == ["launch", "--machine_rank", str(node)]
        assert argv[argv.index("--num_processes") + 1] == "16"
        assert argv[argv.index("-m"):] == ["-m", "ssl_hybrid", "pretrain", "-c", "recipes/quickstart.yaml", *overrides]


@pytest.mark.fault(injected="SLURM's SIGTERM before the time limit, forwarded by the launcher, which kills its "
                            "trainers 30 s later by default",
                   did="the script gives the launcher a shutdown wait (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) longer than "
                       "torchrun's 30 s that still ends well before SLURM's own kill, so the trainers checkpoint and the "
                       "job requeues",
                   lost="nothing")
def test_slurm_grace_time_fits_the_launcher_shutdown_wait(tmp_path):
    import re

    lead = int(re.search(r"^#SBATCH --signal=B:TERM@(\d+)$", (LAUNCH / "slurm.sbatch").read_text(), re.M).group(1))
    timeouts = {timeout for _, timeout in run_slurm_script(tmp_path, 2, "train.steps=10").values()}
    assert len(timeouts) == 1, timeouts
    wait = int(timeouts.pop())
    # torchrun's default 30 s is too short for a step plus a large checkpoint; the rest of the lead time is for
    # stopping the step and `scontrol requeue` before SLURM kills the job at its limit.
    assert 30 < wait <= lead - 20, (wait, lead)


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
