"""Fine-tune a captioning model on a prepared dataset: ``setup -> main -> fit -> validate``.

The same code runs on one CPU, one GPU or many, through ``accelerate``::

    accelerate launch hemcap/train.py --config configs/blip_tiny.yaml [--lora]
    hemcap train --config configs/blip_tiny.yaml [--lora]

A step is one optimizer step over ``grad_accum`` micro-batches. Validation generates a caption
for each validation image, parses its attributes and scores them (mean attribute accuracy, cell
type accuracy, CIDEr-D); the best checkpoint and early stopping follow ``eval.metric``. Logs go
to a progress bar, ``<output_dir>/log.jsonl`` and TensorBoard (``<output_dir>/tb``). The
finished model, the best checkpoint's, is written to ``<output_dir>/model``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import yaml

from hemcap import checkpoint, fileio, models, threads
from hemcap.config import ConfigError, RunConfig, add_train_arguments, config_from_args
from hemcap.inputs import Prefetcher, Restained, TrainBatches, decode_split, map_split

log = logging.getLogger("hemcap.train")

LOG_FILE = "log.jsonl"
FINAL_MODEL_DIR = "model"
SCRATCH_BASE_DIR = "base_model"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch."""


@dataclass
class ValSet:
    """Validation images decoded once, with what their captions should say."""

    pixels: torch.Tensor  # uint8 (N, 3, H, W)
    ids: list[str]
    references: list[list[str]]
    truth: list[dict[str, str]]


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: RunConfig
    accelerator: object
    backend: models.Backend
    model: torch.nn.Module  # backend.model as accelerate prepared it
    optimizer: object
    scheduler: object
    batches: TrainBatches
    val: ValSet
    schema: object
    train_ids: list[str]
    out: Path
    total_steps: int
    data_meta: dict
    precision: str = "fp32"  # as resolved: fp32, bf16 or fp16
    state: dict = field(default_factory=dict)  # step, best, history, elapsed_s: saved in checkpoints
    inputs: Prefetcher | None = None  # (rows, model inputs) of a micro-step, perhaps built ahead on a thread
    ema: torch.nn.Module | None = None  # train.ema's moving average of the model (AveragedModel), or None


# ------------------------------------------------------------------------------ entry points


