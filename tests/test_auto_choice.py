"""benchmarks/gpu/auto_choice.py: the per-op "auto" choice from benchmark medians (synthetic JSON)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from adaptsr.backend import AUTO_ON_CUDA

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu" / "auto_choice.py"
spec = importlib.util.spec_from_file_location("auto_choice", SCRIPT)
auto_choice = importlib.util.module_from_spec(spec)
spec.loader.exec_module(auto_choice)


def _bench(name, provider, shape, ms, rank=8, **info):
    return {"name": f"test_bench_{name}[{shape}-{provider}]", "stats": {"median": ms / 1e3},
            "extra_info": {"provider": provider, "shape": shape, "dtype": "bf16", "rank": rank, **info}}


def test_choices_follow_the_geometric_mean_and_need_every_case():
    data = {"benchmarks": [
        # conv: triton wins both shapes
        _bench("lora_conv2d", "torch", "a", 10), _bench("lora_conv2d", "triton", "a", 8),
        _bench("lora_conv2d", "torch", "b", 10), _bench("lora_conv2d", "triton", "b", 9),
        # linear: triton wins one shape by a little, loses the other by a lot
        _bench("lora_linear", "torch", "a", 10), _bench("lora_linear", "triton", "a", 9),
        _bench("lora_linear", "torch", "b", 10), _bench("lora_linear", "triton", "b", 15),
        # linear: cuda is fastest but ran in one case only, so it cannot be chosen
        _bench("lora_linear", "cuda", "a", 1),
        # window attention: the torch path is whichever provider says so; the single pass is slower
        _bench("window_attention", "eager", "w", 30, rank=None),
        _bench("window_attention", "sdpa", "w", 20, rank=None, torch_backend_path=True),
        _bench("window_attention", "matmul", "w", 25, rank=None, torch_backend_path=False),
        _bench("window_attention", "triton", "w", 12, rank=None),
        _bench("window_attention", "triton_single_pass", "w", 14, rank=None),
    ]}
    choices, lines = auto_choice.choose(data)
    assert choices["lora_conv2d"] == "triton"
    assert choices["lora_linear"] == "torch"
    assert choices["window_attention"] == "triton"
    assert choices["qkv_window_attention"] == "torch"  # single pass off
    assert choices["shifted_window_attention"] == "torch"  # not measured: the safe default
    # the printed dict is valid Python with exactly the ops the package's table has
    text = "\n".join(lines)
    code = text[text.index("AUTO_ON_CUDA"):text.index("```", text.index("AUTO_ON_CUDA"))]
    printed = ast.literal_eval(code.split("=", 1)[1].strip())
    assert printed == choices and set(printed) == set(AUTO_ON_CUDA)
