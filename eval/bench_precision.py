"""Training speed in fp32 against bf16 autocast on this CPU, and whether ``precision: auto`` picks the faster.

``precision: auto`` trains in bf16 where the CPU has native bf16 (AVX512-BF16 or AMX) and in fp32
elsewhere (``hemcap.train.resolve_precision``): without native support bf16 is emulated and far
slower. This measures both on the machine at hand, with a shipped config's model: each measurement
sets up the run in a fresh interpreter as ``hemcap train`` does (``hemcap.train.setup``), trains
``--warmup`` steps, then times ``--steps`` steps of ``hemcap.train.train_step``. The two precisions
alternate within each round (odd rounds reversed) and the table gives the median of the rounds.

    python eval/bench_precision.py                      # the WBCAtt recipe on synthetic cells, ~5-15 min
    python eval/bench_precision.py --config configs/quickstart.yaml --steps 20
    python eval/bench_precision.py --data runs/data/wbcatt   # real cells (a prepared folder)

Target: the precision ``auto`` resolves to is the faster of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def measure(config: str, data: str, out: str, precision: str, warmup: int, steps: int) -> dict:
    """Set up ``config``'s run in ``precision`` as ``hemcap train`` does, then time ``steps`` steps."""
    from hemcap.config import load_config
    from hemcap.train import setup, train_step

    overrides = [f"data.path={data}", f"train.output_dir={out}", "train.overwrite=true", "train.max_steps=100000",
                 "train.max_minutes=null", "train.refine=[]", f"train.precision={precision}"]
    run = setup(load_config(config, overrides))
    for step in range(warmup):
        train_step(run, step)
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(run, step)
    run.inputs.close()
    return {"samples_s": steps * run.batches.global_batch / (time.perf_counter() - started)}


def run_child(args, data: Path, out: Path, precision: str) -> dict:
    """One measurement in a fresh interpreter (accelerate fixes the precision once per process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, __file__, "--child", "--config", str(args.config), "--data", str(data),
               "--out", str(out), "--precision", precision, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{precision} measurement failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(args, data: Path, work: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for round_ in range(args.rounds):
        for precision in PRECISIONS[::-1] if round_ % 2 else PRECISIONS:
            figure = run_child(args, data, work / f"{precision}-{round_}", precision)["samples_s"]
            results[precision].append(figure)
            print(f"  round {round_ + 1}: {precision:<5} {figure:7.2f} samples/s", flush=True)
    return results


def report(results: dict[str, list[float]]) -> str:
    from hemcap.train import cpu_has_native_bf16, resolve_precision

    medians = {p: statistics.median(figures) for p, figures in results.items()}
    auto, faster = resolve_precision("auto"), max(medians, key=medians.get)
    lines = ["| precision | " + " | ".join(f"round {i + 1}" for i in range(len(results["fp32"]))) + " | median samples/s |",
             "|---|" + "---|" * len(results["fp32"]) + "---|"]
    lines += [f"| {p} | " + " | ".join(f"{f:.2f}" for f in figures) + f" | {medians[p]:.2f} |"
              for p, figures in results.items()]
    verdict = "the faster: target met" if auto == faster else f"the slower ({faster} is faster): target NOT met"
    return "\n".join(lines + ["", f"bf16 / fp32 = {medians['bf16'] / medians['fp32']:.2f}x; native CPU bf16: "
                              f"{cpu_has_native_bf16()}; precision auto picks {auto}, {verdict}"])


def prepare(config: Path, work: Path) -> Path:
    from hemcap.config import load_config
    from hemcap.recipes import prepare_synthetic

    size = load_config(config).model.vision_config["image_size"]
    return prepare_synthetic(work / "data", n_train=96, n_val=4, n_test=4, size=size, n_paraphrases=0, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "blip_small_scratch.yaml")
    parser.add_argument("--data", type=Path, help="a prepared folder (default: synthetic cells at the config's size)")
    parser.add_argument("--rounds", type=int, default=2, help="times each precision is measured (the median counts)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocation, caches)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(str(args.config), str(args.data), args.out, args.precision, args.warmup, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        data = args.data or prepare(args.config, Path(tmp))
        print(f"{args.config.name}: {args.steps} timed steps after {args.warmup}, {args.rounds} rounds", flush=True)
        print(report(run_rounds(args, data, Path(tmp))))


if __name__ == "__main__":
    main()