def main(argv: list[str] | None = None) -> Path:
    parser = add_train_arguments(argparse.ArgumentParser(prog="hemcap/train.py", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return fit(config_from_args(args))


def fit(cfg: RunConfig) -> Path:
    """Train as ``cfg`` says; the path of the finished model."""
    from tqdm.auto import tqdm

    run = setup(cfg)
    bar = tqdm(total=run.total_steps, initial=run.state["step"], disable=not run.accelerator.is_main_process,
               desc="train")
    clock, meter, stop_reason = _Clock(run.state["elapsed_s"]), _Meter(), None
    watch = threads.ThreadWatch(cfg.train.threads, threads.local_processes())  # the load changes over a long run
    follow_budget(run)  # a resumed run: where the budget it has spent puts the schedule
    with contextlib.closing(run.inputs):  # the prefetch thread ends with training, or with its exception
        while run.state["step"] < run.total_steps and stop_reason is None:
            watch.tick()
            started = time.perf_counter()
            loss = train_step(run, run.state["step"])
            run.state["step"] += 1
            run.state["elapsed_s"] = _shared_elapsed(run, clock)
            follow_budget(run)
            meter.add(loss, time.perf_counter() - started)
            bar.update(1)
            if run.state["step"] % cfg.train.log_every == 0:
                _log_training(run, meter, bar)
            stop_reason = _between_steps(run)
    bar.close()
    if meter.steps:
        _log_training(run, meter, bar)
    if stop_reason:
        log.info("stopping at step %d: %s", run.state["step"], stop_reason)
    if run.state.get("last_eval_step") != run.state["step"]:
        _evaluate_and_save(run)
    return _finish(run)


def _between_steps(run: Run) -> str | None:
    """Validate or checkpoint when due; why the run should stop, if it should."""
    tc, step = run.cfg.train, run.state["step"]
    if tc.max_minutes and run.state["elapsed_s"] >= tc.max_minutes * 60:
        return f"time budget of {tc.max_minutes} min reached"
    if step == run.total_steps:
        return None  # the final validation follows
    if tc.eval_every and step % tc.eval_every == 0:
        if _evaluate_and_save(run):
            return f"no improvement in {tc.patience} validations"
    elif tc.save_every and step % tc.save_every == 0:
        _save(run)
    return None


# ------------------------------------------------------------------------------ setup


def setup(cfg: RunConfig) -> Run:
    """Accelerator, data, model (fresh or resumed), optimizer and schedule, ready for step 0 or k."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.train.output_dir)
    precision = resolve_precision(cfg.train.precision)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb")))
    # after Accelerator(): sibling processes have met at its rendezvous, not still importing torch (which reads as busy)
    threads.use_threads(threads.choose_threads(cfg.train.threads, threads.local_processes()))
    resume_dir = _resume_dir(cfg, out, accelerator)
    if resume_dir is not None:  # before the data and the model: a refusal should come at once
        check_resume(cfg, resume_dir, {"config": cfg.to_dict(), "precision": precision})
    set_seed(cfg.train.seed)
    dataset, meta, schema = _load_data(cfg, accelerator)
    _check_refine(cfg, schema)
    train_split, val_split = dataset["train"], dataset["val"]
    backend = build_backend(cfg, train_split, schema, precision, out, resume_dir, accelerator)
    with accelerator.main_process_first():  # one process decodes, the others read its cache
        batches, train_ids = _train_batches(cfg, backend, train_split, out, accelerator)
        val = _val_set(cfg, backend, val_split, schema, out)
    optimizer = _optimizer(cfg, backend.model)
    total = _total_steps(cfg, batches)
    if resume_dir is not None:  # the same config over a changed dataset can still change the schedule
        check_resume(cfg, resume_dir, {"total_steps": total})
    scheduler = _scheduler(cfg, optimizer, total)
    model, optimizer = accelerator.prepare(backend.model, optimizer)  # the scheduler is stepped by hand
    run = Run(cfg, accelerator, backend, model, optimizer, scheduler, batches, val, schema, train_ids, out, total, meta,
              precision)
    build = functools.partial(micro_inputs, batches, _own_processor(backend).collate)
    run.inputs = _prefetcher(cfg, accelerator, build)
    run.ema = _averaged_model(cfg, backend.model)  # resumed: the checkpoint's model folder holds the average
    run.state = {"step": 0, "elapsed_s": 0.0, "best_metric": None, "best_step": None, "evals_since_best": 0,
                 "history": []}
    if resume_dir is not None:
        run.state.update(checkpoint.load_training_state(resume_dir, optimizer, scheduler, accelerator.process_index,
                                                        accelerator.scaler, keep_settings=cfg.train.force))
        _load_training_weights(run, resume_dir)
        log.info("resumed from %s at step %d", resume_dir, run.state["step"])
    _start_logs(run)
    return run


def _check_refine(cfg: RunConfig, schema) -> None:
    """``train.refine`` names fields of the data's schema: said now, not after the run."""
    from hemcap.config import ConfigError
    from hemcap.refine import unknown_fields

    problems = unknown_fields(schema, cfg.train.refine)
    if problems:
        raise ConfigError("train.refine: " + "; ".join(problems))


def _averaged_model(cfg: RunConfig, model) -> torch.nn.Module | None:
    """The exponential moving average of ``model``'s weights and batch-norm statistics that ``train.ema`` asks for."""
    if not cfg.train.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)


def _load_training_weights(run: Run, resume_dir: Path) -> None:
    """A checkpoint saved under ``train.ema`` holds the average as its model, the trained weights beside it."""
    path = resume_dir / checkpoint.TRAINING_WEIGHTS_FILE
    if path.is_file():
        run.backend.model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    if run.ema is not None:
        run.ema.n_averaged.fill_(max(1, run.state["step"]))  # averaging goes on, not restarting from a copy


def resolve_precision(precision: str | None) -> str:
    """fp32, bf16 or fp16. The default is bf16 on a CUDA GPU that has it, fp32 elsewhere: bf16 on
    a CPU depends on its bf16 kernels (slow without AVX512-BF16/AMX), so it is asked for, not assumed.
    ``auto`` also takes bf16 on a CPU with native bf16 instructions."""
    if precision == "auto" and not torch.cuda.is_available():
        native = cpu_has_native_bf16()
        log.info("precision auto: %s (native CPU bf16 %s)", "bf16" if native else "fp32", "found" if native else "absent")
        return "bf16" if native else "fp32"
    if precision in (None, "auto"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use fp32 (or bf16) on a CPU")
    if precision == "bf16" and not torch.cuda.is_available():
        log.warning("bf16 on a CPU: fast only with native bf16 kernels (AVX512-BF16 or AMX); compare with fp32")
    return precision


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux). Without them bf16 is emulated, 5-140x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _resume_dir(cfg: RunConfig, out: Path, accelerator) -> Path | None:
    """The checkpoint to resume from; refuses to mix a fresh run into an earlier run's output dir."""
    checkpoints = out / "checkpoints"
    if cfg.train.resume == "auto":
        found = checkpoint.latest_checkpoint(checkpoints)
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting afresh", checkpoints)
        return found
    if cfg.train.resume:  # named by hand: a damaged one is an error, not a reason to pick another
        checkpoint.verify_checkpoint(cfg.train.resume)
        return Path(cfg.train.resume)
    earlier = [p for p in (checkpoints, out / FINAL_MODEL_DIR, out / LOG_FILE) if p.exists()]
    if earlier and not cfg.train.overwrite:
        raise FileExistsError(f"{out} holds an earlier run ({', '.join(p.name for p in earlier)}); "
                              "pass --resume auto to continue it or --overwrite to start afresh")
    if earlier and accelerator.is_main_process:
        for path in [*earlier, out / "tb", out / SCRATCH_BASE_DIR]:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return None


def check_resume(cfg: RunConfig, resume_dir: Path, current: dict) -> None:
    """Refuse to resume ``resume_dir`` with settings that change training (``checkpoint.resume_changes``)
    unless ``train.force``; a forced resume logs what it changes."""
    changes = checkpoint.resume_changes(checkpoint.read_state(resume_dir), current)
    if not changes:
        return
    listing = "".join(f"\n  - {change}" for change in changes)
    if cfg.train.force:
        log.warning("--force: resuming %s with other settings:%s", resume_dir, listing)
        return
    raise ConfigError(f"{resume_dir} was trained with other settings:{listing}\nresume with its settings, or pass "
                      "--force (train.force: true) to go on with these")


def _load_data(cfg: RunConfig, accelerator):
    """The train and validation splits, generating the synthetic set first when the config asks for it."""
    from hemcap.recipes import dataset_schema, get_split, load_prepared, prepare_synthetic

    path = Path(cfg.data.path)
    if not path.exists() and cfg.data.synthetic is not None:
        with accelerator.main_process_first():
            if not path.exists():
                log.info("generating the synthetic dataset %s", path)
                prepare_synthetic(path, **cfg.data.synthetic)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found; make it with `hemcap prepare` (data.path)")
    dataset, meta = load_prepared(path)
    train = get_split(dataset, cfg.data.train_split)
    if cfg.data.max_train_samples:
        train = train.select(range(min(cfg.data.max_train_samples, len(train))))
    val = get_split(dataset, cfg.data.val_split)
    if cfg.eval.max_samples:
        val = val.select(range(min(cfg.eval.max_samples, len(val))))
    return {"train": train, "val": val}, meta, dataset_schema(meta, path)


def build_backend(cfg: RunConfig, train_split, schema, precision: str, out: Path, resume_dir: Path | None,
                  accelerator) -> models.Backend:
    """The model to train: fresh from the config, or as checkpoint ``resume_dir`` left it."""
    lora = cfg.lora
    # LoRA keeps the frozen base in the training precision and its adapters in fp32.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if lora.enabled else None
    if lora.quantize:
        dtype = torch.bfloat16
    if resume_dir is not None:
        backend = models.load_trained(resume_dir / checkpoint.MODEL_SUBDIR, dtype=dtype, quantize=lora.quantize,
                                      is_trainable=True)
        backend.configure(cfg.model)
        if (out / SCRATCH_BASE_DIR).is_dir():
            backend.base_dir = out / SCRATCH_BASE_DIR
    else:
        captions = [c for variants in train_split["captions"] for c in variants] if cfg.model.init == "scratch" else ()
        backend = models.load_backend(cfg.model, captions, dtype=dtype, quantize=lora.quantize, schema=schema)
        if lora.enabled:
            if cfg.model.init == "scratch":
                if accelerator.is_main_process:
                    backend.save(out / SCRATCH_BASE_DIR)
                backend.base_dir = out / SCRATCH_BASE_DIR
            targets = models.add_lora(backend, lora, cfg.model.freeze_vision)
            log.info("LoRA r=%d alpha=%d on %d modules, e.g. %s", lora.r, lora.alpha, len(targets), targets[0])
    if cfg.model.gradient_checkpointing:
        models.enable_gradient_checkpointing(backend)
    trainable, total = models.count_parameters(backend.model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if trainable == 0:
        raise models.ModelError("no trainable parameters: check model.freeze_vision and the LoRA targets")
    decoding = dataclasses.asdict(eval_settings(cfg))
    backend.info.decoding = {k: v for k, v in decoding.items() if k not in ("device", "stain_norm")}  # eval decodes so
    if resume_dir is None:
        backend.info.centre_crop = cfg.data.centre_crop
        _record_domain(backend, train_split, cfg.data.stain_norm, cfg.data.centre_crop)
    return backend


def _record_domain(backend: models.Backend, train_split, stain_norm: str, crop: float) -> None:
    """The training images' magnification and colour, in the model's info (``hemcap.domain``)."""
    from hemcap.domain import SAMPLE, measure_domain

    sample = train_split.select(range(min(SAMPLE, len(train_split))))
    domain = measure_domain(sample["image"], stain_norm, crop)
    backend.info.magnification, backend.info.colour = domain.info_fields(len(sample))
    log.info("training images: red cells %s px in a %s px field; CIELAB mean %s", domain.red_cell_px,
             domain.field_px, domain.lab_mean)


def _train_batches(cfg: RunConfig, backend, split, out: Path, accelerator) -> tuple[TrainBatches, list[str]]:
    pixels, rows = map_split(split, backend.image_size, _cache_dir(cfg, out),  # memory-mapped: batches read their rows
                             transform=_stain_normaliser(backend), crop=backend.info.centre_crop)
    if cfg.data.captions == "variants":
        captions = split["captions"]
    else:
        captions = [[c] for c in split["caption"]]
    ids = split["id"]
    batches = TrainBatches(pixels, [captions[r] for r in rows], cfg.train.batch_size, cfg.augment, cfg.train.seed,
                           cfg.data.captions == "variants", accelerator.process_index, accelerator.num_processes,
                           _restained_copies(cfg, backend, split, out, rows))
    log.info("training on %d images at %dx%d, %d micro-batches per epoch", len(pixels), *backend.image_size,
             batches.steps_per_epoch)
    return batches, [ids[r] for r in rows]


def _restained_copies(cfg: RunConfig, backend, split, out: Path, rows: list[int]) -> list:
    """With ``augment.restain``: the training images decoded again under random other labs' stains, then
    the model's normaliser (``inputs.Restained``), one cache per copy."""
    from hemcap.domain import Domain

    domain = Domain.from_info(backend.info) or Domain()
    copies = []
    for index in range(cfg.augment.restain_copies if cfg.augment.restain else 0):
        transform = Restained(cfg.augment.restain, index, cfg.train.seed, domain)
        pixels, copy_rows = map_split(split, backend.image_size, _cache_dir(cfg, out), transform=transform,
                                      crop=backend.info.centre_crop)
        if copy_rows != rows:
            raise ValueError(f"restained copy {index}: {len(set(rows) ^ set(copy_rows))} images decoded either there "
                             "or among the training images, not in both (see the warnings above)")
        copies.append(pixels)
    if copies:
        log.info("%d restained copies of the training images (augment.restain %s)", len(copies), cfg.augment.restain)
    return copies


def _prefetcher(cfg: RunConfig, accelerator, build) -> Prefetcher:
    """``build`` per micro-step: two ahead on a thread on a GPU, when asked for on a CPU (``train.prefetch`` overrides).

    On a GPU the training thread mostly waits for the device. On a CPU the model's OpenMP threads
    already fill every core: on 2 cores (quickstart, 2026-11-28, eval/bench_input_memory.py) a
    prefetch thread running torch's default 2 threads cut samples/s by 24 % against building on
    the training thread (8 ms of a 110 ms step), and one running a single torch thread, as a CPU
    thread here does, was no faster (median ratio 0.97).
    """
    cpu = accelerator.device.type == "cpu"
    ahead = cfg.train.prefetch if cfg.train.prefetch is not None else (0 if cpu else 2)
    return Prefetcher(build, ahead, threads=1 if cpu else None)


def _own_processor(backend: models.Backend) -> models.Backend:
    """``backend`` with a processor of its own, for the prefetch thread.

    The padding side is state of the shared Rust tokenizer: one tokenizer encoding right-padded
    captions on one thread and left-padded prompts (the chat backend's validation) on another
    padded 1,397 of 6,000 encodings on the wrong side (tokenizers 0.23).
    """
    own = copy.copy(backend)
    own.processor = copy.deepcopy(backend.processor)
    return own


def _val_set(cfg: RunConfig, backend, split, schema, out: Path) -> ValSet:
    """The validation images as ``hemcap eval`` gives them to the model (in the training images' colours)."""
    pixels, rows = decode_split(split, backend.image_size, _cache_dir(cfg, out), _stain_normaliser(backend),
                                backend.info.centre_crop)
    columns = {name: split[name] for name in schema.field_names}
    references, ids = split["captions"], split["id"]
    return ValSet(pixels, [ids[r] for r in rows], [list(references[r]) for r in rows],
                  [{name: columns[name][r] for name in schema.field_names} for r in rows])


def _stain_normaliser(backend: models.Backend):
    """The model's stain normalisation (``hemcap.domain``) as a decode transform; None when it has none."""
    from hemcap.domain import Domain

    domain = Domain.from_info(backend.info)
    return domain.normaliser() if domain is not None and domain.normalises else None


def _cache_dir(cfg: RunConfig, out: Path) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    beside_data = Path(cfg.data.path) / ".hemcap_cache"
    return beside_data if os.access(cfg.data.path, os.W_OK) else out / "cache"


def _optimizer(cfg: RunConfig, model) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr, betas=tuple(cfg.train.betas))


def _total_steps(cfg: RunConfig, batches: TrainBatches) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * batches.steps_per_epoch / cfg.train.grad_accum))


