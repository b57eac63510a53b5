"""combine_adapters: the combined adapter's update is the weighted sum of the adapters' updates (float64, on
whole spandrel models, with per-layer ranks, alphas, rsLoRA, layers only one adapter has, and ranks beyond
what a layer allows), PEFT's add_weighted_adapter("cat") agrees, and bad input changes nothing."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import peft
import pytest
import torch
from torch import nn

import adaptsr
from adaptsr.inject import lora_layers, unwrap_model

# (model, preset, first adapter's options, second adapter's options): the second adapts fewer layers
MODELS = {
    "swinir": ("swinir", {"rank": 4, "alpha": 8, "rank_pattern": {"proj": 2}},
               {"rank": 2, "alpha": 3, "use_rslora": True, "targets": r".*\.(qkv|fc1)"}),
    "esrgan": ("esrgan", {"rank": 4, "alpha_pattern": {r"conv5\.0": 1.5}}, {"rank": 3, "targets": r".*conv[13]\.0"}),
    # transposed convs (conv*_up) among the layers
    "realcugan": ("realcugan", {"rank": 2}, {"rank": 3, "alpha": 2, "targets": r"unet2\.(conv\d_up|conv3\.conv\.0)"}),
}


def _adapter(base: nn.Module, directory, seed: int, preset: str, options: dict) -> None:
    """Train-like random adapter (B non-zero) on a copy of ``base``, saved to ``directory``."""
    adapted = copy.deepcopy(base)
    torch.manual_seed(seed)
    options = dict(options)
    where = {"targets": options.pop("targets")} if "targets" in options else {"preset": preset}
    adaptsr.inject_lora(adapted, init_lora_weights=False, **where, **options)
    adaptsr.save_adapter(adapted, directory)


def _merged(base: nn.Module, directory, strength: float = 1.0) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    adaptsr.load_adapter(model, directory)
    adaptsr.set_adapter_strength(model, strength)
    return adaptsr.merge_lora(model).state_dict()


def _weighted_sum_of_merges(base: nn.Module, directories, weights) -> dict[str, torch.Tensor]:
    """W + sum_i w_i (W_i - W), with W_i the base merged with adapter i alone."""
    expected = {key: value.clone() for key, value in base.state_dict().items()}
    for directory, weight in zip(directories, weights):
        for key, value in _merged(base, directory).items():
            if value.is_floating_point():
                expected[key] += weight * (value - base.state_dict()[key])
    return expected


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_combined_update_is_the_weighted_sum(tmp_path, tiny_sr, name):
    preset, first, second = MODELS[name]
    base = getattr(tiny_sr, name)().double().eval()
    directories = [tmp_path / "first", tmp_path / "second"]
    _adapter(base, directories[0], 1, preset, first)
    _adapter(base, directories[1], 2, preset, second)
    weights = [0.3, -1.2]

    model = copy.deepcopy(base)
    summary = adaptsr.combine_adapters(model, directories, weights)
    one, two = (dict(lora_layers(_loaded(base, d))) for d in directories)
    assert set(summary.layers) == set(one) | set(two)
    assert set(two) < set(one)  # some layers have one adapter's part only
    for layer_name, layer in lora_layers(model):
        assert layer.rank == sum(m[layer_name].rank for m in (one, two) if layer_name in m)
        assert layer.scaling == 1.0
    _assert_same_state(adaptsr.merge_lora(model).state_dict(), _weighted_sum_of_merges(base, directories, weights))


def _loaded(base: nn.Module, directory) -> nn.Module:
    model = copy.deepcopy(base)
    adaptsr.load_adapter(model, directory)
    return model


def test_ranks_beyond_a_layer_are_factorised_again_exactly(tmp_path, tiny_sr):
    """Two rank-8 adapters on ESRGAN's 8-channel convs: 16 is more than those layers allow, so they get the sum
    refactorised at their largest rank, still exact; wider layers keep the concatenation."""
    base = tiny_sr.esrgan().double().eval()
    directories = [tmp_path / "a", tmp_path / "b"]
    for seed, directory in enumerate(directories):
        _adapter(base, directory, seed, "esrgan", {"rank": 8})
    model = copy.deepcopy(base)
    summary = adaptsr.combine_adapters(model, directories, [1.0, 0.5])
    max_ranks = {n: type(layer)._max_rank(layer.base_layer) for n, layer in lora_layers(model)}
    assert summary.layers == {n: min(16, m) for n, m in max_ranks.items()}
    assert any(m < 16 for m in max_ranks.values()) and any(m >= 16 for m in max_ranks.values())
    _assert_same_state(adaptsr.merge_lora(model).state_dict(), _weighted_sum_of_merges(base, directories, [1.0, 0.5]))


def test_one_adapter_with_a_weight_is_that_strength(tmp_path, tiny_sr):
    base = tiny_sr.swinir().double().eval()
    _adapter(base, tmp_path, 0, "swinir", {"rank": 4, "alpha": 2, "use_rslora": True})
    model = copy.deepcopy(base)
    adaptsr.combine_adapters(model, [tmp_path], [0.7])
    _assert_same_state(adaptsr.merge_lora(model).state_dict(), _merged(base, tmp_path, strength=0.7))


def test_the_combined_adapter_saves_and_loads_as_any_other(tmp_path, tiny_sr):
    base = tiny_sr.swinir().eval()
    directories = [tmp_path / "a", tmp_path / "b"]
    _adapter(base, directories[0], 0, "swinir", {"rank": 4})
    _adapter(base, directories[1], 1, "swinir", {"rank": 2, "alpha": 5})
    combined = copy.deepcopy(base)
    adaptsr.combine_adapters(combined, directories, [0.5, 0.5])
    adaptsr.save_adapter(combined, tmp_path / "mix")
    reloaded = _loaded(base, tmp_path / "mix")
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), combined(x), rtol=0, atol=0)
    other_base = tiny_sr.swinir(seed=5)
    with pytest.raises(ValueError, match="trained for another base model"):
        adaptsr.load_adapter(other_base, tmp_path / "mix")


@pytest.mark.parametrize("weights", [[0.6, 0.4], [1.0, -0.5]])
def test_peft_add_weighted_adapter_cat_agrees(tmp_path, tiny_sr, weights):
    """PEFT's own concatenation of the same two adapter files gives the same outputs, and PEFT loads ours."""
    base = tiny_sr.swinir().eval()
    directories = [tmp_path / "a", tmp_path / "b"]
    _adapter(base, directories[0], 0, "swinir", {"rank": 4, "alpha": 8})
    _adapter(base, directories[1], 1, "swinir", {"rank": 2, "alpha": 3, "targets": r".*\.(qkv|fc1)"})
    ours = copy.deepcopy(base)
    adaptsr.combine_adapters(ours, directories, weights)
    adaptsr.save_adapter(ours, tmp_path / "mix")
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that the spandrel model is not a transformers model
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directories[0]), adapter_name="a")
        theirs.load_adapter(str(directories[1]), adapter_name="b")
        theirs.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
        theirs.set_adapter("mix")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix"))
    with torch.no_grad():
        expected = unwrap_model(ours)(x)
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


