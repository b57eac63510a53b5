"""What the adaptation loop minimises: L1, and for adversarial adaptation (AdaptSR-GAN) the VGG
perceptual loss and a GAN loss against a discriminator trained alongside the adapters; pyiqa's learned
distances (LPIPS, DISTS, ...) can join in with weights of their own.

Generator loss = pixel_weight * L1(sr, hr) + perceptual_weight * VGG(sr, hr) + gan_weight * BCE(D(sr), real)
               + sum over iqa_loss_weights' metrics m of weight_m * m(sr, hr).
After each generator step the discriminator takes one step of its own (Adam, Real-ESRGAN's betas,
a constant ``discriminator_lr``) on BCE(D(hr), real) + BCE(D(sr), fake), the two halves back-propagated
one after the other, as Real-ESRGAN does, which keeps one forward per backward under DDP.

With a micro-batch size, each batch goes through the networks in pieces whose gradients accumulate, each
piece's loss weighted by its share of the batch: every loss is a mean over equally sized images, so the
step is the whole batch's up to float rounding, with one piece's activations in memory at a time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adaptsr.losses import gan_loss, iqa_loss, vgg_perceptual_loss

__all__ = ["Objective", "batch_pieces", "syncing_last"]

_DISCRIMINATOR_BETAS = (0.9, 0.99)


def batch_pieces(size: int, *tensors: torch.Tensor) -> list[tuple[float, tuple[torch.Tensor, ...]]]:
    """The batch (each tensor's first dimension) in pieces of at most ``size`` items (0: one piece), each with its
    share of the batch, the weight of its mean loss in the batch's."""
    n = tensors[0].shape[0]
    if not size or size >= n:
        return [(1.0, tensors)]
    # slices, not split(): a model that writes into its input (spandrel's RCAN) may write into a slice, and autograd
    # refuses in-place writes into the views that split() returns together
    return [(min(size, n - start) / n, tuple(t[start:start + size] for t in tensors)) for start in range(0, n, size)]


def syncing_last(network: nn.Module, last: bool):
    """DDP's gradient all-reduce held back (``no_sync``) for all but a step's last backward: the pieces' gradients
    accumulate locally and are averaged over the ranks once."""
    if isinstance(network, DistributedDataParallel) and not last:
        return network.no_sync()
    return contextlib.nullcontext()


class Objective:
    """The training losses of one run, and the discriminator with its optimizer when the GAN loss is on."""

    def __init__(self, config, device: torch.device, discriminator: nn.Module | None, world: int = 1) -> None:
        self.perceptual = vgg_perceptual_loss(device) if config.perceptual_weight > 0 else None
        # pyiqa's distances, each a term named after its metric (placed before "gan" in the log's order)
        self.iqa = {name: iqa_loss(name, device) for name, weight in config.iqa_loss_weights.items() if weight > 0}
        self.weights = {"pixel": config.pixel_weight, "perceptual": config.perceptual_weight,
                        **{name: config.iqa_loss_weights[name] for name in self.iqa}, "gan": config.gan_weight}
        self.discriminator = None
        self.discriminator_network = None
        self.discriminator_optimizer = None
        self.world = world
        if config.gan_weight > 0:
            if discriminator is None:
                raise ValueError("gan_weight > 0 needs a discriminator")
            self.discriminator = discriminator.to(device).train()
            # under DDP the discriminator's own step averages its gradients over the ranks; the generator
            # step calls the bare module, whose parameters are frozen there
            self.discriminator_network = (
                DistributedDataParallel(discriminator, device_ids=[device] if device.type == "cuda" else None)
                if world > 1 else discriminator
            )
            self.discriminator_optimizer = torch.optim.Adam(
                discriminator.parameters(), lr=config.discriminator_lr, betas=_DISCRIMINATOR_BETAS
            )

    @property
    def terms(self) -> list[str]:
        """The names of the loss terms this run logs, in order."""
        names = [name for name, weight in self.weights.items() if weight > 0]
        return names + (["discriminator_real", "discriminator_fake"] if self.discriminator is not None else [])

    def generator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, each term): in fp32, the networks under the caller's autocast."""
        terms = {}
        if self.weights["pixel"] > 0:
            terms["pixel"] = F.l1_loss(sr.float(), hr.float())
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(sr, hr)
        for name, loss in self.iqa.items():
            terms[name] = loss(sr, hr)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)  # the generator's gradient only; D steps on its own
            try:
                terms["gan"] = gan_loss(self.discriminator(sr), real=True)
            finally:
                self.discriminator.requires_grad_(True)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

    def discriminator_step(self, sr: torch.Tensor, hr: torch.Tensor, use_bf16: bool,
                           micro_batch: int = 0) -> dict[str, torch.Tensor]:
        """One Adam step of the discriminator on this batch (skipped, on every rank, when a loss is not finite),
        in pieces of ``micro_batch`` images (0: the whole batch at once)."""
        optimizer = self.discriminator_optimizer
        optimizer.zero_grad(set_to_none=True)
        losses = {}
        halves = (("discriminator_real", hr, True), ("discriminator_fake", sr.detach(), False))
        for h, (name, images, real) in enumerate(halves):
            pieces = batch_pieces(micro_batch, images)
            total = 0.0
            for i, (share, (part,)) in enumerate(pieces):
                with syncing_last(self.discriminator_network, h == len(halves) - 1 and i == len(pieces) - 1):
                    with torch.autocast(part.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        logits = self.discriminator_network(part)
                    loss = gan_loss(logits, real)
                    (loss * share if share != 1 else loss).backward()
                total = total + loss.detach() * share
            losses[name] = total
        finite = torch.isfinite(torch.stack(list(losses.values()))).all().float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item():
            optimizer.step()
        return losses

    def state_dict(self) -> dict | None:
        if self.discriminator is None:
            return None
        return {"model": self.discriminator.state_dict(), "optimizer": self.discriminator_optimizer.state_dict()}

    def load_state_dict(self, state: dict | None, source: str) -> None:
        """The discriminator's weights and optimizer from a checkpoint (``source`` names it in errors)."""
        if (state is None) != (self.discriminator is None):
            had = "with" if state is not None else "without"
            raise ValueError(
                f"checkpoint {source} was trained {had} a GAN loss and this run is not; resume with the run's own "
                "loss options (gan_weight), or start a new run"
            )
        if state is None:
            return
        self.discriminator.load_state_dict(state["model"])
        self.discriminator_optimizer.load_state_dict(state["optimizer"])
