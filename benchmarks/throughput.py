"""Training throughput of the default model, and the CPU precision choice (fp32 vs bf16 autocast).

Examples:

    python benchmarks/throughput.py                    # CPU: fp32 and bf16 autocast, default model size
    python benchmarks/throughput.py --device cuda --batch-size 1024   # on a GPU: fp32, bf16, fp16+GradScaler

Times optimizer steps (forward, loss, backward, clip, AdamW step) on random sessions of 20 events,
the HDFS average, after warm-up steps; reports steps/s and predicted events/s.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import DeepLog  # noqa: E402


def measure(device, dtype, batch_size, length, steps, warmup) -> float:
    torch.manual_seed(0)
    model = DeepLog(29).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    inputs = torch.randint(0, 29, (batch_size, length), device=device)
    targets = torch.randint(0, 30, (batch_size, length), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64, help="sessions per step")
    parser.add_argument("--length", type=int, default=20, help="events per session")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = [None, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size} x {args.length} "
          f"events, torch {torch.__version__}")
    for dtype in dtypes:
        rate = measure(device, dtype, args.batch_size, args.length, args.steps, args.warmup)
        name = "fp32" if dtype is None else str(dtype).replace("torch.", "") + " autocast"
        print(f"{name:<20} {rate:8.1f} steps/s {rate * args.batch_size * args.length:12.0f} events/s")


if __name__ == "__main__":
    main()
