"""torchrun with 2 CPU processes (gloo): both ranks end with identical adapters, equal to one process's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaptsr.train import TrainConfig, adapt

TASK = (Path(__file__).parent / "train_task.py").read_text() + textwrap.dedent(
    """
    class RecordingPairs(NoisyPairs):
        # a validation set that remembers which items this process read
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.read = []

        def __getitem__(self, i):
            self.read.append(i)
            return super().__getitem__(i)
    """
)
CONFIG = dict(steps=6, batch_size=4, lr=2e-3, warmup_steps=2, checkpoint_every=3, log_every=0, seed=3)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _torchrun(script: Path, run_dir: Path) -> None:
    """``script run_dir`` in two CPU processes under torchrun; its stderr on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(run_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        TASK
        + textwrap.dedent(
            f"""
            import json, os, sys
            torch.set_num_threads(1)
            from adaptsr.train import TrainConfig, adapt
            model = make_model()
            val_set = RecordingPairs(n=3, seed=9)
            # each rank's half batch of 2 in micro-batches of 1: DDP's all-reduce held back for the first piece
            config = TrainConfig(**{CONFIG!r}, micro_batch=1)
            adapt(model, NoisyPairs(), sys.argv[1], config, val_set=val_set, device="cpu")
            rank = int(os.environ["RANK"])
            lora = {{k: v for k, v in model.state_dict().items() if "lora_" in k}}
            torch.save(lora, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
            with open(os.path.join(sys.argv[1], f"validated{{rank}}.json"), "w") as f:
                json.dump(sorted(set(val_set.read)), f)
            """
        )
    )
    run_dir = tmp_path / "run"
    _torchrun(script, run_dir)
    rank0 = torch.load(run_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(run_dir / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
    # rank 0 alone wrote the run folder
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "metrics.json").is_file()
    # each rank super-resolved its share of the validation set only
    assert json.loads((run_dir / "validated0.json").read_text()) == [0, 2]
    assert json.loads((run_dir / "validated1.json").read_text()) == [1]

    # Two ranks with half batches each (in pieces) and averaged gradients = one process with the whole batch.
    namespace: dict = {}
    exec(TASK, namespace)
    torch.set_num_threads(1)
    single = namespace["make_model"]()
    single_metrics = adapt(
        single, namespace["NoisyPairs"](), tmp_path / "single", TrainConfig(**CONFIG),
        val_set=namespace["NoisyPairs"](n=3, seed=9), device="cpu",
    )
    expected = _adapters(single)
    assert any(v.abs().max() > 0 for k, v in expected.items() if k.endswith("lora_B"))
    for key, value in expected.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=f"DDP differs from one process on {key}")
    # the gathered validation scores are the whole set's, as one process measures them
    ddp_val = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert [v["step"] for v in ddp_val] == [v["step"] for v in single_metrics["val"]] == [CONFIG["steps"]]
    for metric in ("psnr", "ssim"):
        assert ddp_val[0][metric] == pytest.approx(single_metrics["val"][0][metric], rel=1e-4)


GAN_TASK = TASK + textwrap.dedent(
    """
    import adaptsr.losses
    from adaptsr.discriminator import UNetDiscriminator

    def use_untrained_vgg():
        # no ImageNet download in the tests: a seeded random VGG19, as conftest's random_vgg fixture builds it
        build = adaptsr.losses._vgg19_features

        def untrained(pretrained):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                return build(False)

        adaptsr.losses._vgg19_features = untrained

    def make_discriminator():
        torch.manual_seed(4)
        return UNetDiscriminator(3, features=8)
    """
)
GAN_CONFIG = dict(CONFIG, perceptual_weight=0.5, gan_weight=0.1)


def test_torchrun_adversarial_adaptation(tmp_path, random_vgg):
    """With the GAN loss on, the discriminator's step is averaged over the ranks too: both ranks end with the same
    adapters and discriminator, and they equal one process's on the whole batch."""
    script = tmp_path / "ddp_gan_run.py"
    script.write_text(
        GAN_TASK
        + textwrap.dedent(
            f"""
            import os, sys
            torch.set_num_threads(1)
            from adaptsr.train import TrainConfig, adapt
            use_untrained_vgg()
            model, discriminator = make_model(), make_discriminator()
            adapt(model, NoisyPairs(), sys.argv[1], TrainConfig(**{GAN_CONFIG!r}), device="cpu",
                  discriminator=discriminator)
            state = {{k: v for k, v in model.state_dict().items() if "lora_" in k}}
            state.update({{"D." + k: v for k, v in discriminator.state_dict().items()}})
            torch.save(state, os.path.join(sys.argv[1], f"rank{{os.environ['RANK']}}.pt"))
            """
        )
    )
    run_dir = tmp_path / "run"
    _torchrun(script, run_dir)
    rank0 = torch.load(run_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(run_dir / "rank1.pt", weights_only=True)
    assert any(k.startswith("D.") for k in rank0) and any("lora_" in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
    assert (run_dir / "discriminator.safetensors").is_file()

    namespace: dict = {}
    exec(GAN_TASK, namespace)
    torch.set_num_threads(1)
    single, discriminator = namespace["make_model"](), namespace["make_discriminator"]()
    start = {k: v.clone() for k, v in discriminator.state_dict().items()}
    adapt(single, namespace["NoisyPairs"](), tmp_path / "single", TrainConfig(**GAN_CONFIG), device="cpu",
          discriminator=discriminator)
    expected = {**_adapters(single), **{"D." + k: v for k, v in discriminator.state_dict().items()}}
    assert not torch.equal(expected["D.conv1.weight_orig"], start["conv1.weight_orig"])
    for key, value in expected.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=f"DDP differs from one process on {key}")
