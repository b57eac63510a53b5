"""adaptsr.autotune: with autotuning on, "auto" times the backends that can take a call, once per call signature,
and runs the fastest; the trials leave the call's tensors, gradients and random numbers as they were.

On the CPU the contenders are torch and triton (its kernels through TRITON_INTERPRET=1, set in conftest.py), so
the trials are real; on a GPU, torch, triton and cuda where the extension is built. A patched clock decides a race
where a test needs a given winner.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from adaptsr import autotune
from adaptsr.backend import set_backend
from adaptsr.ops import lora_conv2d, lora_linear, lora_linear_ref, shifted_window_attention, window_attention
from adaptsr.train import TrainConfig, adapt

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONTENDERS = autotune.candidates(DEVICE, None)  # the LoRA ops' (the window-attention kernels may take fewer calls)

pytestmark = pytest.mark.skipif(len(CONTENDERS) < 2,
                                reason="a race needs two backends: triton (TRITON_INTERPRET=1 on the CPU) and torch")

linear_op = importlib.import_module("adaptsr.ops.lora_linear")


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on, from no choices, one timed call per backend (the interpreter is slow)."""
    monkeypatch.setattr(autotune, "REPEATS", 1)
    monkeypatch.setattr(autotune, "_switch", True)
    autotune.reset()
    yield
    autotune.reset()


@pytest.fixture
def trials(monkeypatch):
    """The backends timed so far, in order."""
    seen = []
    timed = autotune._median_ms

    def spy(run, backend, device):
        seen.append(backend)
        return timed(run, backend, device)

    monkeypatch.setattr(autotune, "_median_ms", spy)
    return seen


def _linear_inputs(tokens: int = 10, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, tokens, 16, generator=g, dtype=dtype)
    weight, bias = torch.randn(24, 16, generator=g, dtype=dtype), torch.randn(24, generator=g, dtype=dtype)
    lora_A, lora_B = torch.randn(4, 16, generator=g, dtype=dtype), torch.randn(24, 4, generator=g, dtype=dtype)
    x, weight, bias, lora_A, lora_B = (t.to(DEVICE) for t in (x, weight, bias, lora_A, lora_B))
    return x.requires_grad_(), weight, bias, lora_A.requires_grad_(), lora_B.requires_grad_(), 0.5


def _step(inputs):
    """Forward and backward of lora_linear; the output and the gradients of x, A, B."""
    out = lora_linear(*inputs)
    out.square().sum().backward()
    return out.detach(), [t.grad.clone() for t in (inputs[0], inputs[3], inputs[4])]


def test_each_signature_is_timed_once_and_keeps_its_choice(tuning, trials):
    _step(_linear_inputs())
    assert trials == CONTENDERS
    (record,) = autotune.measurements()
    assert record["op"] == "lora_linear" and list(record["times_ms"]) == CONTENDERS
    assert record["choice"] == min(record["times_ms"], key=record["times_ms"].get) and not record["errors"]
    _step(_linear_inputs())  # the same signature: no new trials
    assert len(trials) == len(CONTENDERS) and len(autotune.measurements()) == 1
    _step(_linear_inputs(tokens=12))  # another shape
    with torch.no_grad():  # no gradients needed: timed again, forward only
        lora_linear(*_linear_inputs())
    assert len(trials) == 3 * len(CONTENDERS)
    assert [r["signature"].endswith(", True, None)") for r in autotune.measurements()] == [True, True, False]


@pytest.mark.parametrize("winner", ["torch", "triton"])
def test_the_winner_runs_and_matches_the_reference(tuning, monkeypatch, winner):
    monkeypatch.setattr(autotune, "_median_ms", lambda run, backend, device: 1.0 if backend == winner else 2.0)
    ran = []
    apply = linear_op.apply_in_one_dtype
    monkeypatch.setattr(linear_op, "apply_in_one_dtype", lambda fn, *args: ran.append(args[-1]) or apply(fn, *args))
    out, grads = _step(_linear_inputs())
    assert ran == [winner] and autotune.measurements()[0]["choice"] == winner

    exact = [t.detach().cpu().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
             for t in _linear_inputs()]
    expected = lora_linear_ref(*exact)
    expected.square().sum().backward()
    # float32 products may run in TF32 on a GPU (the backends follow torch's TF32 settings)
    tolerance = {"rtol": 1e-4, "atol": 1e-3} if DEVICE.type == "cpu" else {"rtol": 1e-2, "atol": 5e-2}
    torch.testing.assert_close(out.cpu(), expected.float(), **tolerance)
    for got, leaf in zip(grads, (exact[0], exact[3], exact[4])):
        torch.testing.assert_close(got.cpu(), leaf.grad.float(), **tolerance)


