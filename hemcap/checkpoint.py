"""Training checkpoints: written atomically, pruned to the last N plus the best, found again on resume.

A checkpoint is a directory ``step-00000123/`` holding

- ``model/``: what ``Backend.save`` writes (full model or LoRA adapter, processor), so the best
  checkpoint is itself a usable model;
- ``optimizer.pt``, ``scheduler.pt``: their state dicts (tensors and numbers only, read with
  ``weights_only=True``);
- ``rng-<rank>.pt``: every random generator's state, one file per process;
- ``trainer_state.json``: step, best figure, evaluation history and elapsed time.

It is written into a hidden ``.step-...tmp`` dir and renamed into place when complete, so a run
killed mid-write leaves no half checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_SUBDIR = "model"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, backend, optimizer, scheduler, state: dict, accelerator) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; every process must call it."""
    root = Path(root)
    final = root / checkpoint_name(step)
    staging = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        backend.save(staging / MODEL_SUBDIR)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a same-step leftover from a run resumed before it
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


def load_training_state(path: str | Path, optimizer, scheduler, process_index: int = 0) -> dict:
    """Restore optimizer, scheduler and random generators from checkpoint ``path``; its trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no random state for process %d; dropout will differ from the original run",
                    path, process_index)
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def prune_checkpoints(root: str | Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the last ``keep_last`` checkpoints and the best one."""
    found = list_checkpoints(root)
    keep = set(found[-keep_last:])
    if best_step is not None:
        keep.add(Path(root) / checkpoint_name(best_step))
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate wants tuples all the way down."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
