"""Training steps/s and samples/s of the digits recipe with 1 and 2 processes (same per-process batch), launched the
way users launch: `accelerate launch`. On a CPU box the two processes are gloo processes sharing the cores; on a GPU
machine pass --gpu to put one process on each GPU.

    .venv/bin/python benchmarks/bench_multiprocess.py              # CPU: 1 vs 2 gloo processes
    .venv/bin/python benchmarks/bench_multiprocess.py --gpu --processes 1 2 4 8
"""

from __future__ import annotations

import argparse
import sys

import yaml

from benchmarks.common import REPO, measure_training, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="batch per process")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    recipe = yaml.safe_load((REPO / "finetune" / "recipes" / "digits_unconditional.yaml").read_text())
    recipe["train"]["train_batch_size"] = args.batch
    rows = []
    for processes in args.processes:
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--num_processes",
            str(processes),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if processes > 1:
            launcher.append("--multi_gpu")
        env = {} if args.gpu else {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, 2 // processes))}
        result = measure_training(recipe, steps=args.steps, warmup_steps=3, launcher=launcher, env=env)
        global_batch = args.batch * processes
        rows.append(
            {
                "processes": processes,
                "batch_per_process": args.batch,
                "global_batch": global_batch,
                "s_per_step": result["s_per_step"],
                "steps_per_s": 1 / result["s_per_step"],
                "samples_per_s": global_batch / result["s_per_step"],
                "wall_s": result["wall_s"],
            }
        )
        print(rows[-1], flush=True)
    print()
    print_table(
        rows,
        ["processes", "batch_per_process", "global_batch", "s_per_step", "steps_per_s", "samples_per_s", "wall_s"],
    )


if __name__ == "__main__":
    main()
