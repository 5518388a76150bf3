"""Run the real training entry point in a fresh process and read its own speed and memory figures."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def measure_training(
    recipe: dict, steps: int, warmup_steps: int = 3, launcher: list[str] | None = None, env: dict | None = None
) -> dict:
    """Train `warmup_steps + steps` steps in a new process; report the median seconds per optimizer step after the
    warm-up (timed by the training loop itself), the peak memory it logged (process RSS on CPU, torch's peak
    allocation on GPU), the wall time including imports, and the last loss."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = json.loads(json.dumps(recipe))
        recipe.setdefault("train", {}).update(
            output_dir=str(Path(tmp) / "run"),
            max_train_steps=warmup_steps + steps,
            log_every=1,
            report_to="jsonl",
            progress_bar=False,
            sample_every=0,
            num_samples=0,  # no sample grid: the benchmark times training
        )
        recipe.setdefault("checkpoint", {})["checkpointing_steps"] = 0
        recipe.setdefault("diffusion", {})["num_inference_steps"] = 1
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        command = (launcher or [sys.executable]) + ["-m", "finetune", str(path)]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"training failed:\n{result.stderr[-3000:]}")
        logs = [json.loads(line) for line in (Path(tmp) / "run" / "train_log.jsonl").read_text().splitlines()]
        logs = [record for record in logs if "steps_per_s" in record]
        steady = logs[warmup_steps:]
        return {
            "s_per_step": statistics.median(1 / record["steps_per_s"] for record in steady),
            "peak_memory_mb": max(record["peak_memory_mb"] for record in logs),
            "wall_s": wall,
            "final_loss": logs[-1]["loss"],
        }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