def _layer_deltas(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's update s B A (float64)."""
    return {name: layer.get_delta_weight().detach().double() for name, layer in lora_layers(model)}


def test_a_rank_cap_keeps_the_best_approximation_of_the_sum(tmp_path, tiny_sr):
    """rank=3 on a rank-4 + rank-2 combination: each layer keeps its sum's 3 leading singular directions, so
    the error left is the energy of the rest, block by block; layers the cap does not bind stay exact."""
    from adaptsr.low_rank import update_blocks

    base = tiny_sr.realcugan().double().eval()
    preset, first, second = MODELS["realcugan"]
    directories = [tmp_path / "a", tmp_path / "b"]
    _adapter(base, directories[0], 1, preset, first)
    _adapter(base, directories[1], 2, preset, second)
    exact, capped = copy.deepcopy(base), copy.deepcopy(base)
    exact_ranks = adaptsr.combine_adapters(exact, directories, [0.5, 0.8]).layers
    summary = adaptsr.combine_adapters(capped, directories, [0.5, 0.8], rank=3)
    assert summary.layers == {name: min(3, rank) for name, rank in exact_ranks.items()}
    assert any(rank > 3 for rank in exact_ranks.values()) and any(rank <= 3 for rank in exact_ranks.values())
    layers = dict(lora_layers(capped))
    exact_deltas, capped_deltas = _layer_deltas(exact), _layer_deltas(capped)
    for name, delta in exact_deltas.items():
        base_layer = layers[name].base_layer
        for block, approx in zip(update_blocks(base_layer, delta), update_blocks(base_layer, capped_deltas[name])):
            tail = torch.linalg.svdvals(block)[3:].square().sum()
            assert float((block - approx).square().sum()) == pytest.approx(float(tail), rel=1e-9, abs=1e-20), name


def test_a_rank_cap_shrinks_a_single_adapter(tmp_path, tiny_sr):
    base = tiny_sr.swinir().double().eval()
    _adapter(base, tmp_path, 0, "swinir", {"rank": 4})
    full, shrunk = _loaded(base, tmp_path), copy.deepcopy(base)
    summary = adaptsr.combine_adapters(shrunk, [tmp_path], rank=2)
    assert set(summary.layers.values()) == {2}
    for name, delta in _layer_deltas(full).items():
        U, S, Vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        torch.testing.assert_close(_layer_deltas(shrunk)[name].reshape(best.shape), best, rtol=0, atol=1e-12)


def test_peft_add_weighted_adapter_svd_agrees(tmp_path, tiny_sr):
    base = tiny_sr.swinir().eval()
    directories = [tmp_path / "a", tmp_path / "b"]
    _adapter(base, directories[0], 0, "swinir", {"rank": 4, "alpha": 8})
    _adapter(base, directories[1], 1, "swinir", {"rank": 4, "alpha": 3})
    ours = copy.deepcopy(base)
    adaptsr.combine_adapters(ours, directories, [0.7, 0.3], rank=3)
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directories[0]), adapter_name="a")
        theirs.load_adapter(str(directories[1]), adapter_name="b")
        theirs.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="svd", svd_rank=3)
        theirs.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), unwrap_model(ours)(x), rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused_and_leaves_the_model_alone(tmp_path, tiny_sr):
    base = tiny_sr.swinir().eval()
    good = tmp_path / "good"
    _adapter(base, good, 0, "swinir", {"rank": 2})
    foreign = tmp_path / "foreign"
    _adapter(tiny_sr.swinir(seed=3), foreign, 0, "swinir", {"rank": 2})
    model = copy.deepcopy(base)
    cases = [
        (([good, foreign], None), rf"adapter {foreign}.* was trained for another base model"),
        (([good, tmp_path / "missing"], None), "missing does not exist"),
        (([good, good], [1.0]), "1 weights for 2 adapters"),
        (([good], [float("nan")]), f"the weight of adapter {good} is nan"),
        (([], None), "at least one adapter"),
    ]
    for (directories, weights), message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            adaptsr.combine_adapters(model, directories, weights)
        assert not list(lora_layers(model))
    for rank in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"rank must be a positive integer or None, got {rank!r}"):
            adaptsr.combine_adapters(model, [good], rank=rank)
        assert not list(lora_layers(model))
    adaptsr.combine_adapters(model, [good, foreign], strict_base=False)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        adaptsr.combine_adapters(model, [good])


