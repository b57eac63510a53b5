"""What "auto" should run per op on this GPU, derived from a pytest-benchmark JSON of benchmarks/.

    python benchmarks/gpu/auto_choice.py bench.json          # markdown on stdout

For each op of ``adaptsr.backend.AUTO_ON_CUDA`` it lines up, case by case (benchmark, shape, dtype,
rank), the medians of the providers that run that op on each backend, then picks the backend with
the lowest geometric-mean time relative to "torch" over the cases where every candidate ran, and
keeps "torch" unless the winner is faster. It prints the per-case numbers, the summary and the
dict to paste into ``adaptsr/backend.py`` (benchmarks/gpu/run.sh appends this to its results file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

# op -> (benchmark name, {backend: provider}); "torch" is the baseline. For window attention the
# torch backend's provider is whichever path (sdpa or matmul) the backend takes on the device, marked
# by torch_backend_path in extra_info. For qkv_window_attention "triton" means the single pass on,
# "torch" the single pass off (the triton two-step), the switch AUTO_ON_CUDA records.
OPS = {
    "lora_conv2d": ("lora_conv2d", {"torch": "torch", "triton": "triton", "cuda": "cuda"}),
    "lora_linear": ("lora_linear", {"torch": "torch", "triton": "triton", "cuda": "cuda"}),
    "window_attention": ("window_attention", {"torch": "<torch path>", "triton": "triton", "cuda": "cuda"}),
    "qkv_window_attention": ("window_attention", {"torch": "triton", "triton": "triton_single_pass"}),
    "shifted_window_attention": ("shifted_window_attention", {"torch": "shifted_torch", "triton": "shifted_triton"}),
}


def _medians(data: dict) -> dict[tuple, dict[str, float]]:
    """(benchmark, shape, dtype, rank) -> {provider: median ms}; the torch path also as "<torch path>"."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = (bench.get("stats") or {}).get("median")
        if median is None or "provider" not in info:
            continue
        name = bench.get("name", "").split("[")[0].removeprefix("test_bench_")
        key = (name, info.get("shape", ""), info.get("dtype", ""), info.get("rank"))
        out[key][info["provider"]] = 1e3 * median
        if info.get("torch_backend_path"):
            out[key]["<torch path>"] = 1e3 * median
    return out


def choose(data: dict) -> tuple[dict[str, str], list[str]]:
    """(choice per op, markdown lines)."""
    medians = _medians(data)
    choices: dict[str, str] = {}
    lines = ["| op | shape | dtype | rank | " + " | ".join(("torch", "triton", "cuda")) + " (ms) |", "|---|---|---|---|---|---|---|"]
    summary = ["| op | cases | triton / torch (geo-mean) | cuda / torch (geo-mean) | choice |", "|---|---|---|---|---|"]
    for op, (benchmark, providers) in OPS.items():
        ratios: dict[str, list[float]] = defaultdict(list)
        cases = 0
        for (name, shape, dtype, rank), by_provider in sorted(medians.items(), key=lambda kv: str(kv[0])):
            if name != benchmark or providers["torch"] not in by_provider:
                continue
            times = {b: by_provider.get(p) for b, p in providers.items()}
            if all(times.get(b) is None for b in providers if b != "torch"):
                continue
            cases += 1
            cells = " | ".join("-" if times.get(b) is None else f"{times[b]:.3f}" for b in ("torch", "triton", "cuda"))
            lines.append(f"| {op} | {shape} | {dtype} | {'-' if rank is None else rank} | {cells} |")
            for b, t in times.items():
                if b != "torch" and t is not None:
                    ratios[b].append(t / times["torch"])
        geo = {b: math.exp(sum(map(math.log, r)) / len(r)) for b, r in ratios.items() if len(r) == cases and r}
        best = min(geo, key=geo.get, default=None)
        choices[op] = best if best is not None and geo[best] < 1.0 else "torch"
        cells = " | ".join(f"{geo[b]:.3f}" if b in geo else "-" for b in ("triton", "cuda"))
        summary.append(f"| {op} | {cases} | {cells} | {choices[op]} |")
    text = ["Per case:", "", *lines, "", "Summary (a backend is chosen only where it ran in every case and beats torch):", "",
            *summary, "", "```python", "AUTO_ON_CUDA: dict[str, str] = {"]
    text += [f'    "{op}": "{choice}",' for op, choice in choices.items()] + ["}", "```"]
    return choices, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (pytest benchmarks --benchmark-json=FILE)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    _, lines = choose(data)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
