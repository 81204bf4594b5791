"""The trainer on tiny random models and a tiny synthetic set: end to end, resume, NaN stop, output dirs."""

import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from hemcap import checkpoint, inputs
from hemcap.config import RunConfig
from hemcap.models import read_model_info
from hemcap.recipes import load_prepared, prepare_synthetic
from hemcap.train import LOG_FILE, NonFiniteLoss, fit

REPO = Path(__file__).resolve().parents[1]
HEMBLIP_TARGETS = ["crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                   "crossattention.output.dense"]
# On a shared 2-core machine, OpenMP threads that spin while waiting make tiny ops ~100x slower.
QUIET_THREADS = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def texts(backend, rows, max_new_tokens):
    """Greedy captions through the engine (the one decoding path)."""
    from hemcap.engine import CaptionEngine, EngineSettings

    settings = EngineSettings(max_new_tokens=max_new_tokens, device="cpu")
    return [c.text for c in CaptionEngine(backend, settings=settings).caption_rows(rows)]



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "cells", n_train=24, n_val=4, n_test=2, size=32)


def tiny_blip(data: Path, out: Path, lora: bool = False, heads: float = 0.0, stem: str = "patch",
              **train) -> RunConfig:
    raw = {
        "model": {"backend": "blip", "init": "scratch", "name_or_path": None, "vocab_size": 300, "max_length": 64,
                  "attribute_loss": heads, "vision_stem": stem,
                  "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2},
                  "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 96,
                                  "hidden_dropout_prob": 0.1}},  # dropout: resuming must restore the RNG
        "data": {"path": str(data), "captions": "variants"},
        "augment": {"color_jitter": 0.1, "stain_jitter": 0.1},
        "lora": {"enabled": lora, "target_modules": HEMBLIP_TARGETS},
        "train": {"output_dir": str(out), "batch_size": 8, "max_steps": 4, "lr": 2e-3, "log_every": 1,
                  "save_every": 2, "keep_last": 5, "prefetch": 2, **train},  # prefetch: a GPU's thread
        "eval": {"batch_size": 4, "max_new_tokens": 6},
    }
    return RunConfig.from_dict(raw)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's floating-point weights, attribute heads and batch-norm statistics included."""
    from hemcap.models import load_trained

    return {k: v for k, v in load_trained(folder).model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("lora, heads, stem, ema", [(False, 0.0, "patch", None), (True, 0.0, "patch", None),
                                                    (False, 1.0, "conv", None), (False, 1.0, "conv", 0.5)],
                         ids=["full", "lora", "heads-conv-stem", "ema"])
def test_a_killed_run_resumed_gives_the_same_losses(data, tmp_path, monkeypatch, lora, heads, stem, ema):
    fit(tiny_blip(data, tmp_path / "straight", lora, heads, stem, ema=ema))

    real_save = checkpoint.save_checkpoint

    def save_then_die(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt("killed after checkpoint 2")
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_blip(data, tmp_path / "killed", lora, heads, stem, ema=ema))
    monkeypatch.undo()
    assert not [t for t in threading.enumerate() if t.name == "hemcap-prefetch"], "the prefetch thread ended"
    assert sorted(losses(tmp_path / "killed")) == [1, 2]
    fit(tiny_blip(data, tmp_path / "killed", lora, heads, stem, ema=ema, resume="auto"))

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step
    assert straight[1] != straight[2]  # the steps really trained
    if ema:  # the average goes on across the resume, from the trained weights, not from their average
        final = {name: weights(tmp_path / name / "model") for name in ("straight", "killed")}
        for key, value in final["straight"].items():
            assert torch.allclose(final["killed"][key], value, atol=1e-5), key


def test_with_ema_the_saved_model_is_the_moving_average_and_training_is_unchanged(data, tmp_path):
    fit(tiny_blip(data, tmp_path / "plain", heads=1.0, stem="conv", save_every=1))
    fit(tiny_blip(data, tmp_path / "ema", heads=1.0, stem="conv", ema=0.5))
    assert losses(tmp_path / "ema") == losses(tmp_path / "plain")
    trained = [weights(tmp_path / "plain" / "checkpoints" / f"step-{s:08d}" / "model") for s in (1, 2, 3, 4)]
    average = weights(tmp_path / "ema" / "model")
    last = tmp_path / "ema" / "checkpoints" / "step-00000004"
    beside = torch.load(last / checkpoint.TRAINING_WEIGHTS_FILE, weights_only=True)
    moved = 0
    for key, value in average.items():  # decay 0.5 from a copy of step 1: w1/8 + w2/8 + w3/4 + w4/2
        expected = (trained[0][key] + trained[1][key]) / 8 + trained[2][key] / 4 + trained[3][key] / 2
        assert torch.allclose(value, expected, atol=1e-5), key
        assert torch.allclose(beside[key].float(), trained[3][key], atol=1e-6), key
        moved += not torch.allclose(value, trained[3][key])
    assert moved > len(average) // 2
    assert read_model_info(tmp_path / "ema" / "model").training["config"]["train"]["ema"] == 0.5
    from hemcap.config import ConfigError

    with pytest.raises(ConfigError, match=r"ema=1.5 should be a decay in \(0, 1\)"):
        tiny_blip(data, tmp_path / "x", ema=1.5)
    with pytest.raises(ConfigError, match="train.ema: the average copies the whole model"):
        tiny_blip(data, tmp_path / "x", lora=True, ema=0.9)


def test_checkpoints_keep_last_n_and_the_best(data, tmp_path):
    out = tmp_path / "run"
    fit(tiny_blip(data, out, max_steps=6, save_every=None, eval_every=2, keep_last=1, log_every=3))
    state = json.loads((checkpoint.latest_checkpoint(out / "checkpoints") / checkpoint.STATE_FILE).read_text())
    kept = {p.name for p in checkpoint.list_checkpoints(out / "checkpoints")}
    assert kept == {"step-00000006", checkpoint.checkpoint_name(state["best_step"])}
    assert [h["step"] for h in state["history"]] == [2, 4, 6]
    summary = read_model_info(out / "model").training
    assert summary["best_step"] == state["best_step"] and "attribute_accuracy" in summary["metrics"]
    assert not list((out / "checkpoints").glob(".*")), "no staging dirs left behind"
    tb_events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert tb_events, "TensorBoard logs are written"


def test_nan_loss_stops_the_run_naming_step_and_batch(data, tmp_path, monkeypatch):
    real_augment = inputs.augment_pixels
    calls = []

    def poisoned(pixels, cfg, rng):
        calls.append(1)
        x = real_augment(pixels, cfg, rng)
        return x * float("nan") if len(calls) == 3 else x

    monkeypatch.setattr(inputs, "augment_pixels", poisoned)
    with pytest.raises(NonFiniteLoss) as error:
        fit(tiny_blip(data, tmp_path / "nan"))
    message = str(error.value)
    assert "loss is nan at step 2" in message and "synthetic-train-" in message


def test_an_earlier_run_is_not_overwritten_by_accident(data, tmp_path):
    out = tmp_path / "run"
    fit(tiny_blip(data, out, max_steps=2, save_every=None))
    with pytest.raises(FileExistsError, match="--resume auto"):
        fit(tiny_blip(data, out, max_steps=2))
    fit(tiny_blip(data, out, max_steps=2, overwrite=True))
    assert sorted(losses(out)) == [1, 2]


def test_chat_model_trains_through_the_cli(data, tmp_path):
    """A tiny Gemma 3-class model: system prompt, image, answer-only loss, validation by generation."""
    from hemcap.cli import main
    from hemcap.models import load_trained

    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"backend": "chat", "init": "scratch", "name_or_path": None, "vocab_size": 400},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "chat"), "batch_size": 8, "max_steps": 2, "lr": 1e-3},
        "eval": {"batch_size": 4, "max_new_tokens": 4},
    }))
    assert main(["train", "--config", str(config), "--lora", "--set", "lora.target_modules=all-linear"]) == 0
    backend = load_trained(tmp_path / "chat" / "model")
    assert backend.kind == "chat" and (tmp_path / "chat" / "model" / "adapter_config.json").is_file()
    dataset, _ = load_prepared(data)
    assert len(texts(backend, [{"image": dataset["test"][0]["image"]}], 3)) == 1