# -- the CLI: several --adapter on merge (and eval, upscale, through the same loader), and `adaptsr combine` --


@pytest.fixture
def base_and_adapters(tiny_sr, tmp_path):
    base = tiny_sr.esrgan().eval()
    adaptsr.save_model(base, tmp_path / "base.safetensors")
    _adapter(base, tmp_path / "a", 0, "esrgan", {"rank": 4})
    _adapter(base, tmp_path / "b", 1, "esrgan", {"rank": 2, "targets": r".*conv[13]\.0"})
    return base, tmp_path / "base.safetensors", [tmp_path / "a", tmp_path / "b"]


def _weights_of(checkpoint) -> dict[str, torch.Tensor]:
    return adaptsr.load_model(checkpoint).model.state_dict()


def test_merge_and_combine_commands_apply_the_weighted_sum(base_and_adapters, tmp_path, capsys):
    from adaptsr.cli import main

    base, checkpoint, (a, b) = base_and_adapters
    adapters = ["--model", str(checkpoint), "--adapter", str(a), "--strength", "0.6", "--adapter", str(b),
                "--strength", "-0.4"]
    assert main(["merge", *adapters, "--out", str(tmp_path / "merged.safetensors")]) == 0
    assert f"with 0.6 x {a} + -0.4 x {b} merged in" in capsys.readouterr().out
    expected = _weighted_sum_of_merges(base, [a, b], [0.6, -0.4])
    merged = _weights_of(tmp_path / "merged.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)

    assert main(["combine", *adapters, "--out", str(tmp_path / "mix")]) == 0
    assert f"wrote {tmp_path / 'mix'}: 0.6 x {a} + -0.4 x {b} as one adapter on" in capsys.readouterr().out
    assert main(["merge", "--model", str(checkpoint), "--adapter", str(tmp_path / "mix"),
                 "--out", str(tmp_path / "from-mix.safetensors")]) == 0
    from_mix = _weights_of(tmp_path / "from-mix.safetensors")
    for key, value in merged.items():
        torch.testing.assert_close(from_mix[key], value, rtol=1e-6, atol=1e-7, msg=key)

    capsys.readouterr()
    assert main(["combine", *adapters, "--rank", "3", "--out", str(tmp_path / "small")]) == 0
    assert "(rank 3," in capsys.readouterr().out  # 4 + 2, or 4 where b adapts nothing, capped at 3
    capped = copy.deepcopy(base)
    adaptsr.combine_adapters(capped, [a, b], [0.6, -0.4], rank=3)
    written = _loaded(base, tmp_path / "small").state_dict()
    assert written.keys() == capped.state_dict().keys()
    for key, value in capped.state_dict().items():
        torch.testing.assert_close(written[key], value, msg=key)


def test_upscale_with_several_adapters_is_upscale_with_their_merge(base_and_adapters, tmp_path, capsys):
    from PIL import Image

    from adaptsr.cli import main

    _, checkpoint, (a, b) = base_and_adapters
    Image.new("RGB", (10, 12), (90, 160, 30)).save(tmp_path / "lr.png")
    adapters = ["--adapter", str(a), "--strength", "0.3", "--adapter", str(b), "--strength", "0.9"]
    assert main(["merge", "--model", str(checkpoint), *adapters, "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["upscale", str(tmp_path / "lr.png"), "--model", str(checkpoint), *adapters,
                 "--out", str(tmp_path / "two")]) == 0
    assert main(["upscale", str(tmp_path / "lr.png"), "--model", str(tmp_path / "m.safetensors"),
                 "--out", str(tmp_path / "merged")]) == 0
    two, merged = (np.asarray(Image.open(tmp_path / d / "lr.png")) for d in ("two", "merged"))
    base = tmp_path / "base-only"
    assert main(["upscale", str(tmp_path / "lr.png"), "--model", str(checkpoint), "--out", str(base)]) == 0
    assert two.shape == (24, 20, 3) and np.array_equal(two, merged)
    assert not np.array_equal(two, np.asarray(Image.open(base / "lr.png")))


def test_adapter_flag_errors(base_and_adapters, tiny_sr, tmp_path, capsys):
    from adaptsr.cli import main

    _, checkpoint, (a, b) = base_and_adapters
    foreign = tmp_path / "foreign"
    _adapter(tiny_sr.esrgan(seed=4), foreign, 0, "esrgan", {"rank": 2})
    out = tmp_path / "out.safetensors"
    cases = [
        (["merge", "--adapter", a, "--adapter", b, "--strength", "0.5", "--out", out],
         "2 --adapter and 1 --strength: give one --strength per --adapter"),
        (["merge", "--adapter", a, "--adapter", b, "--out", out], "2 --adapter need one --strength each"),
        (["merge", "--adapter", a, "--strength", "1", "--adapter", foreign, "--strength", "1", "--out", out],
         f"adapters {a}, {foreign} do not fit model {checkpoint}: adapter {foreign}"),
        (["combine", "--adapter", a, "--adapter", b, "--strength", "1", "--strength", "1", "--out", b],
         f"--out {b} is one of the --adapter directories"),
        (["combine", "--adapter", a, "--strength", "1", "--adapter", foreign, "--strength", "1",
          "--out", tmp_path / "mix"], "trained for another base"),
    ]
    with pytest.raises(SystemExit) as usage:
        main(["combine", "--model", str(checkpoint), "--adapter", str(a), "--rank", "0", "--out", str(tmp_path / "x")])
    assert usage.value.code == 2 and "0 is not a positive number" in capsys.readouterr().err
    for argv, message in cases:
        command, *rest = argv
        assert main([command, "--model", str(checkpoint), *map(str, rest)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"adaptsr {command}: error: ") and message in err, err
    assert not out.exists() and not (tmp_path / "mix").exists()
    assert sorted(p.name for p in b.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
