"""The torchrun entry point on the 2 x 2 grid: `torchrun --nproc-per-node 4 -m mambadeploy.cli generate MODEL
--parallel tp=2,ep=2,dispatch=alltoall` (dense layers over two tensor-parallel pairs = two subgroups, experts over 2
expert groups with each expert's width split inside its group, tokens sent all-to-all) generates the same greedy
tokens as the single-process command, and only rank 0 prints. (Logit-level parity on 2 ranks: test_parallel_runs.py;
each grid rank's slices: test_parallel_slices.py. 4 processes on the CI's 2 cores: one run, 12 tokens.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from components import require

from mambadeploy.cli import main

ARGS = ["generate", "jamba-tiny", "--prompt-ids", "1,2,3", "--prompt-ids", "7,8", "--max-new-tokens", "12", "--json"]


def test_torchrun_generate_matches_single_process(capsys):
    torchrun = shutil.which("torchrun")
    require(torchrun is not None, "torchrun", "it comes with torch: is torch's bin directory on PATH?")
    assert main(ARGS + ["--threads", "1"]) == 0
    expected = json.loads(capsys.readouterr().out)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "4", "-m", "mambadeploy.cli", *ARGS,
                          "--parallel", "tp=2,ep=2,dispatch=alltoall", "--parallel-timeout", "60"],
                         capture_output=True, text=True, timeout=240, env=env, check=False)
    print(run.stderr[-2000:])
    assert run.returncode == 0
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "only rank 0 prints"
    got = json.loads(lines[0])
    runner = got["runner"]
    assert (runner["backend"], runner["world"], runner["tp"], runner["ep"]) == ("parallel", 4, 2, 2)
    assert [p["tokens"] for p in got["prompts"]] == [p["tokens"] for p in expected["prompts"]]
