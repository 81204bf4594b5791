"""Training checkpoints: written atomically and durably, pruned to the last N plus the best, checked on resume.

A checkpoint is a directory ``step-00000123/`` holding

- ``model/``: what ``Backend.save`` writes (full model or LoRA adapter, processor), so the best
  checkpoint is itself a usable model;
- ``optimizer.pt``, ``scheduler.pt``: their state dicts (tensors and numbers only, read with
  ``weights_only=True``);
- ``scaler.pt``: fp16's loss scale (``accelerator.scaler``), when training in fp16: without it a
  resumed run starts again at 65536 and skips the overflowing steps the original run did not;
- ``rng-<rank>.pt``: every random generator's state, one file per process;
- ``training_weights.pt``: with ``train.ema``, the weights being trained (``model/`` holds their
  moving average, which is what validation scored);
- ``trainer_state.json``: step, best figure, evaluation history, elapsed time, and what the run was
  trained with: ``config`` (the whole run config), ``precision`` (as resolved) and ``total_steps``;
- ``manifest.json``, written last: every other file's size and SHA-256.

Writing: the files go into a hidden ``.step-...tmp`` dir, the manifest last; the whole tree is
fsynced, renamed into place, and its parent fsynced. A run killed at any moment leaves a complete
checkpoint or none that is listed, and a power cut cannot leave a renamed checkpoint with empty
files (data and rename reach the disk in any order unless fsynced). Pruning renames a checkpoint
aside (hidden) before deleting it, so a half-deleted one is never listed either.

Reading: ``list_checkpoints`` lists the complete ones (their manifest's files all there, at their
sizes). ``latest_checkpoint`` checks the newest against its manifest's hashes and, when a file is
damaged (missing, empty, truncated, altered), falls back to the one before with a warning naming
both. A checkpoint written before manifests is listed when its files are there and checked by
loading them. ``resume_changes`` names the settings a resumed run changes that change training.

Fault injection: ``HEMCAP_FAULT_AT=<point>`` (or ``<point>#<n>``: the n-th visit) makes the process
SIGKILL itself at that point (``hemcap.fileio.fault_point``; unset, a point costs one environment
lookup). The points, in the order a save reaches them: ``checkpoint:staged``, ``checkpoint:rng``,
``write:hemcap_model.json`` (inside the model save), ``checkpoint:model``, ``checkpoint:optimizer``,
``checkpoint:scheduler``, ``checkpoint:scaler``, ``checkpoint:state``, ``checkpoint:training_weights``
(with ``train.ema``), ``checkpoint:manifest``,
``checkpoint:synced``, ``checkpoint:renamed``; pruning, after every save: ``prune:moved`` and
``prune:removed`` for each checkpoint it deletes, then ``checkpoint:pruned``; every atomic file
write: ``write:<name>`` (``write:config.yaml``); every staged folder: ``stage:<name>``
(``stage:model``, the final model). ``tests/test_checkpoint_faults.py`` kills a run at 20 of
them and resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from hemcap.fileio import fault_point, fsync_dir, fsync_tree, replace_dir

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
SCALER_FILE = "scaler.pt"
TRAINING_WEIGHTS_FILE = "training_weights.pt"  # with train.ema: the weights being trained; model/ holds their average
MODEL_SUBDIR = "model"
LEGACY_FILES = (STATE_FILE, "optimizer.pt", "scheduler.pt", f"{MODEL_SUBDIR}/hemcap_model.json")
_NAME = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is damaged or incomplete; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------ finding


def _visible(root: str | Path) -> list[Path]:
    """Every ``step-N`` folder under ``root``, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in _visible(root) if is_complete(p)]