@pytest.mark.slow
def test_two_processes_under_a_time_budget_stop_together(tmp_path):
    """Two CPU processes under torchrun read one clock: both stop at the same step, the model is written
    and the run ends cleanly (the process group outlives the last barrier)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "hemcap/train.py",
               "--config", "configs/blip_tiny.yaml", "--output-dir", str(out), "--set",
               f"data.path={tmp_path / 'synthetic_tiny'}", "--set", "train.max_steps=100000", "--set",
               "train.max_minutes=0.05", "--set", "train.schedule_over=budget"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                               "ACCELERATE_USE_CPU": "true"})  # gloo: without it each process trains alone
    assert done.returncode == 0, done.stderr[-3000:]
    stops = re.findall(r"stopping at step (\d+): time budget of 0.05 min reached", done.stderr)
    assert len(stops) == 2 and stops[0] == stops[1]
    assert_reloads_and_generates(out / "model", tmp_path / "synthetic_tiny", lora=False, steps=int(stops[0]))


@pytest.mark.slow
def test_accelerate_launch_blip_tiny_end_to_end(tmp_path):
    """The documented command, ``accelerate launch hemcap/train.py --lora --config ...``, on the shipped
    config, writes an adapter that reloads and generates (full training: the two-process test above)."""
    out = tmp_path / "run"
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "hemcap/train.py", "--lora",
               "--config", "configs/blip_tiny.yaml", "--output-dir", str(out),
               "--set", f"data.path={tmp_path / 'synthetic_tiny'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **QUIET_THREADS})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable parameters:" in done.stderr
    assert_reloads_and_generates(out / "model", tmp_path / "synthetic_tiny", lora=True, steps=24)


def assert_reloads_and_generates(model_dir: Path, data: Path, lora: bool, steps: int) -> None:
    """The model folder loads with transformers (and peft) alone and captions a validation cell."""
    dataset, _ = load_prepared(data)
    image = dataset["validation"][0]["image"]

    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    if lora:
        from peft import PeftModel

        base = BlipForConditionalGeneration.from_pretrained(model_dir / "base_model")
        model = PeftModel.from_pretrained(base, model_dir)
        assert (model_dir / "adapter_model.safetensors").is_file()
    else:
        model = BlipForConditionalGeneration.from_pretrained(model_dir)
        assert (model_dir / "model.safetensors").is_file()
    ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=8)
    assert isinstance(processor.decode(ids[0], skip_special_tokens=True), str) and ids.shape[1] > 1
    summary = read_model_info(model_dir).training
    assert summary["lora"] is lora and summary["steps"] == steps


def test_early_stopping_and_the_time_budget(data, tmp_path, monkeypatch):
    from hemcap import train

    flat = {"attribute_accuracy": 0.5, "cell_type_accuracy": 0.5, "cider": 0.1, "bleu_4": 0.0,
            "field_accuracy": {}, "examples": ["x"]}
    monkeypatch.setattr(train, "validate", lambda run: dict(flat))
    out = tmp_path / "patience"
    fit(tiny_blip(data, out, max_steps=10, eval_every=2, save_every=None, patience=2))
    assert max(losses(out)) == 6  # best at 2, no better at 4 and 6: stop
    assert read_model_info(out / "model").training["best_step"] == 2

    out = tmp_path / "budget"
    fit(tiny_blip(data, out, max_steps=10, max_minutes=1e-6))
    assert sorted(losses(out)) == [1]


def test_a_budget_schedule_follows_steps_or_minutes_whichever_is_further_on(data, tmp_path):
    from hemcap.train import follow_budget, setup

    run = setup(tiny_blip(data, tmp_path / "setup", max_steps=100, max_minutes=10.0, warmup_ratio=0.0,
                          schedule_over="budget"))
    with contextlib.closing(run.inputs):
        for step, minutes, spent in [(0, 5.0, 0.5), (80, 5.0, 0.8), (10, 12.0, 1.0)]:
            run.state.update(step=step, elapsed_s=minutes * 60)
            follow_budget(run)
            assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * spent)))

    out = tmp_path / "clock"  # stopped by the clock long before its steps: annealed all the same
    fit(tiny_blip(data, out, max_steps=1000, max_minutes=0.02, schedule_over="budget"))
    records = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    rates = [r["lr"] for r in records if r["split"] == "train"]
    assert len(rates) < 1000 and rates[-1] == 0.0


def test_the_step_a_time_budget_ends_at(data, tmp_path):
    from hemcap.train import budget_end, setup

    run = setup(tiny_blip(data, tmp_path / "setup", max_steps=100, max_minutes=10.0))
    with contextlib.closing(run.inputs):
        assert budget_end(run) == 100  # no step taken: no pace yet
        run.state.update(step=10, elapsed_s=60.0)
        assert budget_end(run) == 100  # 6 s a step: the 540 s left hold the 90 steps left
        run.state.update(elapsed_s=120.0)
        assert budget_end(run) == 50  # 12 s a step: 480 s, 40 steps
        run.state.update(elapsed_s=700.0)
        assert budget_end(run) == 10  # over budget: it stops here
        run.cfg.train.max_minutes = None
        assert budget_end(run) == 100


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_schedules_are_transformers_own(schedule):
    from transformers import get_scheduler

    from hemcap.train import SCHEDULES

    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_scheduler(name, optimizer, num_warmup_steps=5, num_training_steps=40).lr_lambdas[0]
    for step in [0, 1, 2.5, 5, 17.25, 39, 40, 41]:  # fractional steps: a time budget's position
        assert SCHEDULES[schedule](step, warmup=5, total=40) == pytest.approx(theirs(step), abs=1e-12), step


def test_precision_defaults_to_fp32_on_cpu_and_fp16_needs_cuda():
    from hemcap.config import ConfigError
    from hemcap.train import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert resolve_precision(None) == "fp32"
    assert resolve_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16")


@pytest.mark.parametrize("precision, lora, base_dtype", [
    ("fp32", True, torch.float32), ("fp16", True, torch.float16), ("bf16", True, torch.bfloat16),
    ("bf16", False, torch.float32)])
def test_the_base_takes_the_precision_under_lora_and_adapters_stay_fp32(data, tmp_path, precision, lora, base_dtype):
    from types import SimpleNamespace

    from hemcap.schema import load_schema
    from hemcap.train import build_backend

    cfg = tiny_blip(data, tmp_path, lora)
    split = load_prepared(data)[0]["train"]
    backend = build_backend(cfg, split, load_schema("wbcatt"), precision, tmp_path, None,
                            SimpleNamespace(is_main_process=True))
    for name, param in backend.model.named_parameters():
        expected = torch.float32 if param.requires_grad else base_dtype
        assert param.dtype == expected, name


# ------------------------------------------------------------------------------ resume: checked, durable


def lrs(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["split"] == "train"}


def test_a_resume_with_other_settings_is_refused_naming_each(data, tmp_path):
    from hemcap.config import ConfigError

    out = tmp_path / "run"
    fit(tiny_blip(data, out, max_steps=2))
    with pytest.raises(ConfigError) as error:
        fit(tiny_blip(data, out, max_steps=2, resume="auto", lr=1e-3, batch_size=4, seed=1))
    message = str(error.value)
    assert str(out / "checkpoints" / "step-00000002") in message and "--force" in message
    for change in ("train.lr: 0.002 → 0.001", "train.batch_size: 8 → 4", "train.seed: 0 → 1"):
        assert change in message
    with pytest.raises(ConfigError, match="total steps .*: 2 → 4"):  # cosine over 4 steps is another schedule
        fit(tiny_blip(data, out, max_steps=4, resume="auto"))
    # where files go, how often it logs, validates and saves, when it stops, how fast: all free
    fit(tiny_blip(data, out, max_steps=2, resume="auto", log_every=5, eval_every=1, keep_last=1, max_minutes=60,
                  threads=1, prefetch=0))


def test_force_resumes_with_the_new_settings(data, tmp_path, caplog):
    out = tmp_path / "run"
    constant = {"schedule": "constant", "warmup_ratio": 0.0}
    fit(tiny_blip(data, out, **constant))
    step_2 = out / "checkpoints" / "step-00000002"
    fit(tiny_blip(data, out, max_steps=6, resume="auto", **constant))  # a constant schedule: longer is no change
    assert sorted(lrs(out)) == [1, 2, 3, 4, 5, 6]
    with caplog.at_level(logging.WARNING, logger="hemcap.train"):
        fit(tiny_blip(data, out, resume=str(step_2), lr=1e-3, force=True, **constant))
    assert f"--force: resuming {step_2} with other settings" in caplog.text and "train.lr: 0.002 → 0.001" in caplog.text
    assert lrs(out) == {1: 2e-3, 2: 2e-3, 3: 1e-3, 4: 1e-3}  # the new rate, not the checkpoint's


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """An uninterrupted run: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fit(tiny_blip(data, out))
    return out