def _scheduler(cfg: RunConfig, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warm-up schedules, written out (tests/test_train.py checks them step by step against
    ``transformers.get_scheduler``): importing ``transformers.optimization`` imports peft and bitsandbytes,
    7 s at every start of a training process on a 2-core EPYC."""
    rate = functools.partial(SCHEDULES[cfg.train.schedule], warmup=round(cfg.train.warmup_ratio * total_steps),
                             total=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rate)


def _cosine(step: float, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _linear(step: float, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _constant(step: float, warmup: int, total: int) -> float:
    return step / max(1, warmup) if step < warmup else 1.0


SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}  # the rate factor at a (fractional) step


# ------------------------------------------------------------------------------ training


def micro_inputs(batches: TrainBatches, collate, micro: int) -> tuple[list[int], dict]:
    """The rows and the model inputs (``collate``'s, with labels) of micro-batch ``micro``."""
    batch = batches(micro)
    rows = [{"pixels": p, "caption": c} for p, c in zip(batch.pixels, batch.captions)]
    return batch.rows, collate(rows, train=True)


def train_step(run: Run, step: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the mean loss."""
    accelerator, accum = run.accelerator, run.cfg.train.grad_accum
    run.model.train()
    total = 0.0
    for k in range(accum):
        micro = step * accum + k
        rows, inputs = run.inputs(micro)
        inputs = {key: value.to(accelerator.device) for key, value in inputs.items()}
        sync = accelerator.no_sync(run.model) if k < accum - 1 else contextlib.nullcontext()
        with sync, accelerator.autocast():  # a backend may call the model's parts, not its wrapped forward
            loss = run.backend.training_loss(run.model, inputs)
            if not torch.isfinite(loss):
                ids = [run.train_ids[r] for r in rows]
                raise NonFiniteLoss(f"loss is {loss.item()} at step {step} (micro-batch {micro}); "
                                    f"batch rows {rows[:8]}, ids {ids[:8]}")
            accelerator.backward(loss / accum)
        total += loss.item() / accum
    if run.cfg.train.max_grad_norm:
        accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.train.max_grad_norm)
    run.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(run.backend.model)
    return total


def follow_budget(run: Run) -> None:
    """``train.schedule_over: budget``: the learning rate where the schedule stands at the share of the
    budget spent, steps or minutes, whichever is further on, so a run the clock stops has annealed
    (a cosine cut at a third of its steps would stop at 75 % of its peak rate)."""
    tc = run.cfg.train
    if tc.schedule_over != "budget" or not tc.max_minutes:
        return
    spent = max(run.state["step"] / run.total_steps, run.state["elapsed_s"] / (tc.max_minutes * 60))
    at = min(spent, 1.0) * run.total_steps  # a fractional step: the schedules are smooth in it
    for group, base, rate in zip(run.optimizer.param_groups, run.scheduler.base_lrs, run.scheduler.lr_lambdas):
        group["lr"] = base * rate(at)


def _shared_elapsed(run: Run, clock) -> float:
    """The main process's training time, on every process: one clock stops them all at the same step (one
    that stopped alone would leave the others waiting in their all-reduce) and gives them one learning rate."""
    elapsed = [clock.elapsed()]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(elapsed)
    return elapsed[0]


class _Clock:
    """Training time, carried across resumes."""

    def __init__(self, already: float):
        self.start = time.monotonic() - already

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class _Meter:
    """Mean loss and time of the steps since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.seconds = 0.0, 0, 0.0

    def add(self, loss: float, seconds: float) -> None:
        self.loss, self.steps, self.seconds = self.loss + loss, self.steps + 1, self.seconds + seconds

    def reset(self) -> None:
        self.__init__()


# ------------------------------------------------------------------------------ validation


def eval_settings(cfg: RunConfig):
    """The engine settings validation decodes with, recorded in the model's info for ``hemcap eval``."""
    from hemcap.engine import EngineSettings

    return EngineSettings(max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                          decode_chunk=cfg.eval.batch_size)


def validate(run: Run) -> dict:
    """Caption every validation image through the engine, as ``hemcap eval`` does; score the captions."""
    from accelerate.utils import gather_object

    from hemcap.engine import CaptionEngine

    settings = dataclasses.replace(eval_settings(run.cfg), device=str(run.accelerator.device))  # this process's
    engine = CaptionEngine(run.backend, run.schema, settings)
    mine = list(range(run.accelerator.process_index, len(run.val.ids), run.accelerator.num_processes))
    chunk, captions = engine.settings.decode_chunk, []
    for start in range(0, len(mine), chunk):
        rows = [{"pixels": run.val.pixels[i].float() / 255} for i in mine[start:start + chunk]]
        captions += [caption.text for caption in engine.caption_rows(rows)]
    predictions = [text for _, text in sorted(gather_object(list(zip(mine, captions))))]
    return caption_scores(predictions, run.val.references, run.val.truth, run.schema) | {"examples": predictions[:3]}


@contextlib.contextmanager
def averaged_weights(run: Run):
    """With ``train.ema``, the model holds the averaged weights for the block (validation, saving) and
    the block is given the trained ones, which come back after it; without, nothing changes (None)."""
    if run.ema is None:
        yield None
        return
    model = run.backend.model
    trained = {name: value.detach().clone() for name, value in model.state_dict().items()}
    model.load_state_dict(run.ema.module.state_dict())
    try:
        yield trained
    finally:
        model.load_state_dict(trained)


def caption_scores(predictions: list[str], references: list[list[str]], truth: list[dict], schema) -> dict:
    """The validation figures, computed as ``hemcap eval`` computes them: mean attribute accuracy
    (omitted counts wrong), cell type, CIDEr-D, BLEU-4, and each field's accuracy."""
    from hemcap.metrics import caption_metrics, faithfulness_metrics

    faith = faithfulness_metrics(predictions, truth, schema)
    text = caption_metrics(predictions, references, meteor=False)
    fields = {name: round(scores["accuracy"], 5) for name, scores in faith["fields"].items()}
    return {"attribute_accuracy": faith["attribute_mean"]["accuracy"],
            "cell_type_accuracy": faith["fields"][schema.cell_type_field]["accuracy"],
            "cider": text["cider_d"], "bleu_4": text["bleu_4"], "field_accuracy": fields}


def _evaluate_and_save(run: Run) -> bool:
    """Validate, log, checkpoint, prune; True when early stopping says stop."""
    step = run.state["step"]
    with averaged_weights(run):
        metrics = validate(run)
    figure = metrics[run.cfg.eval.metric]
    improved = run.state["best_metric"] is None or figure > run.state["best_metric"]
    if improved:
        run.state.update(best_metric=figure, best_step=step, evals_since_best=0)
    else:
        run.state["evals_since_best"] += 1
    run.state["last_eval_step"] = step
    run.state["history"].append({"step": step, **{k: v for k, v in metrics.items() if k != "examples"}})
    _write_log(run, {"step": step, "split": "val", **metrics})
    log.info("step %d: attribute accuracy %.4f, cell type %.4f, CIDEr-D %.3f%s; e.g. %r", step,
             metrics["attribute_accuracy"], metrics["cell_type_accuracy"], metrics["cider"],
             " (best)" if improved else "", metrics["examples"][0] if metrics["examples"] else "")
    _save(run)
    patience = run.cfg.train.patience
    return bool(patience and run.state["evals_since_best"] >= patience)


def _save(run: Run) -> None:
    root = run.out / "checkpoints"
    state = {**run.state, "config": run.cfg.to_dict(), "precision": run.precision, "total_steps": run.total_steps}
    run.backend.info.training = _summary(run)  # a checkpoint's model folder knows where it stands
    with averaged_weights(run) as trained:
        checkpoint.save_checkpoint(root, run.state["step"], run.backend, run.optimizer, run.scheduler, state,
                                   run.accelerator, training_weights=trained)
    if run.accelerator.is_main_process:
        checkpoint.prune_checkpoints(root, run.cfg.train.keep_last, run.state["best_step"])


# ------------------------------------------------------------------------------ logs and output


def _start_logs(run: Run) -> None:
    """Config beside the run; the JSONL log cut back to the resumed step; TensorBoard."""
    if run.accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        fileio.write_text(run.out / "config.yaml", yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
        _truncate_log(run.out / LOG_FILE, run.state["step"])
    run.accelerator.init_trackers("tb")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step``: a resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if _record_step(line) <= step]
    fileio.write_text(path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    """The step of a log line; infinite (dropped) for a line a killed run left half-written."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _log_training(run: Run, meter: _Meter, bar) -> None:
    samples = meter.steps * run.batches.global_batch * run.cfg.train.grad_accum
    step = run.state["step"]
    record = {"step": step, "split": "train", "loss": meter.loss / meter.steps,
              "lr": run.optimizer.param_groups[0]["lr"], "samples_per_s": samples / max(meter.seconds, 1e-9),
              "epoch": step * run.cfg.train.grad_accum / run.batches.steps_per_epoch,
              "elapsed_s": round(run.state["elapsed_s"], 1)}
    _write_log(run, record)
    _follow_the_clock(run, bar)
    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
    meter.reset()


def budget_end(run: Run) -> int:
    """The step the run will end at: its last, or where ``max_minutes`` stops it at the pace so far
    (validations included: they recur)."""
    tc, step, elapsed = run.cfg.train, run.state["step"], run.state["elapsed_s"]
    if not tc.max_minutes or not elapsed:
        return run.total_steps
    return min(run.total_steps, step + max(0, math.ceil((tc.max_minutes * 60 - elapsed) * step / elapsed)))


def _follow_the_clock(run: Run, bar) -> None:
    """The bar's total and time left as the budget sets them: without native bf16 the WBCAtt recipe's
    minutes run out near step 1,060 of 3,600, where a bar counting to 3,600 showed 3.5 hours to go."""
    ends = budget_end(run)
    if ends < bar.total == run.total_steps:
        log.info("at this pace the %g-minute budget holds about %d of the %d steps", run.cfg.train.max_minutes,
                 ends, run.total_steps)
    if ends != bar.total:
        bar.total = ends
        bar.refresh()


def _write_log(run: Run, record: dict) -> None:
    flat = {k: v for k, v in record.items() if k not in ("step", "split")}
    flat |= {f"{k}/{name}": x for k, v in record.items() if isinstance(v, dict) for name, x in v.items()}
    scalars = {f"{record['split']}/{k}": v for k, v in flat.items() if isinstance(v, (int, float))}
    run.accelerator.log(scalars, step=record["step"])
    if run.accelerator.is_main_process:
        with open(run.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _finish(run: Run) -> Path:
    """Copy the best checkpoint's model to ``<output_dir>/model``, its info holding the run's summary."""
    accelerator = run.accelerator
    final = run.out / FINAL_MODEL_DIR
    if accelerator.is_main_process:
        best = run.out / "checkpoints" / checkpoint.checkpoint_name(run.state["best_step"]) / checkpoint.MODEL_SUBDIR
        with fileio.staging_dir(final, overwrite=True) as staging:
            shutil.copytree(best, staging, dirs_exist_ok=True)
            info = models.read_model_info(staging)
            info.training = _summary(run)
            models.write_model_info(staging, info)
        log.info("model written to %s (step %d, %s %.4f)", final, run.state["best_step"], run.cfg.eval.metric,
                 run.state["best_metric"])
        if run.cfg.train.refine:  # after training, on the finished folder: max_minutes does not cover it
            from hemcap.refine import fit_refiner

            fit_refiner(final, run.cfg.data.path, run.cfg.train.refine, split=run.cfg.data.train_split,
                        val_split=run.cfg.data.val_split)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it ends the process group too, which the barrier above needs
    return final


def _summary(run: Run) -> dict:
    """What a model card needs: validation metrics of the best step, data, base model, config."""
    best = next((h for h in run.state["history"] if h["step"] == run.state["best_step"]), {})
    cfg = run.cfg
    return {"metrics": best, "best_step": run.state["best_step"], "steps": run.state["step"],
            "training_minutes": round(run.state["elapsed_s"] / 60, 2), "init": cfg.model.init,
            "lora": cfg.lora.enabled,
            "data": {"path": str(cfg.data.path), "train_images": len(run.train_ids), "val_images": len(run.val.ids),
                     **{k: run.data_meta.get(k) for k in ("schema", "recipe")}},
            "config": dataclasses.asdict(cfg)}


if __name__ == "__main__":
    main()