def is_complete(path: str | Path) -> bool:
    """Every file of the manifest there at its size (cheap: no hashing); before manifests, the files there."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return all((path / name).is_file() for name in LEGACY_FILES)
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False
    return all(_size(path / name) == size for name, (size, _) in manifest.items())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` whose files check out; a damaged newer one is skipped with a warning."""
    damaged = []
    for path in reversed(_visible(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            log.warning("damaged checkpoint: %s", error)
            damaged.append(path.name)
            continue
        if damaged:
            log.warning("resuming from %s instead of the damaged %s", path, ", ".join(damaged))
        return path
    if damaged:
        raise CheckpointError(f"every checkpoint in {root} is damaged ({', '.join(damaged)}); "
                              "pass --overwrite to start afresh")
    return None


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming the first missing or damaged file of checkpoint ``path``."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return _verify_by_loading(path)
    for name, (size, digest) in read_manifest(path).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if _size(file) != size:  # a power cut's empty or truncated file
            raise CheckpointError(f"{file} has {_size(file)} bytes, its manifest says {size}")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file} does not match its SHA-256 in {path / MANIFEST_FILE}")


def _verify_by_loading(path: Path) -> None:
    """A checkpoint from before manifests: its files must be there and load."""
    missing = [name for name in LEGACY_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    for file in [path / "optimizer.pt", path / "scheduler.pt", path / STATE_FILE, *path.glob("rng-*.pt"),
                 *path.rglob("*.safetensors")]:
        try:
            _load(file)
        except Exception as error:  # any failure to load is damage: pickle, zip, JSON, safetensors, end of file
            raise CheckpointError(f"{file} does not load: {error}") from error


def read_manifest(path: str | Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of checkpoint ``path``."""
    file = Path(path) / MANIFEST_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is unreadable: {error}") from error


def read_state(path: str | Path) -> dict:
    """The trainer state of checkpoint ``path``."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def _load(file: Path):
    from safetensors.torch import load_file

    if file.suffix == ".safetensors":
        return load_file(file)
    return read_state(file.parent) if file.name == STATE_FILE else torch.load(file, weights_only=True)


def _size(file: Path) -> int:
    return file.stat().st_size if file.is_file() else -1


def _sha256(file: Path) -> str:
    """In 1 MiB blocks (hashlib.file_digest is Python 3.11+; hemcap runs on 3.10)."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ writing


def save_checkpoint(root: str | Path, step: int, backend, optimizer, scheduler, state: dict, accelerator,
                    training_weights: dict | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and durably; every process must call it.
    ``training_weights``: the state dict being trained, when the backend's model holds their average."""
    root = Path(root)
    final = root / checkpoint_name(step)
    staging = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        _clear_leftovers(root)
        staging.mkdir(parents=True)
        fault_point("checkpoint:staged")
    accelerator.wait_for_everyone()
    _save(staging / f"rng-{accelerator.process_index}.pt", rng_state(), "checkpoint:rng")
    if accelerator.is_main_process:
        _write_main_files(staging, backend, optimizer, scheduler, state, accelerator.scaler)
        if training_weights is not None:
            _save(staging / TRAINING_WEIGHTS_FILE, training_weights, "checkpoint:training_weights")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _seal(staging, final)
    accelerator.wait_for_everyone()
    return final


def _clear_leftovers(root: Path) -> None:
    """Hidden staging and pruned folders a killed run left behind: never listed, so only space."""
    for path in root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def _write_main_files(staging: Path, backend, optimizer, scheduler, state: dict, scaler) -> None:
    backend.save(staging / MODEL_SUBDIR)
    fault_point("checkpoint:model")
    _save(staging / "optimizer.pt", optimizer.state_dict(), "checkpoint:optimizer")
    _save(staging / "scheduler.pt", scheduler.state_dict(), "checkpoint:scheduler")
    if scaler is not None:
        torch.save(scaler.state_dict(), staging / SCALER_FILE)
    fault_point("checkpoint:scaler")
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    fault_point("checkpoint:state")


def _save(file: Path, obj, point: str) -> None:
    torch.save(obj, file)
    fault_point(point)


def _seal(staging: Path, final: Path) -> None:
    """Manifest, fsync, rename: ``final`` appears complete and stays so through a power cut."""
    write_manifest(staging)
    fault_point("checkpoint:manifest")
    fsync_tree(staging)
    fault_point("checkpoint:synced")
    replace_dir(staging, final)  # fsyncs the parent; a same-step leftover (from an earlier resume) steps aside
    fault_point("checkpoint:renamed")


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every other file under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.relative_to(folder).as_posix(): [_size(p), _sha256(p)] for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def prune_checkpoints(root: str | Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the last ``keep_last`` checkpoints and the best one."""
    found = list_checkpoints(root)
    keep = set(found[-keep_last:])
    if best_step is not None:
        keep.add(Path(root) / checkpoint_name(best_step))
    for path in found:
        if path not in keep:
            _delete(path)
    fault_point("checkpoint:pruned")


def _delete(path: Path) -> None:
    """Rename ``path`` aside (hidden: never listed half-deleted), then remove it."""
    aside = path.with_name(f".{path.name}.pruned")
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)
    fsync_dir(path.parent)
    fault_point("prune:moved")
    shutil.rmtree(aside, ignore_errors=True)
    fault_point("prune:removed")


# ------------------------------------------------------------------------------ resuming


def load_training_state(path: str | Path, optimizer, scheduler, process_index: int = 0, scaler=None,
                        keep_settings: bool = False) -> dict:
    """Restore optimizer, scheduler, loss scaler and random generators from checkpoint ``path``; its trainer state.

    ``keep_settings``: the optimizer's and schedule's settings (learning rate, betas, weight decay)
    stay as built from the new config; only their state (moments, step count) is restored.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (see its {MANIFEST_FILE})")
    settings = _optimizer_settings(optimizer, scheduler) if keep_settings else None
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if settings is not None:
        _restore_optimizer_settings(optimizer, scheduler, *settings)
    _load_scaler(path, scaler)
    _load_rng(path, process_index)
    return read_state(path)


def _optimizer_settings(optimizer, scheduler) -> tuple[list[dict], list[float]]:
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    return groups, list(scheduler.base_lrs)


def _restore_optimizer_settings(optimizer, scheduler, groups: list[dict], base_lrs: list[float]) -> None:
    """The new settings on the restored state; the current rate recomputed as LambdaLR computes it."""
    scheduler.base_lrs = base_lrs
    for group, settings, base, factor in zip(optimizer.param_groups, groups, base_lrs, scheduler.lr_lambdas):
        group.update(settings, lr=base * factor(scheduler.last_epoch))


def _load_scaler(path: Path, scaler) -> None:
    file = path / SCALER_FILE
    if scaler is not None and file.is_file():
        scaler.load_state_dict(torch.load(file, weights_only=True))
    elif scaler is not None:
        log.warning("%s holds no %s: fp16 starts again from a fresh loss scale", path, SCALER_FILE)
    elif file.is_file():
        log.warning("%s holds an fp16 loss scale (%s); this run is not fp16 and ignores it", path, SCALER_FILE)


def _load_rng(path: Path, process_index: int) -> None:
    rng_file = path / f"rng-{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no random state for process %d; dropout will differ from the original run",
                    path, process_index)


# Settings a resumed run may change without being told --force: each decides where files go, how
# often the run logs, validates or saves, when it stops, or how fast it runs, never what the
# weights become at a step. Every other setting (a new one too, until it is listed here) changes
# the trajectory: lr, betas, weight decay, schedule, warm-up, clipping, batch size, grad_accum,
# seed, precision, the model, LoRA, the data, the caption choice, the augmentations. The eval
# settings but batch_size also count: the best checkpoint compares figures across the resume.
RESUME_FREE = {
    "train.output_dir", "train.overwrite", "train.resume", "train.force",  # how this start is asked for
    "train.threads", "train.prefetch",  # speed: the batches are a function of seed and step alone
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",  # validation reads the
    # weights without changing them (greedy decoding, dropout off: no random draws)
    "train.max_minutes", "train.patience",  # when to stop, not the steps before (but _changes_training)
    "train.max_steps", "train.epochs",  # compared as total_steps, the length the schedule follows
    "data.cache_dir",  # where decoded pixels are cached
    "model.gradient_checkpointing",  # recomputes the same activations (preserving the RNG): memory for time
    "model.trust_remote_code",  # a permission; the model comes from the checkpoint
    "eval.batch_size",  # images decoded together; the same captions
}


def resume_changes(saved: dict, current: dict) -> list[str]:
    """``"setting: old → new"`` for each setting of ``current`` that differs from checkpoint state ``saved``
    and changes training.

    ``current`` holds any of ``config`` (a run config's dict), ``precision`` and ``total_steps``; a
    setting the checkpoint does not record (written by an older hemcap) is not compared.
    """
    old, new = _flat(saved), _flat(json.loads(json.dumps(current)))  # as saved: tuples become lists
    both = {**old, **new}
    return [f"{RESOLVED.get(key, key)}: {_show(old[key])} → {_show(value)}" for key, value in new.items()
            if key in old and old[key] != value and _changes_training(key, both)]


# what a checkpoint records beside its config, as resume_changes names it
RESOLVED = {"precision": "precision (train.precision as resolved)",
            "total_steps": "total steps (from train.max_steps, or train.epochs and the training split)"}


def _flat(record: dict) -> dict:
    """``section.key`` -> value of ``record["config"]``, with its ``precision`` and ``total_steps``."""
    config = record.get("config") or {}
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    return flat | {key: record[key] for key in RESOLVED if key in record}


def _changes_training(key: str, flat: dict) -> bool:
    """Whether another value of ``key`` changes what the weights become at a step."""
    if key == "total_steps":
        return _length_matters(flat)
    if key == "train.max_minutes":  # free, unless the schedule spans the time budget too
        return flat.get("train.schedule_over") == "budget" and _length_matters(flat)
    return key not in RESUME_FREE


def _length_matters(flat: dict) -> bool:
    """A schedule that decays or warms up follows the total steps; a constant one without warm-up does not."""
    return flat.get("train.schedule") != "constant" or flat.get("train.warmup_ratio", 0) > 0


def _show(value) -> str:
    """As YAML would write it: null, true, 0.0001, bf16, {"image_size": 64}."""
    return value if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------------------------ random state


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
