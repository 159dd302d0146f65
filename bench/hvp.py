"""Benchmark Hessian-vector products: double backward vs forward-over-reverse, probe batching.

    .venv/bin/python bench/hvp.py [--threads 1] [--samples 256] [--repeats 5]

Timing: for each model, one process times every (method, probes per pass) setting in
round-robin, ``repeats`` rounds, and keeps the fastest round: on a shared machine the load
then hits all settings alike and the minimum is the least disturbed figure. Each round
computes 16 products. Memory: each setting runs one pass in a fresh process; the figure is
the growth of peak resident memory (ru_maxrss) over the process's peak before the first
product (on CUDA: peak allocated memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODELS = {"digits CNN (width 16)": 16, "wide digits CNN (width 64)": 64}
METHODS = ("double_backward", "forward_over_reverse")
PROBES = (1, 4, 16)
PRODUCTS_PER_ROUND = 16


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(width: int, samples: int, threads: int):
    import torch

    from sensitivity.examples import DigitsCNN, load_digits
    from sensitivity.losses import CalibrationLoss
    from sensitivity.run import resolve_device
    from sensitivity.torch_program import TorchProgram

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = resolve_device("auto")
    digits = load_digits()
    calibration = {"input": digits.train_x[:samples], "labels": digits.train_y[:samples]}
    program = TorchProgram(DigitsCNN(width=width)).to(device)
    return CalibrationLoss(program, calibration, batch_size=samples, device=device), device


def _probes(hvp, count: int):
    import torch

    from sensitivity.traces import rademacher_probe

    generator = torch.Generator().manual_seed(0)
    return [rademacher_probe(hvp.point, generator) for _ in range(count)]


def time_settings(width: int, samples: int, repeats: int, threads: int) -> dict:
    import torch

    from sensitivity.hvp import HessianVectorProducts

    loss, device = _setup(width, samples, threads)
    settings = [(m, k) for m in METHODS for k in PROBES]
    operators = {s: HessianVectorProducts(loss, method=s[0], probes_per_pass=s[1]) for s in settings}
    vectors = _probes(operators[settings[0]], PRODUCTS_PER_ROUND)
    best = {s: float("inf") for s in settings}
    for s in settings:
        operators[s].many(vectors[: s[1]])  # warm-up
    for _ in range(repeats):
        for s in settings:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            operators[s].many(vectors)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[s] = min(best[s], (time.perf_counter() - start) / len(vectors) * 1000)
    weights = sum(w.numel() for w in operators[settings[0]].point)
    return {"weights": weights, "device": str(device), "ms": {f"{m},{k}": v for (m, k), v in best.items()}}


def peak_memory(width: int, method: str, probes: int, samples: int, threads: int) -> float:
    import torch

    from sensitivity.hvp import HessianVectorProducts

    loss, device = _setup(width, samples, threads)
    hvp = HessianVectorProducts(loss, method=method, probes_per_pass=probes)
    vectors = _probes(hvp, probes)
    baseline = _peak_rss_mib()
    hvp.many(vectors)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mib() - baseline


def _child(args: list[str]) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on shared CPUs)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = ["--samples", str(args.samples), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    if args.time is not None:
        print(json.dumps(time_settings(args.time, args.samples, args.repeats, args.threads)))
        return
    if args.memory:
        width, method, probes = args.memory.split(",")
        print(json.dumps({"mib": peak_memory(int(width), method, int(probes), args.samples, args.threads)}))
        return
    print(f"{args.samples} calibration samples in one batch, {args.threads} thread(s), best of {args.repeats} rounds\n")
    print("| model | layer weights | method | probes per pass | ms per HVP | peak memory growth (MiB) |")
    print("|---|---|---|---|---|---|")
    for label, width in MODELS.items():
        timing = _child(["--time", str(width), *common])
        for method in METHODS:
            for probes in PROBES:
                memory = _child(["--memory", f"{width},{method},{probes}", *common])["mib"]
                ms = timing["ms"][f"{method},{probes}"]
                print(f"| {label} | {timing['weights']} | {method} | {probes} | {ms:.1f} | {memory:.0f} |", flush=True)
    print(f"\ndevice: {timing['device']}")


if __name__ == "__main__":
    main()
