"""The tiny training task of the training tests, run in-process and in subprocesses (torchrun, SIGKILL).

Not a test module: tests read its source so that subprocesses can run exactly the same task.
"""

import torch
import torch.nn.functional as F
from spandrel.architectures.ESRGAN import ESRGAN

import adaptsr


class NoisyPairs(torch.utils.data.Dataset):
    # HR: smooth random images; LR: area-downscaled with fixed noise (a "camera profile")
    def __init__(self, n=12, size=16, scale=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
        self.hr = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        self.lr = (F.avg_pool2d(self.hr, scale) + 0.05 * torch.randn(n, 3, size // scale, size // scale, generator=g))

    def __len__(self):
        return len(self.hr)

    def __getitem__(self, i):
        return self.lr[i], self.hr[i]


def lora_state(model):
    """A copy of the model's adapter weights (every ``lora_`` entry of its state dict)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def make_model():
    torch.manual_seed(0)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    adaptsr.inject_lora(model, targets="model[.].*", rank=3)  # every conv, the tail included
    return model


def crashes_after(items):
    """NoisyPairs whose reading of item number ``items + 1`` raises KeyboardInterrupt: a run killed mid-step."""

    class Crashing(NoisyPairs):
        calls = 0

        def __getitem__(self, i):
            type(self).calls += 1
            if self.calls > items:
                raise KeyboardInterrupt("simulated crash")
            return super().__getitem__(i)

    return Crashing()


class Grey(torch.nn.Module):
    """A one-channel SR model that declares its output channels, as spandrel's descriptors do."""

    output_channels = 1

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)
