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

from adaptsr import autotune, autotune_cache
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


# ---- choices kept on disk (adaptsr.autotune_cache) ----

@pytest.fixture
def cache(tuning, monkeypatch, tmp_path):
    """The cache on, in a fresh file; ``reset()`` then stands for a new process on the same machine."""
    file = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv("ADAPTSR_AUTOTUNE_CACHE", str(file))
    autotune.reset()
    yield file
    autotune.reset()


def _set_clock(monkeypatch, winner: str, seen: list | None = None):
    def clock(run, backend, device):
        if seen is not None:
            seen.append(backend)
        return 1.0 if backend == winner else 2.0

    monkeypatch.setattr(autotune, "_median_ms", clock)


def test_a_later_run_takes_the_kept_choice_without_timing(cache, monkeypatch):
    winner = CONTENDERS[-1]  # not the table's "torch", so that taking the kept choice shows
    seen: list = []
    _set_clock(monkeypatch, winner, seen)
    _step(_linear_inputs())
    (timed,) = autotune.measurements()
    assert len(seen) == len(CONTENDERS) and not timed["cached"] and timed["trials_ms"] > 0
    (machine_entries,) = json.loads(cache.read_text())["machines"].values()
    (entry,) = machine_entries.values()
    assert entry["choice"] == winner and entry["times_ms"] == {b: (1.0 if b == winner else 2.0) for b in CONTENDERS}

    autotune.reset()  # a new process
    ran = []
    apply = linear_op.apply_in_one_dtype
    monkeypatch.setattr(linear_op, "apply_in_one_dtype", lambda fn, *args: ran.append(args[-1]) or apply(fn, *args))
    _step(_linear_inputs())
    (record,) = autotune.measurements()
    assert len(seen) == len(CONTENDERS), "the kept choice was timed again"
    assert record["cached"] and record["choice"] == winner and record["times_ms"] == entry["times_ms"]
    assert record["trials_ms"] == 0 and ran == [winner]
    assert autotune.summary(autotune.measurements()).splitlines() == [
        f"autotune: lora_linear: {winner} 1 of 1 signature (1 from the cache)", "autotune: the trials took 0.00 s"]
    _step(_linear_inputs(tokens=7))  # a signature the file lacks is timed, and added beside the first
    assert len(seen) == 2 * len(CONTENDERS)
    assert len(json.loads(cache.read_text())["machines"][autotune_cache.machine(DEVICE)]) == 2


def test_other_hardware_versions_or_contenders_are_timed_again(cache, monkeypatch):
    seen: list = []
    _set_clock(monkeypatch, "torch", seen)
    _step(_linear_inputs())
    autotune.reset()
    monkeypatch.setattr(autotune_cache, "machine", lambda device: "another GPU, or torch upgraded")
    _step(_linear_inputs())
    assert len(seen) == 2 * len(CONTENDERS) and not autotune.measurements()[0]["cached"]
    assert len(json.loads(cache.read_text())["machines"]) == 2

    autotune.reset()  # the same machine, but a contender fewer (or more: the CUDA extension built since)
    inputs = _linear_inputs()
    assert autotune.choose("lora_linear", lora_linear, inputs, CONTENDERS[:1]) == CONTENDERS[0]
    assert len(seen) == 2 * len(CONTENDERS) + 1


def test_a_file_that_is_not_a_cache_is_warned_about_and_left_as_it_was(cache, monkeypatch):
    cache.parent.mkdir()
    cache.write_text("my notes, not JSON")
    _set_clock(monkeypatch, "torch")
    with pytest.warns(RuntimeWarning, match=rf"cache {cache} is not an adaptsr autotune cache.*going on without it"):
        _step(_linear_inputs())
    assert autotune.measurements()[0]["choice"] == "torch"
    assert cache.read_text() == "my notes, not JSON"


def test_a_cache_that_cannot_be_written_is_warned_about(tuning, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "autotune.json"  # under a file, not a folder
    monkeypatch.setenv("ADAPTSR_AUTOTUNE_CACHE", str(unwritable))
    _set_clock(monkeypatch, "torch")
    with pytest.warns(RuntimeWarning, match=rf"cache {unwritable} could not be (read|written)"):
        _step(_linear_inputs())
    assert autotune.measurements()[0]["choice"] == "torch"


def test_writes_merge_with_other_processes_entries(cache):
    autotune_cache.store(cache, "machine A", "op | sig 1 | torch", {"choice": "torch", "times_ms": {"torch": 1.0}})
    content = json.loads(cache.read_text())  # another process adds its own entry meanwhile
    content["machines"]["machine B"] = {"op | sig 2 | torch": {"choice": "torch", "times_ms": {"torch": 2.0}}}
    cache.write_text(json.dumps(content))
    autotune_cache.store(cache, "machine A", "op | sig 3 | torch", {"choice": "torch", "times_ms": {"torch": 3.0}})
    machines = json.loads(cache.read_text())["machines"]
    assert sorted(machines["machine A"]) == ["op | sig 1 | torch", "op | sig 3 | torch"]
    assert list(machines["machine B"]) == ["op | sig 2 | torch"]


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAPTSR_AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune_cache.cache_file() == tmp_path / "adaptsr" / "autotune.json"
    monkeypatch.setenv("ADAPTSR_AUTOTUNE_CACHE", "~/tune.json")
    assert autotune_cache.cache_file() == Path.home() / "tune.json"
    for off in ("off", "0", ""):
        monkeypatch.setenv("ADAPTSR_AUTOTUNE_CACHE", off)
        assert autotune_cache.cache_file() is None
    described = json.loads(autotune_cache.machine(DEVICE))
    assert described["torch"] == torch.__version__ and ("gpu" in described) == (DEVICE.type == "cuda")
