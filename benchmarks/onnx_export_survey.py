"""Which architectures `adaptsr export` writes as ONNX, with dynamic sizes or at one fixed size.

Every architecture the tests build small (tests/conftest.py's tiny models, each with LoRA injected by its
preset and merged by the export) goes through ``export_onnx`` twice: dynamic batch/height/width, then one
fixed 32 x 32 input (rounded up to the model's size multiple). An export counts only when ONNX Runtime's
output matched torch's (the export's own check); otherwise the table gives the first line of the reason.
Where either worked, a third export in float16 (``half=True``; dynamic where the float32 one was, else fixed).

    python benchmarks/onnx_export_survey.py --out benchmarks/results/onnx-export-cpu
    python benchmarks/onnx_export_survey.py --only esrgan,swinir --out /tmp/survey

Writes OUT.md (the table) and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

_SKIP = {"grl_separable"}  # GRL's second projection layout: the same code as grl for export


def _attempt(descriptor, path: Path, size, half: bool = False) -> dict:
    from adaptsr.export import export_onnx

    start = time.perf_counter()
    try:
        report = export_onnx(descriptor, path, size=size, half=half)
    except Exception as err:  # the survey records every failure's reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {"ok": False, "reason": reason, "seconds": time.perf_counter() - start}
    worst = max(check[3] for check in report["checked"])
    return {"ok": True, "max_difference": worst, "seconds": time.perf_counter() - start}


def survey(names: list[str]) -> list[dict]:
    from conftest import _TINY_SR
    from spandrel import ModelLoader

    import adaptsr
    from adaptsr.presets import preset_for_architecture

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            descriptor = ModelLoader().load_from_state_dict(getattr(_TINY_SR, name)().state_dict()).eval()
            torch.manual_seed(0)
            adaptsr.inject_lora(descriptor, preset=preset_for_architecture(descriptor.architecture.id), rank=2,
                                init_lora_weights=False)
            needs = descriptor.size_requirements
            side = max(32, needs.minimum)
            side = -(-side // max(1, needs.multiple_of)) * max(1, needs.multiple_of)
            row = {"name": name, "architecture": descriptor.architecture.name}
            row["dynamic"] = _attempt(descriptor, Path(scratch) / f"{name}-dynamic.onnx", None)
            row["fixed"] = _attempt(descriptor, Path(scratch) / f"{name}-fixed.onnx", (side, side))
            row["fixed_size"] = side
            row["float16"] = None
            if row["dynamic"]["ok"] or row["fixed"]["ok"]:
                size = None if row["dynamic"]["ok"] else (side, side)
                row["float16"] = _attempt(descriptor, Path(scratch) / f"{name}-fp16.onnx", size, half=True)
            rows.append(row)
            print(name, row["dynamic"]["ok"], row["fixed"]["ok"], (row["float16"] or {}).get("ok"), flush=True)
    return rows


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if result["ok"]:
        return f"yes ({result['max_difference']:.0e}, {result['seconds']:.0f} s)"
    reason = result["reason"].replace("|", "/")
    return f"no: {reason[:200]}{'...' if len(reason) > 200 else ''}"


def to_markdown(rows: list[dict]) -> str:
    lines = [
        f"# ONNX export by architecture ({date.today().isoformat()}, CPU, torch {torch.__version__})",
        "",
        ("`adaptsr export` on the tests' tiny models (LoRA rank 2 from each preset, merged by the export). "
         "\"yes\": ONNX Runtime's output matched torch's (largest difference, export time); \"no\": the reason "
         "the export was refused. Fixed: one 32 x 32 input (rounded up to the size multiple). Float16: "
         "`--fp16`, dynamic where the float32 export was, else fixed; its difference is to the float32 model."),
        "",
        "| model | architecture | dynamic sizes | fixed size | float16 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['architecture']} | {_cell(row['dynamic'])} | {_cell(row['fixed'])} "
                     f"| {_cell(row.get('float16'))} |")
    dynamic = sum(row["dynamic"]["ok"] for row in rows)
    fixed = sum(row["fixed"]["ok"] for row in rows)
    half = sum(bool(row.get("float16") and row["float16"]["ok"]) for row in rows)
    lines += ["", (f"{dynamic} of {len(rows)} export with dynamic sizes, {fixed} of {len(rows)} at a fixed size, "
                   f"{half} of {len(rows)} in float16.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    from conftest import _TINY_SR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    parser.add_argument("--only", help="comma-separated tiny-model names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else [n for n in vars(_TINY_SR) if n not in _SKIP]
    warnings.filterwarnings("ignore")
    rows = survey(names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
