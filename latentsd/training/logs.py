"""Per-step metrics on disk (one JSON line per optimizer step) and flat config dicts for trackers."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import TrainConfig, config_to_dict


class MetricsLog:
    """One JSON line per optimizer step (main process): survives crashes, easy to diff across runs.

    Appended in place, the one write that does not go through :mod:`latentsd.io`: a line is written whole or not at
    all, and after a resume :func:`read_metrics` takes the last line of each step."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(output_dir: str | Path) -> dict[int, dict]:
    """Metrics by step; after a resume, the last line written for a step wins."""
    lines = (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def flat_config(cfg: TrainConfig) -> dict:
    """``{'optim.learning_rate': 1e-4, ...}`` with scalar values, as trackers want."""
    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v if isinstance(v, (int, float, str, bool)) else str(v)
    return dict(walk(config_to_dict(cfg)))
