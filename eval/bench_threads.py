"""Training speed with hemcap's thread default (the free cores) against 2 forced threads, beside a busy process or not.

The model is ``configs/quickstart.yaml``'s (BLIP from scratch at 96 px, batch 32, bf16 where the
CPU has it) on a synthetic set of ``--train-images`` cells. Each measurement runs in a fresh
subprocess, so the thread count is chosen at start as in a real run (``hemcap.train.setup``);
it trains ``--warmup`` steps, then times ``--steps`` steps of ``hemcap.train.train_step`` with
fit's ``ThreadWatch`` beside them. The busy process is a second Python process spinning on one
core, started before the measurement and killed after it (always, even on error; it also stops by
itself after ``--busy-seconds``).
Conditions alternate within each round and rounds repeat, since other work may share the cores;
the table gives the median of the rounds and how much other work there was, at start and while
training (the busy process included).

    python eval/bench_threads.py                       # 4 conditions x 3 rounds, ~6 min on 2 cores
    python eval/bench_threads.py --wait-policy passive  # the same with OMP_WAIT_POLICY=PASSIVE rows too

Targets (issue 12): beside a busy process the default trains >= 1.7x as fast as 2 forced
threads; idle, within 5 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": None, "2 threads": 2}  # label -> train.threads (None: hemcap.threads chooses)


# ------------------------------------------------------------------------------ inside a measurement


def measure(data: str, out: str, threads: int | None, warmup: int, steps: int) -> dict:
    """Set up the quickstart run as ``hemcap train`` does, then time ``steps`` training steps."""
    import torch

    from hemcap import threads as hemcap_threads
    from hemcap.config import load_config
    from hemcap.train import setup, train_step

    overrides = [f"data.path={data}", f"train.output_dir={out}", "train.overwrite=true", "train.max_steps=100000",
                 f"train.threads={'null' if threads is None else threads}"]
    load_at_start = other_load(hemcap_threads, lambda: time.sleep(0.3))
    run = setup(load_config(ROOT / "configs" / "quickstart.yaml", overrides))
    for step in range(warmup):
        train_step(run, step)
    started = time.perf_counter()
    watch = hemcap_threads.ThreadWatch(threads)  # as in fit: the default follows the load every 30 s
    load_during = other_load(hemcap_threads, lambda: train(run, watch, range(warmup, warmup + steps), train_step))
    seconds = time.perf_counter() - started
    return {"threads": torch.get_num_threads(), "samples_s": steps * run.batches.global_batch / seconds,
            "load_at_start": load_at_start, "load_during": load_during}


def train(run, watch, steps: range, train_step) -> None:
    """The steps as ``hemcap.train.fit`` runs them."""
    for step in steps:
        watch.tick()
        train_step(run, step)


def other_load(hemcap_threads, work) -> float:
    """Cores' worth of CPU time other processes used while ``work()`` ran (NaN without /proc)."""
    before = hemcap_threads.snapshot()
    work()
    after = hemcap_threads.snapshot()
    if before is None or after is None:
        return float("nan")
    return hemcap_threads.others_busy(before, after, hemcap_threads.allowed_cpus())


# ------------------------------------------------------------------------------ the driver


@contextlib.contextmanager
def busy_process(on: bool, seconds: float):
    """A Python process spinning on one core for at most ``seconds``; killed on leaving."""
    if not on:
        yield None
        return
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    process = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(1.0)  # let it reach its loop before the measurement reads the load
        yield process
    finally:
        process.kill()
        process.wait()