@pytest.mark.parametrize("file, damage", [("optimizer.pt", "empty"), ("model/model.safetensors", "zeroed"),
                                          ("scheduler.pt", "missing")])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(data, tmp_path, straight, caplog, file, damage):
    """What a power cut can leave of files renamed before they reached the disk: empty, zeros, or nothing."""
    out = tmp_path / "run"
    fit(tiny_blip(data, out))
    root = out / "checkpoints"
    bad = root / "step-00000004" / file
    if damage == "missing":
        bad.unlink()
        assert checkpoint.list_checkpoints(root) == [root / "step-00000002"]  # never listed lacking a file
    else:
        bad.write_bytes(b"" if damage == "empty" else bytes(bad.stat().st_size))
    with caplog.at_level(logging.WARNING, logger="hemcap.checkpoint"):
        fit(tiny_blip(data, out, resume="auto"))
    assert str(bad) in caplog.text  # the damaged file, named
    assert f"resuming from {root / 'step-00000002'} instead of the damaged step-00000004" in caplog.text
    assert losses(out) == losses(straight)
    checkpoint.verify_checkpoint(root / "step-00000004")  # saved again, whole


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(data, tmp_path, straight):
    out = tmp_path / "run"
    fit(tiny_blip(data, out))
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # killed after step 4's line, before its checkpoint
    with open(out / LOG_FILE, "a") as log_file:
        log_file.write('{"step": 5, "split": "tra')  # ... and in the middle of a line
    fit(tiny_blip(data, out, resume="auto"))
    assert losses(out) == losses(straight)


