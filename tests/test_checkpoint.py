"""Checkpoint pieces without a training run: fp16's loss scale, what a resume may change."""

import pytest
import torch

from hemcap import checkpoint
from hemcap.config import RunConfig


def overflowed_scaler() -> torch.amp.GradScaler:
    """A loss scaler that has seen one overflowing step: its scale halved from 1024 to 512."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=100)
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale(weight.sum() * float("inf")).backward()
    scaler.step(optimizer)  # skipped: the gradient is not finite
    scaler.update()
    return scaler


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path, tiny_blip_dir):
    """accelerate keeps fp16's GradScaler in ``accelerator.scaler``: a resume must not restart it at 65536."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from hemcap.models import load_trained

    backend = load_trained(tiny_blip_dir)
    optimizer = torch.optim.AdamW(backend.model.parameters(), lr=1e-3)
    scheduler = get_scheduler("constant", optimizer)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = overflowed_scaler()  # what Accelerator(mixed_precision="fp16") holds on a GPU
    path = checkpoint.save_checkpoint(tmp_path, 3, backend, optimizer, scheduler, {"step": 3}, accelerator)
    assert (path / "scaler.pt").is_file()

    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=100)
    checkpoint.load_training_state(path, optimizer, scheduler, scaler=fresh)
    assert fresh.get_scale() == 512.0 and fresh.state_dict() == accelerator.scaler.state_dict()


def saved(config: RunConfig, **resolved) -> dict:
    """A trainer state as a checkpoint holds it."""
    return {"step": 2, "config": config.to_dict(), **resolved}


def test_resume_changes_name_each_setting_that_changes_training():
    old = RunConfig()
    new = RunConfig.from_dict({"train": {"lr": 1e-4, "batch_size": 4, "precision": "bf16"},
                               "augment": {"flip": False}, "model": {"vision_config": {"image_size": 64}}})
    changes = checkpoint.resume_changes(saved(old, precision="fp32"), {"config": new.to_dict(), "precision": "bf16"})
    assert changes == ['model.vision_config: {} → {"image_size": 64}', "augment.flip: true → false",
                       "train.batch_size: 8 → 4", "train.lr: 5e-05 → 0.0001", "train.precision: null → bf16",
                       "precision (train.precision as resolved): fp32 → bf16"]


@pytest.mark.parametrize("key, value", [("output_dir", "elsewhere"), ("eval_every", 50), ("log_every", 1),
                                        ("max_minutes", 30.0), ("threads", 2), ("keep_last", 5), ("resume", "auto"),
                                        ("max_steps", 100), ("patience", 3)])
def test_resume_changes_let_paths_logging_stopping_and_speed_change(key, value):
    old, new = RunConfig(), RunConfig()
    setattr(new.train, key, value)
    assert checkpoint.resume_changes(saved(old), {"config": new.to_dict()}) == []


@pytest.mark.parametrize("schedule, warmup, refused", [("cosine", 0.0, True), ("constant", 0.1, True),
                                                       ("constant", 0.0, False)])
def test_a_longer_run_changes_training_unless_the_schedule_ignores_its_length(schedule, warmup, refused):
    config = RunConfig.from_dict({"train": {"schedule": schedule, "warmup_ratio": warmup}})
    changes = checkpoint.resume_changes(saved(config, total_steps=100), {"total_steps": 200})
    assert bool(changes) is refused


@pytest.mark.parametrize("over, refused", [("steps", False), ("budget", True)])
def test_a_new_time_budget_changes_training_only_where_the_schedule_spans_it(over, refused):
    old = RunConfig.from_dict({"train": {"schedule_over": over, "max_minutes": 60}})
    new = RunConfig.from_dict({"train": {"schedule_over": over, "max_minutes": 30}})
    changes = checkpoint.resume_changes(saved(old), {"config": new.to_dict()})
    assert changes == (["train.max_minutes: 60.0 → 30.0"] if refused else [])


def test_a_setting_an_older_checkpoint_does_not_record_is_not_compared():
    state = saved(RunConfig())
    del state["config"]["augment"]["noise"]
    new = RunConfig.from_dict({"augment": {"noise": 0.1}})
    assert checkpoint.resume_changes(state, {"config": new.to_dict()}) == []
