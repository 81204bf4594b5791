"""Peak memory of LoRA vs full fine-tuning at BLIP-base size, side by side.

Each mode runs in its own subprocess so that one mode's allocations cannot hide in the other's
peak. The model is BLIP-base's architecture (ViT-B/16 at 384 px, BERT-base decoder, 30,524-token
vocabulary) with random weights, so nothing is downloaded. Each mode builds the model, runs a few
AdamW steps on batch 2 with 40-token captions, and reports:

- on CPU: peak resident memory of the process (``ru_maxrss``), and the part above what the
  model alone takes (gradients, optimizer state, activations);
- on CUDA: ``torch.cuda.max_memory_allocated`` in the same two parts.

LoRA follows HemBLIP: r=8, alpha=16 on the text decoder's cross-attention query/key/value/output,
the vision tower frozen.

    python eval/bench_lora_memory.py              # both modes, CPU
    python eval/bench_lora_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HEMBLIP_TARGETS = ["crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                   "crossattention.output.dense"]


def measure(mode: str, device: str, steps: int, batch: int, image_size: int, caption_tokens: int) -> dict:
    """Build, train ``steps`` steps, and return memory and time figures (runs inside the child)."""
    import resource

    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    from hemcap.config import LoraConfig
    from hemcap.models import ModelInfo, add_lora, count_parameters
    from hemcap.models.blip import BlipBackend

    torch.manual_seed(0)
    config = BlipConfig(vision_config={"image_size": image_size, "initializer_range": 0.02})  # BLIP-base sizes
    backend = BlipBackend(BlipForConditionalGeneration(config), processor=None, info=ModelInfo("blip", schema={}))
    if mode == "lora":
        add_lora(backend, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=HEMBLIP_TARGETS), freeze_vision=True)
    model = backend.model.to(device).train()
    trainable, total = count_parameters(model)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model_only = _memory(device, resource)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pixels = torch.randn(batch, 3, image_size, image_size, device=device)
    ids = torch.randint(5, config.text_config.vocab_size, (batch, caption_tokens), device=device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(pixel_values=pixels, input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = _memory(device, resource)
    return {"mode": mode, "device": device, "trainable_params": trainable, "total_params": total,
            "model_gib": model_only, "peak_gib": peak, "training_gib": peak - model_only,
            "step_s": min(times), "steps": steps}


def _memory(device: str, resource) -> float:
    """GiB: peak CUDA allocation, or the process's peak resident set (ru_maxrss is KiB on Linux)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--device", args.device, "--steps", str(args.steps),
               "--batch", str(args.batch), "--image-size", str(args.image_size),
               "--caption-tokens", str(args.caption_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict]) -> str:
    unit = "peak CUDA allocation" if results[0]["device"] == "cuda" else "peak RSS"
    lines = [f"| mode | trainable params | {unit} (GiB) | model alone (GiB) | training on top (GiB) | step (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['trainable_params']:,} of {r['total_params']:,} | {r['peak_gib']:.2f} | "
                     f"{r['model_gib']:.2f} | {r['training_gib']:.2f} | {r['step_s']:.2f} |")
    by_mode = {r["mode"]: r for r in results}
    if {"full", "lora"} <= set(by_mode):
        full, lora = by_mode["full"], by_mode["lora"]
        lines.append(f"\nfull / LoRA: {full['peak_gib'] / lora['peak_gib']:.2f}x peak, "
                     f"{full['training_gib'] / max(lora['training_gib'], 1e-9):.2f}x on top of the model")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps per mode (the first allocates state)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--caption-tokens", type=int, default=40)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(measure(args.child, args.device, args.steps, args.batch, args.image_size,
                                 args.caption_tokens)))
        return
    results = [run_child(mode, args) for mode in args.modes]
    print(f"BLIP-base, random init, batch {args.batch}, {args.image_size} px, {args.caption_tokens}-token captions, "
          f"{args.steps} AdamW steps, fp32, {args.device}\n")
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
