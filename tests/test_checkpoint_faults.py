"""Fault injection: a training run SIGKILLed at 20 points of checkpoint writing, then resumed, ends
with the weights of an unkilled run, bit for bit, and no listed checkpoint ever lacks a file.

The points are ``hemcap.fileio.fault_point`` calls, armed by ``HEMCAP_FAULT_AT`` (the list is in
``hemcap.checkpoint``'s docstring). A run saves at steps 2, 4 and 6 and keeps one checkpoint
besides the best, so the second and third saves prune. Each run is a process forked from a
forkserver that imported torch, transformers and hemcap once: a fresh interpreter spends ~4 s
importing, a forked run ~1 s, and there are 42 runs here, one at a time.
"""

import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import yaml

from hemcap import checkpoint
from hemcap.config import RunConfig
from hemcap.fileio import FAULT_ENV
from hemcap.recipes import prepare_synthetic

pytestmark = pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                                reason="forks runs from a forkserver (POSIX)")

# Each case: where successive runs are killed; a last, unkilled run with --resume auto follows.
CASES = [
    ["checkpoint:staged"], ["checkpoint:rng"], ["write:hemcap_model.json"], ["checkpoint:model"],
    ["checkpoint:optimizer"], ["checkpoint:scheduler"], ["checkpoint:scaler"], ["checkpoint:state"],
    ["checkpoint:manifest"], ["checkpoint:synced"], ["checkpoint:renamed"],  # the first save (step 2)
    ["checkpoint:pruned", "write:config.yaml"],  # then the resumed run, rewriting config.yaml
    ["checkpoint:staged#2"], ["checkpoint:optimizer#2"], ["checkpoint:synced#2"], ["checkpoint:renamed#2"],
    ["prune:moved"], ["prune:removed"],  # the second save (step 4) prunes step 2
    ["checkpoint:renamed#3"],  # the last save (step 6), before it prunes step 4
    ["stage:model"],  # the final model copied from the best checkpoint, not yet in place
]
# What a run imports, lazily, on its way: 3 s a run when each child imports it again.
PRELOAD = ["hemcap.train", "hemcap.engine", "hemcap.metrics", "hemcap.smear.pipeline", "hemcap.models.blip_attention",
           "torch.utils.tensorboard", "torch._inductor.pattern_matcher", "transformers.models.blip.modeling_blip",
           "transformers.models.blip.processing_blip", "transformers.models.blip.image_processing_pil_blip",
           "transformers.optimization", "datasets", "peft", "nltk", "networkx", "scipy.stats", "skimage.morphology",
           "bitsandbytes", "pycocoevalcap.bleu.bleu", "pycocoevalcap.cider.cider",
           "tests.forkserver_preload"]  # found from the repository root, where pytest runs
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "cells", n_train=16, n_val=2, n_test=2, size=32)


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def tiny_run(data: Path, out: Path, resume: str | None = None) -> dict:
    """Six steps of a one-layer BLIP with dropout (resuming must restore the random state), saved every 2."""
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    return {
        "model": {"backend": "blip", "init": "scratch", "name_or_path": None, "vocab_size": 300, "max_length": 64,
                  "vision_config": {"image_size": 32, "patch_size": 8, **layers},
                  "text_config": {**layers, "max_position_embeddings": 96, "hidden_dropout_prob": 0.1}},
        "data": {"path": str(data), "captions": "variants"},
        "augment": {"color_jitter": 0.1},
        "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 6, "lr": 2e-3, "log_every": 1,
                  "save_every": 2, "keep_last": 1, "threads": 1, "prefetch": 0, "resume": resume},
        "eval": {"batch_size": 2, "max_new_tokens": 4},
    }


def _train(raw: dict, fault: str | None) -> None:
    """A forked run, armed with ``fault`` when given; its output goes to ``<output_dir>.log``."""
    if fault:
        os.environ[FAULT_ENV] = fault
    with open(f"{raw['train']['output_dir']}.log", "a") as log_file:  # progress bars: 42 runs of them
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    logging.basicConfig(level=logging.INFO)
    from hemcap.train import fit

    fit(RunConfig.from_dict(raw))


