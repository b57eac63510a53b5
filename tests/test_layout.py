"""Merged checkpoints in the base file's own layout: BasicSR's wrapper, the original key names, the file's
dtypes and other entries kept, only the adapted weights replaced; refused, with the weight named, where a
weight cannot be placed."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptsr
from adaptsr.cli import main
from adaptsr.infer import upscale


def _adapter(checkpoint, folder, rank=2):
    """An adapter with nonzero B on every conv of ``checkpoint``."""
    model = adaptsr.load_model(checkpoint)
    torch.manual_seed(0)
    adaptsr.inject_lora(model, targets=r"model\..*", rank=rank, init_lora_weights=False)
    adaptsr.save_adapter(model, folder)
    return model


def _merge(checkpoint, adapter, out, *extra) -> int:
    return main(["merge", "--model", str(checkpoint), "--adapter", str(adapter), "--out", str(out), *extra])


@pytest.fixture
def basicsr_checkpoint(tmp_path, new_arch_rrdb):
    """A BasicSR training checkpoint: params_ema (what spandrel loads), params (the raw weights), an int."""
    ema = new_arch_rrdb(seed=0)
    raw = new_arch_rrdb(seed=1)
    path = tmp_path / "net_g.pth"
    torch.save({"params_ema": ema, "params": raw, "iter": 5000}, path)
    return path


def test_basicsr_layout_is_kept(basicsr_checkpoint, tmp_path, capsys):
    adapted = _adapter(basicsr_checkpoint, tmp_path / "adapter")
    out = tmp_path / "merged.pth"
    assert _merge(basicsr_checkpoint, tmp_path / "adapter", out) == 0
    printed = capsys.readouterr().out
    assert "in the layout of" in printed and "dropped params, a second copy" in printed
    base, merged = torch.load(basicsr_checkpoint, weights_only=True), torch.load(out, weights_only=True)
    assert set(merged) == {"params_ema", "iter"} and merged["iter"] == 5000
    assert list(merged["params_ema"]) == list(base["params_ema"])  # BasicSR's names, in the file's order
    changed = {k for k, v in merged["params_ema"].items() if not torch.equal(v, base["params_ema"][k])}
    # every conv weight took its update; the biases, which LoRA does not touch, are the file's own
    assert changed == {k for k in base["params_ema"] if k.endswith(".weight")}
    for key, value in merged["params_ema"].items():
        assert value.dtype == base["params_ema"][key].dtype and value.shape == base["params_ema"][key].shape
    # spandrel opens it as it opened the base, and it is the adapted model
    reopened = adaptsr.load_model(out)
    assert reopened.architecture.id == "ESRGAN" and reopened.scale == 4
    x = torch.rand(1, 3, 8, 6)
    torch.testing.assert_close(upscale(reopened, x), upscale(adapted, x), rtol=1e-4, atol=5e-5)


def test_nesting_is_dropped_in_a_safetensors_file(basicsr_checkpoint, tmp_path, capsys):
    _adapter(basicsr_checkpoint, tmp_path / "adapter")
    out = tmp_path / "merged.safetensors"
    assert _merge(basicsr_checkpoint, tmp_path / "adapter", out) == 0
    assert "wrote the weights of params_ema at the top level" in capsys.readouterr().out
    assert _merge(basicsr_checkpoint, tmp_path / "adapter", tmp_path / "merged.pth") == 0
    nested = torch.load(tmp_path / "merged.pth", weights_only=True)["params_ema"]
    flat = load_file(str(out))
    assert list(flat) != [] and set(flat) == set(nested)
    for key, value in nested.items():
        assert torch.equal(flat[key], value), key
    assert adaptsr.load_model(out).architecture.id == "ESRGAN"


def test_spandrel_layout_on_request(basicsr_checkpoint, tmp_path):
    _adapter(basicsr_checkpoint, tmp_path / "adapter")
    out = tmp_path / "merged.safetensors"
    assert _merge(basicsr_checkpoint, tmp_path / "adapter", out, "--layout", "spandrel") == 0
    assert next(iter(load_file(str(out)))).startswith("model.")  # spandrel's ESRGAN keys


def test_prefixes_dtypes_and_metadata_are_kept(tmp_path, capsys, new_arch_rrdb):
    """A DataParallel checkpoint in fp16 with a model card: keys keep `module.`, weights stay fp16 unless
    --precision says otherwise, the metadata stays."""
    base = tmp_path / "dp.safetensors"
    state = {f"module.{k}": v.half() for k, v in new_arch_rrdb().items()}
    save_file(state, str(base), metadata={"modelspec.title": "my camera x4"})
    adapted = _adapter(base, tmp_path / "adapter")
    for precision, dtype in ((None, torch.float16), ("fp32", torch.float32)):
        out = tmp_path / f"merged-{precision}.safetensors"
        assert _merge(base, tmp_path / "adapter", out, *(["--precision", precision] if precision else [])) == 0
        merged = load_file(str(out))
        assert set(merged) == set(state) and {v.dtype for v in merged.values()} == {dtype}
        with safe_open(str(out), framework="pt") as f:
            assert f.metadata() == {"modelspec.title": "my camera x4"}
    assert not capsys.readouterr().out.count("note:")
    # the fp32 file is the adapted model to fp32 rounding of the fp16 base's update
    x = torch.rand(1, 3, 8, 6)
    torch.testing.assert_close(upscale(adaptsr.load_model(tmp_path / "merged-fp32.safetensors"), x),
                               upscale(adapted, x), rtol=1e-4, atol=5e-5)


def test_full_finetuning_is_placed_too(basicsr_checkpoint, tmp_path):
    """save_model(like=...) compares with the base file, so a model without adapters (fully fine-tuned,
    biases included) keeps the layout as well."""
    model = adaptsr.load_model(basicsr_checkpoint)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.01)
    notes = adaptsr.save_model(model, tmp_path / "ft.pth", like=basicsr_checkpoint)
    assert notes == ["dropped params, a second copy of the weights that would still be the base's"]
    stored = torch.load(tmp_path / "ft.pth", weights_only=True)["params_ema"]
    base = torch.load(basicsr_checkpoint, weights_only=True)["params_ema"]
    for key in base:
        torch.testing.assert_close(stored[key], base[key] + 0.01, rtol=0, atol=1e-6)


def test_unplaceable_weights_are_refused(tmp_path, capsys, new_arch_rrdb):
    """Two layers with the same base weights: which stored copy belongs to the adapted one is unknowable."""
    state = new_arch_rrdb()
    state["conv_hr.weight"] = state["conv_up2.weight"].clone()
    base = tmp_path / "tied.pth"
    torch.save(state, base)
    model = adaptsr.load_model(base)
    adaptsr.inject_lora(model, targets=r"model\.8", rank=2, init_lora_weights=False)  # conv_hr alone
    adaptsr.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged.pth"
    assert _merge(base, tmp_path / "adapter", out) == 1
    err = capsys.readouterr().err
    assert "model.8.weight" in err and "stored 2 times" in err and "--layout spandrel" in err
    assert not out.exists()
    assert _merge(base, tmp_path / "adapter", out, "--layout", "spandrel") == 0


def test_a_model_of_another_configuration_is_refused(basicsr_checkpoint, tmp_path, new_arch_rrdb):
    other = tmp_path / "other.pth"
    torch.save(new_arch_rrdb(nf=16), other)
    expected = r"does not match checkpoint .*net_g\.pth: model\.0\.weight is \(16, 3, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        adaptsr.save_model(adaptsr.load_model(other), tmp_path / "x.pth", like=basicsr_checkpoint)


def test_other_entries_of_a_training_checkpoint_are_kept(tmp_path, new_arch_rrdb):
    """Entries that are not the weights (an optimizer's int-keyed state, lists) come through unchanged."""
    weights = new_arch_rrdb()
    optimizer = {"state": {0: {"exp_avg": torch.randn(8, 3, 3, 3), "step": torch.tensor(7.0)}},
                 "param_groups": [{"lr": 1e-4}]}
    base = tmp_path / "training.pth"
    torch.save({"params": weights, "optimizer": optimizer, "losses": [0.5, 0.25]}, base)
    adapted = _adapter(base, tmp_path / "adapter")
    assert adaptsr.save_model(adapted, tmp_path / "merged.pth", like=base) == []
    merged = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert merged["losses"] == [0.5, 0.25] and merged["optimizer"]["param_groups"] == [{"lr": 1e-4}]
    assert torch.equal(merged["optimizer"]["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert not torch.equal(merged["params"]["conv_first.weight"], weights["conv_first.weight"])