def test_checkpoints_from_before_manifests_resume_checked_by_loading(data, tmp_path, straight, caplog):
    out = tmp_path / "run"
    fit(tiny_blip(data, out))
    root = out / "checkpoints"
    for path in checkpoint.list_checkpoints(root):
        (path / "manifest.json").unlink(missing_ok=True)  # as hemcap wrote them before
    bad = root / "step-00000004" / "model" / "model.safetensors"
    os.truncate(bad, bad.stat().st_size // 2)
    assert len(checkpoint.list_checkpoints(root)) == 2  # listed: their files are there
    with caplog.at_level(logging.WARNING, logger="hemcap.checkpoint"):
        fit(tiny_blip(data, out, resume="auto"))
    assert f"{bad} does not load" in caplog.text and "instead of the damaged step-00000004" in caplog.text
    assert losses(out) == losses(straight)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_checkpoints_and_run_files_are_flushed_to_disk_around_their_renames(data, tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "run"
    fit(tiny_blip(data, out, max_steps=2))
    root = out / "checkpoints"
    final = root / "step-00000002"
    staged = root / ".step-00000002.tmp"  # flushed under its staging name, before the rename
    files = [p.relative_to(final) for p in final.rglob("*")]
    assert {staged / f for f in files} | {staged} <= set(synced), "every file and folder of the checkpoint"
    assert synced.index(root) > synced.index(staged), "its parent after the rename"
    assert any(p.name.startswith(".model.partial") for p in synced), "the final model, before its rename"
    assert out in synced, "the folder of config.yaml and the final model, after their renames"


# ------------------------------------------------------------------------------ a model knows its schema


def schema_dataset(root: Path, schema_ref, n: int = 24) -> Path:
    """A prepared dataset from a CSV in schema ``schema_ref`` (a name or a YAML path): random attribute
    values, small random images."""
    import csv

    import numpy as np
    from PIL import Image

    from hemcap.recipes import prepare_csv
    from hemcap.schema import load_schema

    schema, rng = load_schema(schema_ref), np.random.default_rng(0)
    columns = [schema.fields[name].column for name in schema.field_names]
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"cell{i}.png")
        values = [schema.values(name)[rng.integers(len(schema.values(name)))] for name in schema.field_names]
        rows.append([f"cell{i}.png", "train" if i < n - 8 else ("validation" if i < n - 4 else "test"), *values])
    with open(root / "cells.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", *columns], *rows])
    return prepare_csv(root / "cells.csv", root / "data", schema=schema_ref, n_paraphrases=1)


