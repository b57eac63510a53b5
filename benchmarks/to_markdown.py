"""Turn a pytest-benchmark JSON file into a markdown table.

    python benchmarks/to_markdown.py results.json [-o results.md]

Columns: benchmark, provider, shape, dtype, rank, median ms, min ms, fwd ms and bwd ms (the forward
alone and the backward alone, medians), ratio to frozen (median /
the frozen case's median), interleaved ratio (median / the median of frozen steps timed between
this case's rounds: steadier when the machine's load drifts), saved MB (bytes autograd saves for
backward, parameters excluded), peak MB, graphed ms and graphed ratio (CUDA only: the step
replayed from CUDA graphs, without the host's launch overhead, and its ratio to frozen's). The ratio comes from the benchmark's
extra_info; where that is missing (the frozen case did not run first) it is computed from the
frozen median of the same benchmark, shape and dtype in the file. The header gives the highest
1-minute load average seen during the run, with a warning when it exceeded the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

MB = 1024 * 1024


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _benchmark_name(bench: dict) -> str:
    name = bench.get("name", "").split("[")[0]
    return name.removeprefix("test_bench_")


def rows(data: dict) -> list[dict]:
    """One dict per benchmark with the table's fields (times in ms, memory in MB)."""
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench.get("stats") or {}
        median = stats.get("median")
        minimum = stats.get("min")
        saved = info.get("saved_activation_bytes")
        peak = info.get("peak_memory_bytes")
        out.append(
            {
                "benchmark": _benchmark_name(bench),
                "provider": info.get("provider", bench.get("param", "")),
                "shape": info.get("shape", ""),
                "dtype": info.get("dtype", ""),
                "rank": info.get("rank"),
                "median_ms": None if median is None else 1e3 * median,
                "min_ms": None if minimum is None else 1e3 * minimum,
                "graphed_ms": info.get("graphed_ms"),
                "graphed_ratio": info.get("graphed_ratio_to_frozen"),
                "fwd_ms": info.get("fwd_ms"),
                "bwd_ms": info.get("bwd_ms"),
                "ratio": info.get("ratio_to_frozen"),
                "ratio_interleaved": info.get("ratio_to_frozen_interleaved"),
                "saved_mb": None if saved is None else saved / MB,
                "peak_mb": None if peak is None else peak / MB,
            }
        )
    frozen = {
        (r["benchmark"], r["shape"], r["dtype"]): r["median_ms"]
        for r in out
        if r["provider"] == "frozen" and r["median_ms"]
    }
    for r in out:
        base = frozen.get((r["benchmark"], r["shape"], r["dtype"]))
        if r["ratio"] is None and base and r["median_ms"] is not None:
            r["ratio"] = r["median_ms"] / base
    return out


def to_markdown(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    devices = sorted({b.get("extra_info", {}).get("device", "") for b in data.get("benchmarks", [])} - {""})
    torch_versions = sorted({b.get("extra_info", {}).get("torch", "") for b in data.get("benchmarks", [])} - {""})
    threads = sorted({str(b.get("extra_info", {}).get("threads", "")) for b in data.get("benchmarks", [])} - {""})
    loads = [v for b in data.get("benchmarks", []) for v in b.get("extra_info", {}).get("loadavg") or [] if v is not None]
    cores = machine.get("cpu", {}).get("count")
    load_line = ""
    if loads:
        load_line = f" Highest 1-minute load average during the run: {max(loads):.2f}."
        if isinstance(cores, int) and max(loads) > cores + 0.5:
            load_line += f" WARNING: more than {cores} cores' worth of load; other processes competed for the CPU, so times are inflated and noisy."
    header = [
        f"Run {data.get('datetime', '?')}; device {', '.join(devices) or '?'}; CPU {cpu or '?'}"
        f" ({machine.get('cpu', {}).get('count', '?')} cores, torch threads {', '.join(threads) or '?'});"
        f" torch {', '.join(torch_versions) or '?'}.{load_line}",
        "",
        "| benchmark | provider | shape | dtype | rank | median ms | min ms | fwd ms | bwd ms | ratio to frozen "
        "| interleaved ratio | graphed ms | graphed ratio | saved MB | peak MB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = [
        f"| {r['benchmark']} | {r['provider']} | {r['shape']} | {r['dtype']} | {_fmt(r['rank'], 'd')} "
        f"| {_fmt(r['median_ms'], '.2f')} | {_fmt(r['min_ms'], '.2f')} | {_fmt(r['fwd_ms'], '.2f')} "
        f"| {_fmt(r['bwd_ms'], '.2f')} | {_fmt(r['ratio'], '.3f')} "
        f"| {_fmt(r['ratio_interleaved'], '.3f')} | {_fmt(r['graphed_ms'], '.2f')} | {_fmt(r['graphed_ratio'], '.3f')} "
        f"| {_fmt(r['saved_mb'], '.1f')} "
        f"| {_fmt(r['peak_mb'], '.1f')} |"
        for r in rows(data)
    ]
    return "\n".join(header + lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path, help="a file written by pytest --benchmark-json")
    parser.add_argument("-o", "--output", type=Path, help="write the table here instead of printing it")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"cannot read pytest-benchmark JSON from {args.json_file}: {err}", file=sys.stderr)
        return 1
    text = to_markdown(data)
    if args.output:
        _write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