def test_trials_leave_the_call_untouched(tuning):
    """The caller's leaves get no gradient from the trials, the random stream is not drawn from, and the call's
    results equal the chosen backend's run without autotuning, bit for bit."""
    inputs = _linear_inputs()
    rng = torch.get_rng_state()
    out = lora_linear(*inputs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(t.grad is None for t in (inputs[0], inputs[3], inputs[4]))
    out.square().sum().backward()
    grads = [t.grad for t in (inputs[0], inputs[3], inputs[4])]
    with set_backend(autotune.measurements()[0]["choice"]):
        expected_out, expected_grads = _step(_linear_inputs())
    assert torch.equal(out.detach(), expected_out)
    for got, expected in zip(grads, expected_grads):
        assert torch.equal(got, expected)


def test_a_backend_that_fails_its_trial_is_recorded_and_not_chosen(tuning, monkeypatch):
    timed = autotune._median_ms

    def refusing(run, backend, device):
        if backend == "torch":
            raise RuntimeError("these kernels refuse\nsecond line")
        return timed(run, backend, device)

    monkeypatch.setattr(autotune, "_median_ms", refusing)
    _step(_linear_inputs())
    (record,) = autotune.measurements()
    assert record["choice"] != "torch" and set(record["times_ms"]) == set(CONTENDERS) - {"torch"}
    assert record["errors"] == {"torch": "RuntimeError: these kernels refuse"}
    monkeypatch.setattr(autotune, "_median_ms", lambda run, backend, device: 1 / 0)
    with pytest.raises(RuntimeError, match="no backend ran lora_linear on these inputs: .*ZeroDivisionError"):
        lora_linear(*_linear_inputs(tokens=5))


def test_off_unless_asked_and_never_while_compiling(monkeypatch, trials):
    autotune.reset()
    monkeypatch.setattr(autotune, "_switch", None)
    monkeypatch.delenv("ADAPTSR_AUTOTUNE", raising=False)
    _step(_linear_inputs())
    assert not trials and not autotune.measurements() and not autotune.enabled()
    monkeypatch.setenv("ADAPTSR_AUTOTUNE", "1")
    assert autotune.enabled()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _step(_linear_inputs())
    assert not trials
    monkeypatch.undo()
    autotune.reset()


def test_every_op_with_several_backends_is_tuned(tuning):
    g = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    x, lora_A, lora_B = leaf(2, 8, 9, 11), leaf(4, 8, 3, 3), leaf(8, 4, 1, 1)
    weight = torch.randn(8, 8, 3, 3, generator=g).to(DEVICE)
    lora_conv2d(x, weight, None, lora_A, lora_B, 1.0, padding=1).sum().backward()

    window, heads, head_dim = 2, 1, 8
    n = window * window
    table = leaf((2 * window - 1) ** 2, heads)
    index = torch.randint(0, table.shape[0], (n, n), generator=g).to(DEVICE)
    q, k, v = (leaf(4, heads, n, head_dim) for _ in range(3))
    window_attention(q, k, v, table, index, None, head_dim ** -0.5).sum().backward()

    qkv = leaf(1, 4, 4, 3 * heads * head_dim)
    mask = torch.zeros(4, n, n, device=DEVICE)
    shifted_window_attention(qkv, table, index, mask, head_dim ** -0.5, window, 1, heads).sum().backward()

    records = autotune.measurements()
    ops = [r["op"] for r in records]
    # the shifted op's torch path runs the window core through window_attention, whose own call is tuned in turn
    # (its windows' signature is new); under triton it would not be called
    nested = ["window_attention"] if records[2]["choice"] == "torch" else []
    assert ops == ["lora_conv2d", "window_attention", "shifted_window_attention", *nested]
    assert all({"torch", "triton"} <= set(r["times_ms"]) <= set(CONTENDERS) for r in records)


@pytest.mark.skipif(len(autotune.candidates(torch.device("cpu"), None)) < 2,
                    reason="adapt runs on the CPU here, where only the Triton interpreter makes a race")
def test_adapt_records_the_choices(tuning, tmp_path, monkeypatch):
    # a set clock: interpreted Triton trials of every conv of the model would take minutes here
    monkeypatch.setattr(autotune, "_median_ms", lambda run, backend, device: {"torch": 1.0, "triton": 2.0}[backend])
    namespace: dict = {}
    exec((Path(__file__).parent / "train_task.py").read_text(), namespace)
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, log_every=0, seed=0)
    metrics = adapt(namespace["make_model"](), namespace["NoisyPairs"](n=4), tmp_path, config, device="cpu")
    written = json.loads((tmp_path / "metrics.json").read_text())["autotune"]
    assert written == metrics["autotune"] and written
    assert {r["op"] for r in written} == {"lora_conv2d"}
    assert all(r["choice"] == "torch" and r["times_ms"] == {"torch": 1.0, "triton": 2.0} for r in written)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_inside_a_checkpointed_region(tuning, use_reentrant):
    """Under torch's checkpoint the trials run in the region's forward (and, reentrant, in its recomputation in the
    backward); the region's gradients equal an unchecked, untuned run's."""
    from torch.utils.checkpoint import checkpoint

    inputs = _linear_inputs()
    out = checkpoint(lambda x, a, b: lora_linear(x, inputs[1], inputs[2], a, b, 0.5), inputs[0], inputs[3], inputs[4],
                     use_reentrant=use_reentrant)
    out.square().sum().backward()
    assert autotune.measurements()
    with set_backend(autotune.measurements()[-1]["choice"]):
        expected_out, expected_grads = _step(_linear_inputs())
    torch.testing.assert_close(out.detach(), expected_out, rtol=0, atol=0)
    for got, expected in zip((inputs[0].grad, inputs[3].grad, inputs[4].grad), expected_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