def own_schema(folder: Path):
    """A lab's own schema YAML (wbcatt's fields under another name, one extra synonym), and its path."""
    from hemcap.schema import load_schema

    raw = yaml.safe_load((REPO / "data_recipes" / "wbcatt.yaml").read_text())
    raw["name"] = "mylab"
    raw["fields"]["cell_type"]["values"]["Neutrophil"].append("segmented granulocyte")
    path = folder / "mylab.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, load_schema(path)


@pytest.mark.parametrize("which", ["leukemiaattri", "own_yaml"])
def test_a_checkpoint_moved_elsewhere_captions_and_parses_with_its_own_schema(tmp_path, which):
    import shutil

    from PIL import Image

    from hemcap.captions import render
    from hemcap.cli import main
    from hemcap.engine import CaptionEngine
    from hemcap.schema import load_schema

    (tmp_path / "lab").mkdir()
    if which == "own_yaml":
        yaml_path, schema = own_schema(tmp_path)
    else:
        yaml_path, schema = "leukemiaattri", load_schema("leukemiaattri")
    data = schema_dataset(tmp_path / "lab", yaml_path)
    fit(tiny_blip(data, tmp_path / "run", max_steps=4, save_every=None, eval_every=2, keep_last=3))
    moved = tmp_path / "elsewhere" / "step-2"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000002", moved)  # mid-run, not the final model
    if which == "own_yaml":
        yaml_path.unlink()

    engine = CaptionEngine.from_dir(moved)  # the checkpoint folder itself loads as a model
    assert engine.schema.name == schema.name and engine.schema.field_names == schema.field_names
    example = {name: schema.values(name)[-1] for name in schema.field_names}
    assert engine.parser.parse(render(example, schema)) == example  # the embedded vocabulary, not wbcatt's
    (caption,) = engine.caption([Image.open(tmp_path / "lab" / "cell0.png")])
    assert set(caption.attributes) == set(schema.field_names)
    assert main(["caption", str(tmp_path / "lab" / "cell0.png"), "--cell", "--model", str(moved),
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "cell0.json").read_text())
    assert set(report["cells"][0]["attributes"]) == set(schema.field_names)
    assert main(["eval", "--model", str(moved), "--data", str(data), "--split", "validation",
                 "--out", str(tmp_path / "eval"), "--no-meteor"]) == 0
    predictions = str(tmp_path / "eval" / "predictions.jsonl")
    score = ["score", predictions, "--no-meteor", "--no-plots", "--out", str(tmp_path / "score")]
    if which == "own_yaml":  # its lines name a schema hemcap does not ship: the model folder gives it
        assert main(score) == 2
        assert main([*score, "--schema", str(moved)]) == 0
    else:
        assert main(score) == 0


