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
  scratch, 96 px, batch 32, bf16 where the CPU has it) on ``--train-images`` synthetic cells
  (drawn by the parent), built by ``hemcap.train.setup``. The old path (the whole cache copied
  into memory, batches built on the training thread), the new one as ``setup`` chooses it, and
  the new one on a prefetch thread (running one torch thread, and torch's default) alternate in
  one process, ``--rounds`` times each for ``--seconds`` s after 2 untimed steps, so that load
  from other processes falls on all; ratios are of their totals. CPU time counts every thread.

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
SPEED_PATHS = ("old", "new", "thread-1", "thread-all")
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


def measure_speed(workdir: str, seconds: float, rounds: int, names: list[str]) -> dict:
    """samples/s of train_step on each input path, alternated (runs inside the child)."""
    import torch

    from hemcap.config import load_config
    from hemcap.train import setup

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.max_steps=1000000", "train.max_minutes=null"],
                      data=str(Path(workdir) / "cells"), output_dir=str(Path(workdir) / "run"), overwrite=True)
    run = setup(cfg)
    chosen = run.inputs.ahead
    paths = {name: path for name, path in speed_paths(run).items() if name in names}
    results, step = {name: {"samples_per_s": [], "cpu_s_per_step": []} for name in paths}, 0
    for name in list(paths) * rounds:
        run.inputs = paths[name]
        rate, cpu, step = _timed_steps(run, step, seconds)
        results[name]["samples_per_s"].append(rate)
        results[name]["cpu_s_per_step"].append(cpu)
        run.inputs.close()
    return {"threads": torch.get_num_threads(), "precision": run.accelerator.mixed_precision,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "new_ahead": chosen,
            "train_images": len(run.train_ids), "batch": cfg.train.batch_size, "paths": results}


def speed_paths(run) -> dict:
    """old: the cache copied into memory, batches built on the training thread with the model's own
    processor (the code before); new: what ``setup`` chose (on a CPU: the memory-mapped cache, read
    on the training thread); thread-1: new's batches built two ahead on a prefetch thread running
    one torch thread (``train.prefetch=2`` on a CPU); thread-all: the same with torch's default."""
    import numpy as np
    import torch

    from hemcap.inputs import Prefetcher
    from hemcap.train import micro_inputs

    old = copy.copy(run.batches)
    old.pixels = torch.from_numpy(np.array(run.batches.pixels))  # what decode_split returned before
    return {"old": Prefetcher(functools.partial(micro_inputs, old, run.backend.collate), ahead=0),
            "new": run.inputs, "thread-1": Prefetcher(run.inputs.build, ahead=2, threads=1),
            "thread-all": Prefetcher(run.inputs.build, ahead=2)}


def _timed_steps(run, step: int, seconds: float) -> tuple[float, float, int]:
    """samples/s and CPU s per step over ``seconds`` of steps after 2 untimed ones; the next step number.

    CPU time counts every thread of the process: what the prefetch thread adds shows there even
    when other processes' load blurs the wall-clock figure.
    """
    from hemcap.train import train_step

    for _ in range(2):
        train_step(run, step)
        step += 1
    started, cpu, done = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - started < seconds:
        train_step(run, step)
        step, done = step + 1, done + 1
    rate = done * run.batches.global_batch / (time.perf_counter() - started)
    return rate, (time.process_time() - cpu) / done, step


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
    workdir, seconds, rounds, names = rest
    return measure_speed(workdir, float(seconds), int(rounds), names.split(","))


def speed_table(paths: dict) -> list[str]:
    """Rounds of samples/s side by side, each path's ratio to old, and CPU time per step."""
    rates = {name: p["samples_per_s"] for name, p in paths.items()}
    others = [name for name in rates if name != "old"]
    lines = ["", "| round | " + " | ".join(f"{n} samples/s" for n in rates) + " | "
             + " | ".join(f"{n} / old" for n in others) + " |", "|---" * (len(rates) + len(others) + 1) + "|"]
    for i, row in enumerate(zip(*rates.values())):
        by_name = dict(zip(rates, row))
        lines.append(f"| {i + 1} | " + " | ".join(f"{r:.1f}" for r in row) + " | "
                     + " | ".join(f"{by_name[n] / by_name['old']:.3f}" for n in others) + " |")
    lines.append("| all rounds | " + " | ".join(f"{statistics.mean(r):.1f}" for r in rates.values()) + " | "
                 + " | ".join(f"**{sum(rates[n]) / sum(rates['old']):.3f}** (median of rounds "
                              f"{statistics.median(a / b for a, b in zip(rates[n], rates['old'])):.3f})"
                              for n in others) + " |")
    cpu = ", ".join(f"{n} {1000 * statistics.mean(p['cpu_s_per_step']):.0f} ms" for n, p in paths.items())
    return lines + ["", f"CPU time per step, all threads: {cpu}"]


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
        lines += ["", f"speed: configs/quickstart.yaml, {speed['train_images']:,} training images, batch "
                  f"{speed['batch']}, {speed['precision']}, {speed['threads']} torch threads, OMP_WAIT_POLICY "
                  f"{speed['omp_wait_policy']}; new builds {speed['new_ahead']} ahead on a thread; paths alternated"]
        lines += speed_table(speed["paths"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="images in the memory test's cache")
    parser.add_argument("--size", type=int, default=384, help="their side in px")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=1000, help="synthetic cells for the speed test")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per round and path")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the paths")
    parser.add_argument("--paths", nargs="+", default=list(SPEED_PATHS), choices=SPEED_PATHS,
                        help="input paths in the speed test; old is always among them")
    parser.add_argument("--unreleased", action="store_true", help="also run the memory test without release")
    parser.add_argument("--skip", choices=["memory", "speed"], help="run only the other measurement")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the cache goes (8.8 GB by default)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.paths = ["old", *(p for p in args.paths if p != "old")]
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    memory, speed, load = [], None, "%.1f" % os.getloadavg()[0]
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_input_memory-") as tmp:
        if args.skip != "memory":
            fill_cache(Path(tmp) / "cache", args.images, args.size)
            memory = [run_child("memory", str(Path(tmp) / "cache"), *map(str, (args.images, args.size, args.batches,
                                args.batch)), release) for release in ("1", "0")[: 1 + args.unreleased]]
            shutil.rmtree(Path(tmp) / "cache")
        if args.skip != "speed":
            import datasets

            from hemcap.recipes import prepare_synthetic

            datasets.disable_progress_bars()
            prepare_synthetic(Path(tmp) / "cells", n_train=args.train_images, n_val=8, n_test=8, size=96)
            speed = run_child("speed", tmp, str(args.seconds), str(args.rounds), ",".join(args.paths))
    load += " / %.1f" % os.getloadavg()[0]
    print(report(memory, speed, "python eval/bench_input_memory.py " + " ".join(sys.argv[1:]), load))
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": memory, "speed": speed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