def run(context, raw: dict, fault: str | None = None, target=_train, expected=(0, -signal.SIGKILL)) -> int:
    """The exit code of a run (-9: killed); an unexpected one fails the test with the run's output."""
    process = context.Process(target=target, args=(raw, fault))
    process.start()
    process.join(RUN_TIMEOUT_S)
    if process.exitcode is None:
        process.kill()
    if process.exitcode not in expected:
        output = Path(f"{raw['train']['output_dir']}.log").read_text()[-3000:]
        pytest.fail(f"run {raw['train']['output_dir']} armed with {fault}: exit {process.exitcode}\n{output}")
    return process.exitcode


def weights(out: Path) -> dict:
    """The final model's tensors and the last checkpoint's."""
    from safetensors.torch import load_file

    last = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    return {"model": load_file(out / "model" / "model.safetensors"),
            "last checkpoint": load_file(last / checkpoint.MODEL_SUBDIR / "model.safetensors")}


def assert_nothing_half_written(out: Path, killed_at: str) -> None:
    """Every visible checkpoint folder is listed and matches its manifest; config.yaml is whole."""
    root = out / "checkpoints"
    visible = sorted(p for p in root.glob("step-*")) if root.is_dir() else []
    assert visible == checkpoint.list_checkpoints(root), f"killed at {killed_at}: a folder is half-written"
    for path in visible:
        checkpoint.verify_checkpoint(path)
    if (out / "config.yaml").exists():  # whole: every section, and it still checks
        assert RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())).train.max_steps == 6, killed_at


def killed_and_resumed(context, data: Path, out: Path, faults: list[str]) -> dict:
    for n, fault in enumerate(faults):
        code = run(context, tiny_run(data, out, "auto" if n else None), fault)
        assert code == -signal.SIGKILL, f"the run armed with {fault} ended with {code}, not killed there"
        assert_nothing_half_written(out, fault)
    assert run(context, tiny_run(data, out, "auto")) == 0, f"resuming after {faults} failed"
    return weights(out)


def test_a_run_killed_anywhere_in_a_save_resumes_to_the_same_weights(data, tmp_path, forkserver):
    import torch

    assert run(forkserver, tiny_run(data, tmp_path / "straight")) == 0  # also fills the pixel cache
    straight = weights(tmp_path / "straight")
    # One run at a time: with two threads starting and joining runs through the one forkserver, a run's
    # exit status was lost now and then (CPython reports 255), in about 1 of 4 tests (2026-11-29).
    resumed = {"+".join(faults): killed_and_resumed(forkserver, data, tmp_path / f"case{n}", faults)
               for n, faults in enumerate(CASES)}
    for name, found in resumed.items():
        for which, tensors in found.items():
            assert tensors.keys() == straight[which].keys()
            unequal = [k for k in tensors if not torch.equal(tensors[k], straight[which][k])]
            assert not unequal, f"killed at {name}: the {which} differs in {unequal[:3]}"


def _train_on_a_full_disk(raw: dict, max_bytes: str) -> None:
    """A forked run that may write no file past ``max_bytes`` (RLIMIT_FSIZE: as a full disk or quota)."""
    import resource
    import traceback

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(max_bytes), resource.RLIM_INFINITY))
    try:
        _train(raw, None)
    except OSError as error:  # a few bytes, under the limit: the error number and the functions it passed
        calls = " ".join(frame.name for frame in traceback.extract_tb(error.__traceback__))
        Path(f"{raw['train']['output_dir']}.error").write_text(f"{error.errno} {calls}")
        raise


def test_a_config_write_that_fails_midway_leaves_the_old_config_whole(data, tmp_path, forkserver):
    import errno

    out = tmp_path / "run"
    assert run(forkserver, tiny_run(data, out)) == 0
    before = (out / "config.yaml").read_text()
    Path(f"{out}.log").write_text("")  # the resumed run's output must fit under the limit too
    resumed = tiny_run(data, out, "auto")
    run(forkserver, resumed, str(len(before) // 2), target=_train_on_a_full_disk, expected=(1,))
    error = Path(f"{out}.error").read_text()
    assert error.startswith(str(errno.EFBIG)) and "_start_logs" in error, error  # it failed writing config.yaml
    assert (out / "config.yaml").read_text() == before