def test_a_folder_without_model_info_fails_with_one_sentence(tmp_path, capsys):
    from hemcap.cli import main

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    assert main(["caption", str(REPO / "demo" / "examples" / "cell_neutrophil.png"), "--model",
                 str(tmp_path / "weights"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"{tmp_path / 'weights'} is not a hemcap model folder" in error
    assert "hemcap_model.json" in error


@pytest.mark.parametrize("stain_norm, crop", [("none", 1.0), ("anchors", 1.0), ("anchors", 0.75)])
def test_validation_figures_equal_hemcap_eval_on_the_same_split(data, tmp_path, stain_norm, crop):
    from hemcap.cli import main

    out = tmp_path / "run"
    cfg = tiny_blip(data, out, max_steps=4, save_every=None)
    cfg.data.stain_norm, cfg.data.centre_crop = stain_norm, crop
    fit(cfg)
    info = read_model_info(out / "model")
    validation = info.training["metrics"]
    assert info.colour["normalisation"] == stain_norm and info.magnification["field_px"] == 32  # the domain it saw
    assert info.centre_crop == crop  # and the part of it the model was given: eval crops the same
    assert main(["eval", "--model", str(out / "model"), "--data", str(data), "--split", "validation",
                 "--out", str(tmp_path / "eval"), "--no-meteor"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    faith = metrics["faithfulness"]
    assert validation["attribute_accuracy"] == faith["attribute_mean"]["accuracy"]
    assert validation["cell_type_accuracy"] == faith["fields"]["cell_type"]["accuracy"]
    assert validation["cider"] == metrics["caption"]["cider_d"]
    assert validation["bleu_4"] == metrics["caption"]["bleu_4"]
    assert metrics["meta"]["stain_norm"] == ("off" if stain_norm == "none" else stain_norm)
    assert metrics["meta"]["refined"] == []  # no refiner: every value is the caption's
    assert main(["eval", "--model", str(out / "model"), "--data", str(data), "--split", "validation",
                 "--out", str(tmp_path / "raw"), "--no-meteor", "--no-stain-norm"]) == 0
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["meta"]["stain_norm"] == "off"


def test_restained_copies_are_decoded_once_each_beside_the_training_images(data, tmp_path, caplog):
    cfg = tiny_blip(data, tmp_path / "run", max_steps=2, save_every=None)
    cfg.data.stain_norm, cfg.data.cache_dir, cfg.augment.restain = "stain", str(tmp_path / "cache"), 1.0

    def caches() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("pixels-*.npy")
                if not p.name.endswith(".rows.npy")}

    with caplog.at_level(logging.INFO, logger="hemcap.train"):
        fit(cfg)
    assert "2 restained copies of the training images (augment.restain 1.0)" in caplog.text
    first = caches()
    assert len(first) == 4  # training images, their 2 restained copies, validation images
    cfg.train.output_dir = str(tmp_path / "again")
    fit(cfg)
    assert caches() == first  # decoded once: the second run reads them


def test_train_refine_fits_the_refiner_and_captions_state_its_value(data, tmp_path, capsys):
    from hemcap.captions import render
    from hemcap.cli import main
    from hemcap.config import ConfigError
    from hemcap.engine import Caption, CaptionEngine
    from hemcap.models import load_trained, refiner
    from hemcap.recipes import get_split
    from hemcap.refine import refined

    model = fit(tiny_blip(data, tmp_path / "run", heads=1.0, stem="conv", refine=["nucleus_shape"]))
    spec = read_model_info(model).refiner
    assert spec["fields"] == {"nucleus_shape": 6} and spec["cells"] == 24 and (model / refiner.REFINER_FILE).is_file()
    scores = spec["validation"]["nucleus_shape"]  # on the 4 validation cells, beside training's own validation
    assert scores["refiner"] in (0, 0.25, 0.5, 0.75, 1)
    assert scores["captions"] == read_model_info(model).training["metrics"]["field_accuracy"]["nucleus_shape"]
    engine = CaptionEngine.from_dir(model)
    rows = list(get_split(load_prepared(data)[0], "val"))
    passes = {}
    for refined_by in (None, engine.backend.refiner):  # the heads come from the captioning pass: no second one
        engine.backend.refiner, calls = refined_by, []
        hook = engine.backend.model.vision_model.register_forward_hook(lambda *_: calls.append(1))
        assert len(engine.caption_rows(rows)) == len(rows)  # the refiner runs inside the one decoding path
        hook.remove()
        passes[refined_by is None] = len(calls)
    assert passes[True] == passes[False] > 0
    seen = engine.model_rows(rows[:2])
    with torch.inference_mode():
        heads = engine.backend.generate_scored(seen, engine.settings).heads
        again = engine.backend.attribute_logprobs(seen)
    assert heads.keys() == again.keys() and all(torch.allclose(heads[k], again[k], atol=1e-5) for k in heads)
    assert main(["eval", "--model", str(model), "--data", str(data), "--split", "validation",
                 "--out", str(tmp_path / "eval"), "--no-meteor"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]["refined"] == ["nucleus_shape"]
    assert main(["refine", "--model", str(model), "--data", str(data), "--fields", "nucleus_shape",
                 "--cells", "12"]) == 0
    assert "nucleus_shape: " in capsys.readouterr().out and read_model_info(model).refiner["cells"] == 12  # refitted
    again = load_trained(engine.backend.save(tmp_path / "again")).refiner  # a re-saved folder keeps it
    assert torch.equal(again.linear["nucleus_shape"].weight, engine.backend.refiner.linear["nucleus_shape"].weight)
    wanted = refined(engine.backend, seen)[0]["nucleus_shape"]
    stated = {name: rows[0][name] for name in engine.schema.field_names}
    complete = Caption("as generated", [], [], dict(stated), dict.fromkeys(stated, 0.5))
    partial = Caption("as generated", [], [], {**stated, "cell_size": None}, dict.fromkeys(stated, 0.5))
    complete, partial = engine._refined([complete, partial], seen)
    assert (complete.attributes["nucleus_shape"], complete.confidences["nucleus_shape"]) == wanted
    assert complete.text == render(complete.attributes, engine.schema)
    assert (partial.text, partial.attributes["nucleus_shape"]) == ("as generated", stated["nucleus_shape"])
    with pytest.raises(ConfigError, match="train.refine: the refiner reads the attribute heads"):
        tiny_blip(data, tmp_path / "x", refine=["nucleus_shape"])
    with pytest.raises(ConfigError, match="train.refine: field 'lobes' is not in the model's schema"):
        fit(tiny_blip(data, tmp_path / "y", heads=1.0, refine=["lobes"]))  # at once, not after training
    assert not (tmp_path / "y" / "checkpoints").exists()
