"""hemcap.threads: the free-core default, explicit requests, the /proc parsing, and --threads on the CLI."""

import os
import subprocess
import sys
import time

import pytest

from hemcap import threads
from hemcap.cli import build_parser
from hemcap.config import ConfigError, RunConfig, config_from_args

PROC_STAT = """\
cpu  300 10 100 1000 20 0 5 7 0 0
cpu0 100 0 50 600 10 0 2 3 0 0
cpu1 200 10 50 400 10 0 3 4 0 0

intr 1234 0 0
ctxt 5678
cpu2 0 0 0 0
"""
LATER = """\
cpu  0 0 0 0 0 0 0 0 0 0
cpu0 150 0 60 680 10 0 2 3 0 0
cpu1 290 10 60 400 30 0 3 4 0 0
"""
CPUS = list(range(len(threads.allowed_cpus())))


@pytest.fixture
def no_request(monkeypatch):
    """No OMP_NUM_THREADS, no launcher: the default applies."""
    for name in ("OMP_NUM_THREADS", threads.ACCELERATE_MARK, *threads.LOCAL_SIZE_VARS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that changes it."""
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.fixture
def busy_sibling():
    """A process spinning on one of our cores, running by the time the test reads the load."""
    spin = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
    process = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # the interpreter starts and reaches its loop
        yield process
    finally:
        process.kill()
        process.wait()


def test_parse_proc_stat_reads_each_cpu_busy_and_total():
    assert threads.parse_proc_stat(PROC_STAT) == {0: (155, 765), 1: (267, 677), 2: (0, 0)}


def test_parse_self_stat_survives_spaces_and_brackets_in_the_name():
    text = "4242 (my (odd) name) R 1 2 3 4 5 6 7 8 9 10 123 45 0 0 20 0 3 0"
    assert threads.parse_self_stat(text) == 123 + 45


def test_others_busy_subtracts_our_own_time_and_keeps_to_our_cpus():
    before = threads.Snapshot(threads.parse_proc_stat(PROC_STAT), own=0)
    after = threads.Snapshot(threads.parse_proc_stat(LATER), own=40)
    # cpu0: +60 busy of +140; cpu1: +100 busy (iowait is idle) of +120; 130 ticks elapsed per cpu
    assert threads.others_busy(before, after, {0, 1}) == pytest.approx((160 - 40) / 130)
    assert threads.others_busy(before, after, {0}) == pytest.approx((60 - 40) / 140)
    assert threads.others_busy(before, after, {7}) == 0.0  # a cpu /proc/stat does not list


def test_half_a_core_of_other_work_counts_as_a_busy_core():
    assert [threads.busy_count(x) for x in (0.0, 0.49, 0.5, 0.67, 1.2, 1.6)] == [0, 0, 1, 1, 1, 2]


def test_an_explicit_request_wins(no_request, monkeypatch):
    assert threads.choose_threads(len(CPUS) + 3) == len(CPUS) + 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(2) == 2
    assert threads.choose_threads(None) == 1  # the user's OMP_NUM_THREADS is a request too


def test_omp_num_threads_written_by_accelerate_launch_is_not_a_request(no_request, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(threads.ACCELERATE_MARK, "no")
    assert threads.env_request() is None


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_a_bad_count_is_refused_clearly(bad):
    with pytest.raises(ValueError, match="threads=.* should be > 0"):
        threads.choose_threads(bad)


def test_the_default_is_at_least_one_and_at_most_our_cores(no_request):
    assert 1 <= threads.free_cores() <= len(CPUS)
    assert 1 <= threads.choose_threads(None) <= len(CPUS)
    assert threads.choose_threads(None, processes=len(CPUS) + 1) == 1  # each process's share, never 0


def test_launchers_tell_the_local_process_count(no_request, monkeypatch):
    assert threads.local_processes() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.local_processes() == 4


def test_use_threads_sets_torch_and_can_be_called_again(torch_threads):
    assert threads.use_threads(1) == 1 and torch_threads.get_num_threads() == 1
    threads.use_threads(2)  # inter-op threads can be set only once: the second call must not raise
    assert torch_threads.get_num_threads() == 2


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 cores: one for the busy sibling")
def test_a_busy_sibling_lowers_the_free_cores(no_request, busy_sibling):
    assert threads.free_cores(sample_s=0.5) <= len(CPUS) - 1


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 cores: one for the busy sibling")
def test_the_watch_follows_the_load_during_training(no_request, torch_threads, busy_sibling):
    torch_threads.set_num_threads(len(CPUS))
    watch = threads.ThreadWatch(None, every_s=0.0)
    time.sleep(0.5)
    assert watch.tick() is not None and torch_threads.get_num_threads() <= len(CPUS) - 1


def test_the_watch_stays_still_when_the_count_is_forced_or_shared(no_request):
    assert threads.ThreadWatch(2, every_s=0.0).tick() is None
    assert not threads.ThreadWatch(None, processes=2).active


def test_importing_it_imports_no_torch():
    code = "import sys, hemcap.threads; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()}).returncode == 0


@pytest.mark.parametrize("command", [
    ["train", "--config", "c.yaml"], ["caption", "x.png", "--model", "m", "--out", "o"],
    ["eval", "--model", "m", "--data", "d", "--out", "o"], ["demo"]])
def test_every_model_running_command_takes_threads(command):
    assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3


def test_threads_reaches_the_training_config_and_zero_is_refused():
    args = build_parser().parse_args(["train", "--threads", "3"])
    assert config_from_args(args).train.threads == 3
    assert config_from_args(build_parser().parse_args(["train"])).train.threads is None
    with pytest.raises(ConfigError, match=r"train\.threads=0 should be > 0"):
        config_from_args(build_parser().parse_args(["train", "--threads", "0"]))
    with pytest.raises(ConfigError, match=r"train\.threads=0 should be > 0"):
        RunConfig.from_dict({"train": {"threads": 0}})


def test_setup_applies_the_configs_threads(tmp_path, torch_threads):
    from hemcap.recipes import prepare_synthetic
    from hemcap.train import setup

    data = prepare_synthetic(tmp_path / "cells", n_train=8, n_val=2, n_test=1, size=32)
    model = {"backend": "blip", "init": "scratch", "name_or_path": None, "vocab_size": 300, "max_length": 64,
             "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 2},
             "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "max_position_embeddings": 96}}
    torch_threads.set_num_threads(2)
    setup(RunConfig.from_dict({"model": model, "data": {"path": str(data)},
                               "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "threads": 1}}))
    assert torch_threads.get_num_threads() == 1