def run_child(args, data: Path, out: Path, threads: int | None, passive: bool, steps: int) -> dict:
    """One measurement in a fresh interpreter, with no OMP_NUM_THREADS to force its choice."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    command = [sys.executable, __file__, "--child", "--data", str(data), "--out", str(out),
               "--threads", str(threads or 0), "--warmup", str(args.warmup), "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.busy_seconds)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def conditions(wait_policy: str) -> list[tuple[bool, str, bool]]:
    """(busy, setting, passive) in the order of one round."""
    policies = [False, True] if wait_policy == "passive" else [False]
    return [(busy, setting, passive) for busy in (False, True) for passive in policies for setting in SETTINGS]


def run_rounds(args, data: Path, work: Path) -> dict:
    """Every condition once per round; odd rounds run each pair in reverse, so drift favours neither."""
    results: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        order = conditions(args.wait_policy)
        if round_ % 2:
            order = [c for pair in zip(order[1::2], order[0::2]) for c in pair]
        for index, (busy, setting, passive) in enumerate(order):
            with busy_process(busy, args.busy_seconds):
                result = run_child(args, data, work / f"run-{round_}-{index}", SETTINGS[setting], passive, args.steps)
            results.setdefault((busy, setting, passive), []).append(result)
            print(f"  round {round_ + 1}: {_label(busy, setting, passive):<40} {result['threads']} threads "
                  f"{result['samples_s']:6.1f} samples/s  (other work: {result['load_at_start']:.1f} cores at start, "
                  f"{result['load_during']:.1f} while training)", flush=True)
    return results


def _label(busy: bool, setting: str, passive: bool) -> str:
    policy = ", OMP_WAIT_POLICY=PASSIVE" if passive else ""
    return f"{'one busy process' if busy else 'no busy process'}, {setting}{policy}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(results: dict, rounds: int) -> str:
    rounds_head = " | ".join(f"round {i + 1}" for i in range(rounds))
    lines = [f"| condition | threads | other work at start / while training (cores) | {rounds_head} | median samples/s |",
             "|---|---|---|" + "---|" * rounds + "---|"]
    for (busy, setting, passive), runs in results.items():
        figures = " | ".join(f"{r['samples_s']:.1f}" for r in runs)
        threads = "/".join(str(r["threads"]) for r in runs)
        load = " ; ".join("/".join(f"{r[key]:.1f}" for r in runs) for key in ("load_at_start", "load_during"))
        lines.append(f"| {_label(busy, setting, passive)} | {threads} | {load} | {figures} | "
                     f"{statistics.median([r['samples_s'] for r in runs]):.1f} |")
    return "\n".join(lines + ["", *ratios(results), *quiet_note(results)])


def quiet_note(results: dict) -> list[str]:
    """A warning when other work shared the cores during the measurements meant to have none beside them."""
    loads = [r["load_during"] for (busy, _, _), runs in results.items() if not busy for r in runs]
    if not loads or _mean(loads) < 0.25:
        return []
    return [f"note: other processes used {_mean(loads):.1f} cores on average during the 'no busy process' "
            "measurements, so those were not idle; the idle comparison needs a quiet machine"]


def ratios(results: dict) -> list[str]:
    """default / 2 threads, idle and busy, for each wait policy measured."""
    lines = []
    for passive in sorted({p for _, _, p in results}):
        for busy, target in ((True, ">= 1.70"), (False, "0.95-1.05")):
            new, old = (statistics.median([r["samples_s"] for r in results[(busy, s, passive)]]) for s in SETTINGS)
            policy = " (OMP_WAIT_POLICY=PASSIVE)" if passive else ""
            condition = "one busy process" if busy else "no busy process"
            lines.append(f"{condition}{policy}: default / 2 threads = {new / old:.2f}x (target {target})")
    return lines


def prepare(args, work: Path) -> Path:
    from hemcap.config import load_config
    from hemcap.recipes import prepare_synthetic

    size = load_config(ROOT / "configs" / "quickstart.yaml").model.vision_config["image_size"]
    return prepare_synthetic(work / "data", n_train=args.train_images, n_val=4, n_test=4, size=size,
                             n_paraphrases=0, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="times each condition is measured (the median counts)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocation, caches)")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--wait-policy", choices=("default", "passive"), default="default",
                        help="passive: also measure both settings with OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--busy-seconds", type=float, default=600, help="longest life of the busy process")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.data, args.out, args.threads or None, args.warmup, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_threads-") as tmp:
        work = Path(tmp)
        data = prepare(args, work)
        run_child(args, data, work / "first", 2, False, 1)  # decodes the pixel cache once, outside the timings
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"quickstart model, batch 32, {args.train_images} images, {args.steps} steps after {args.warmup}, "
              f"{cores} cores")
        results = run_rounds(args, data, work)
    print()
    print(report(results, args.rounds))
    if args.json:
        Path(args.json).write_text(json.dumps({" / ".join(map(str, k)): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
