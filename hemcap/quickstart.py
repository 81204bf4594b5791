"""``hemcap quickstart``: the whole toolkit, offline, on the built-in default.

Each run gets a fresh folder under ``runs/`` so earlier results are never clobbered. Stages:
1. prepare a dataset (synthetic by default, or WBCAtt from ``--data-dir``).
Training, evaluation and smear captioning join as they land (see README).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class QuickstartOptions:
    """What the quickstart runs on."""

    data: str = "synthetic"  # "synthetic" (offline default) or "wbcatt" (real data)
    data_dir: Path | None = None  # for --data wbcatt: folder with wbcatt/ and pbc/
    runs_dir: Path = Path("runs")  # each run writes runs/quickstart-<time>/
    seed: int = 0  # seeds the synthetic cells and the paraphrases

    def __post_init__(self):
        problems = []
        if self.data not in ("synthetic", "wbcatt"):
            problems.append(f"data must be 'synthetic' or 'wbcatt', not {self.data!r}")
        if self.data == "wbcatt" and not (self.data_dir and (Path(self.data_dir) / "wbcatt").is_dir()):
            problems.append(f"--data wbcatt needs --data-dir with wbcatt/ and pbc/ inside (got {self.data_dir})")
        if problems:
            raise ValueError("; ".join(problems))


def new_run_dir(runs_dir: Path) -> Path:
    """runs/quickstart-YYYYmmdd-HHMMSS, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):
        run_dir = runs_dir / f"quickstart-{stamp}{suffix}"
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            return run_dir
    raise FileExistsError(f"no free run folder under {runs_dir}")


def prepare_data(options: QuickstartOptions, run_dir: Path) -> Path:
    from hemcap import recipes

    out = run_dir / "data"
    if options.data == "wbcatt":
        return recipes.prepare_wbcatt(options.data_dir, out, seed=options.seed)
    return recipes.prepare_synthetic(out, n_train=600, n_val=100, n_test=200, size=128, seed=options.seed)


def run(options: QuickstartOptions) -> dict:
    run_dir = new_run_dir(Path(options.runs_dir))
    log.info("quickstart run folder: %s", run_dir)
    data_dir = prepare_data(options, run_dir)
    return {"run_dir": str(run_dir), "data": str(data_dir)}
