"""Training input memory and speed: the memory-mapped, prefetched input path against the old one.

Each measurement runs in a fresh child process.

- **memory**: ``--images`` uint8 images at ``--size`` px in a pixel cache, then ``--batches``
  batches of ``--batch`` in an epoch's random order through the real input path:
  ``map_split`` (the cache memory-mapped) -> ``TrainBatches`` (a batch's rows read, augmented)
  -> ``Prefetcher`` -> ``collate`` of a BLIP processor at ``--size`` px (BlipImageProcessor and
  a WordPiece tokenizer, no model weights). The cache holds cheap random-ish pixels written
  straight into the ``.npy`` (drawing 20,000 cells would take an hour); decoding is not timed.
  Figures from /proc/self/status: VmHWM, the peak resident set, counts anonymous memory and the
  pages of the mapped cache alike; RssAnon and RssFile split it (their peaks sampled every 5 ms).
  ``--unreleased`` adds a run that skips ``inputs.release``, to show what the mapped pages do.
- **speed**: samples/s of ``hemcap.train.train_step`` on ``configs/quickstart.yaml`` (BLIP from
  scratch, 96 px, batch 32, bf16 where the CPU has it) on ``--train-images`` synthetic cells,
  built by ``hemcap.train.setup``. The old path (the whole cache copied into memory, batches
  built on the training thread) and the new one (memory-mapped, built on the prefetch thread)
  alternate in one process, ``--rounds`` times each for ``--seconds`` s after 2 untimed steps,
  so that load from other processes falls on both; the ratio is of their totals.

    python eval/bench_input_memory.py                               # 20,000 images at 384 px
    python eval/bench_input_memory.py --images 2000 --size 96 --batches 30 --seconds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITE_CHUNK = 256  # images per write while filling the cache: 113 MB at 384 px


class FakeSplit:
    """What ``map_split`` reads of a dataset split when its cache exists: a fingerprint and a length."""

    def __init__(self, n: int):
        self._fingerprint, self.n = "bench-input-memory", n

    def __len__(self) -> int:
        return self.n


# ------------------------------------------------------------------------------ memory


def fill_cache(cache_dir: Path, images: int, size: int) -> Path:
    """A pixel cache of ``images`` random-ish uint8 images, written a chunk at a time."""
    import numpy as np

    from hemcap.inputs import _cache_path, release

    path = _cache_path(FakeSplit(images), (size, size), cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".rows.npy"), np.arange(images, dtype=np.int64))
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(images, 3, size, size))
    noise = np.random.default_rng(0).integers(0, 256, (WRITE_CHUNK, 3, size, size), dtype=np.uint8)
    for start in range(0, images, WRITE_CHUNK):
        stop = min(images, start + WRITE_CHUNK)
        pixels[start:stop] = noise[: stop - start] ^ np.uint8(start // WRITE_CHUNK)  # each chunk differs
        release(pixels)
    pixels.flush()
    return path


def status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class PeakSampler:
    """Peaks of RssAnon and RssFile, sampled every 5 ms on a thread (the kernel keeps only VmHWM)."""

    def __init__(self):
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            now = status()
            self.peaks = {k: max(v, now[k]) for k, v in self.peaks.items()}

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def blip_collate(size: int):
    """BlipBackend.collate with a BLIP processor at ``size`` px and a caption tokenizer; no model weights."""
    from types import SimpleNamespace

    from transformers import BlipImageProcessor, BlipProcessor

    from hemcap.captions import caption_variants
    from hemcap.models import BlipBackend, train_wordpiece
    from hemcap.synthetic import make_cells

    captions = [c for _, a in make_cells(40, seed=5, size=32) for c in caption_variants(a, n_paraphrases=2)]
    tokenizer = train_wordpiece(captions, 400)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(bos_token_id=tokenizer.cls_token_id)))
    return BlipBackend(model, processor, {"max_length": 64}).collate, captions


def measure_memory(cache_dir: str, images: int, size: int, batches: int, batch: int, release: bool) -> dict:
    """Peak memory of ``batches`` batches through the input path (runs inside the child)."""
    from hemcap import inputs
    from hemcap.config import AugmentConfig
    from hemcap.train import micro_inputs

    if not release:
        inputs.release = lambda pixels: None
    collate, captions = blip_collate(size)
    before = status()
    pixels, rows = inputs.map_split(FakeSplit(images), (size, size), cache_dir)
    train = inputs.TrainBatches(pixels, [[captions[r % len(captions)]] for r in rows], batch,
                                AugmentConfig(color_jitter=0.1, stain_jitter=0.1), seed=0, variants=False)
    started = time.perf_counter()
    with PeakSampler() as sampler, inputs.Prefetcher(functools.partial(micro_inputs, train, collate)) as prefetch:
        for step in range(batches):
            prefetch(step)
    seconds = time.perf_counter() - started
    after = status()
    return {"release": release, "images": images, "size": size, "batches": batches, "batch": batch,
            "cache_bytes": pixels.nbytes, "start_rss": before["VmRSS"], "vmhwm": after["VmHWM"],
            **{f"peak_{k}": v for k, v in sampler.peaks.items()}, "batches_per_s": batches / seconds}


# ------------------------------------------------------------------------------ speed


def measure_speed(workdir: str, train_images: int, seconds: float, rounds: int) -> dict:
    """samples/s of train_step, old and new input paths alternated (runs inside the child)."""
    import numpy as np
    import torch

    from hemcap.config import load_config
    from hemcap.recipes import prepare_synthetic
    from hemcap.train import setup

    data = Path(workdir) / "cells"
    if not data.exists():
        prepare_synthetic(data, n_train=train_images, n_val=8, n_test=8, size=96)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.max_steps=1000000", "train.max_minutes=null"],
                      data=str(data), output_dir=str(Path(workdir) / "run"), overwrite=True)
    run = setup(cfg)
    old = copy.copy(run.batches)
    old.pixels = torch.from_numpy(np.array(run.batches.pixels))  # what decode_split returned before
    paths = {"old": (old, None), "new": (run.batches, run.inputs)}
    results, step = {"old": [], "new": []}, 0
    for name in ["old", "new"] * rounds:
        run.batches, run.inputs = paths[name]
        rate, step = _timed_steps(run, step, seconds)
        results[name].append(rate)
        if run.inputs:
            run.inputs.close()
    return {"threads": torch.get_num_threads(), "precision": run.accelerator.mixed_precision,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "train_images": len(run.train_ids), "batch": cfg.train.batch_size, "rounds": results}


def _timed_steps(run, step: int, seconds: float) -> tuple[float, int]:
    """samples/s over ``seconds`` of steps after 2 untimed ones (the prefetch thread restarts); the next step."""
    from hemcap.train import train_step

    for _ in range(2):
        train_step(run, step)
        step += 1
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        train_step(run, step)
        step, done = step + 1, done + 1
    return done * run.batches.global_batch / (time.perf_counter() - started), step


# ------------------------------------------------------------------------------ parent


def run_child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(args: list) -> dict:
    sys.path.insert(0, str(ROOT))
    kind, *rest = args
    if kind == "memory":
        cache_dir, images, size, batches, batch, release = rest
        return measure_memory(cache_dir, int(images), int(size), int(batches), int(batch), release == "1")
    workdir, train_images, seconds, rounds = rest
    return measure_speed(workdir, int(train_images), float(seconds), int(rounds))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(memory: list[dict], speed: dict | None, command: str, load: str) -> str:
    lines = [f"command: {command}", f"load average before / after: {load}", ""]
    if memory:
        m = memory[0]
        lines += [f"memory: {m['images']:,} images at {m['size']} px (cache {gib(m['cache_bytes'])}), "
                  f"{m['batches']} batches of {m['batch']} in random order, BLIP processor collate", "",
                  "| input path | peak RSS (VmHWM) | peak RssAnon | peak RssFile | RSS before the cache | batches/s |",
                  "|---|---|---|---|---|---|"]
        for m in memory:
            name = "memory-mapped + prefetch" + ("" if m["release"] else ", without release")
            lines.append(f"| {name} | {gib(m['vmhwm'])} | {gib(m['peak_RssAnon'])} | {gib(m['peak_RssFile'])} | "
                         f"{gib(m['start_rss'])} | {m['batches_per_s']:.1f} |")
        lines.append(f"| old: the cache copied into memory (not run) | >= {gib(m['cache_bytes'])} | | | | |")
    if speed:
        old, new = speed["rounds"]["old"], speed["rounds"]["new"]
        ratio = statistics.median(n / o for o, n in zip(old, new))
        lines += ["", f"speed: configs/quickstart.yaml, {speed['train_images']:,} training images, batch "
                  f"{speed['batch']}, {speed['precision']}, {speed['threads']} torch threads, OMP_WAIT_POLICY "
                  f"{speed['omp_wait_policy']}; old and new alternated",
                  "", "| round | old samples/s | new samples/s | new / old |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {o:.1f} | {n:.1f} | {n / o:.3f} |" for i, (o, n) in enumerate(zip(old, new))]
        lines.append(f"| all rounds | {sum(old) / len(old):.1f} | {sum(new) / len(new):.1f} | "
                     f"**{sum(new) / sum(old):.3f}** (median of rounds {ratio:.3f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="images in the memory test's cache")
    parser.add_argument("--size", type=int, default=384, help="their side in px")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=1000, help="synthetic cells for the speed test")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per round and path")
    parser.add_argument("--rounds", type=int, default=5, help="old/new alternations")
    parser.add_argument("--unreleased", action="store_true", help="also run the memory test without release")
    parser.add_argument("--skip", choices=["memory", "speed"], help="run only the other measurement")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the cache goes (8.8 GB by default)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    memory, speed, load = [], None, "%.1f" % os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_input_memory-") as tmp:
        if args.skip != "memory":
            sys.path.insert(0, str(ROOT))
            fill_cache(Path(tmp) / "cache", args.images, args.size)
            memory = [run_child("memory", str(Path(tmp) / "cache"), *map(str, (args.images, args.size, args.batches,
                                args.batch)), release) for release in ("1", "0")[: 1 + args.unreleased]]
            shutil.rmtree(Path(tmp) / "cache")
        if args.skip != "speed":
            speed = run_child("speed", tmp, str(args.train_images), str(args.seconds), str(args.rounds))
    load += " / %.1f" % os.getloadavg()[0]
    print(report(memory, speed, "python eval/bench_input_memory.py " + " ".join(sys.argv[1:]), load))
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": memory, "speed": speed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
