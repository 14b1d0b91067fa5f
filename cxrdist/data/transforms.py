"""One augmentation definition, batched, on whatever device the batch lives.

:class:`Augment` turns a loader batch's ``image`` (uint8 or int32 ``B x 1 x S x S``) into a normalised float
``B x C x image_size x image_size``. Training draws a random affine per sample (rotation, translation,
scale: the poster's Fig. 2) and applies all of them with ONE ``F.affine_grid`` + ``F.grid_sample`` that also
resamples to ``image_size`` (packed 256 -> trained 224 costs nothing extra), then per-sample brightness and
contrast. Evaluation only resizes (antialiased) when the sizes differ. The per-sample parameters are drawn
by :meth:`Augment.draw` from a CPU ``torch.Generator`` seeded per batch (so a resumed step redraws the same
parameters): the workers seed from (seed, epoch, rank, batch), the trainer's device path from (seed, step,
rank), so a run augmented on the device draws other parameters than one augmented in workers. The same code
applies them on whatever device the batch lives; given the same parameters (``forward(x, params=...)``) the
CPU and GPU outputs agree to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_8BIT = 255.0
MAX_16BIT = 65535.0


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> /255, int32/int16/uint16 (16-bit pixels) -> /65535, float -> unchanged; float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(MAX_8BIT)
    if images.dtype in (torch.int32, torch.int16, torch.uint16, torch.int64):
        return images.float().div_(MAX_16BIT)
    if images.is_floating_point():
        return images.to(torch.float32, copy=True)
    raise TypeError(f"cannot scale images of dtype {images.dtype}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=device).mul_(high - low).add_(low)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, C, size, size], align_corners=False)`` by broadcasting.

    Each output pixel's input location is ``theta @ (x, y, 1)`` over the pixel-centre coordinates: two
    multiply-adds per pixel instead of a batched matmul (affine_grid is the slowest step on a CPU worker).
    """
    b = theta.shape[0]
    coords = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    per_x = coords.view(1, 1, size, 1) * theta[:, :, 0].reshape(b, 1, 1, 2)  # B x 1 x S x 2
    per_y = coords.view(1, size, 1, 1) * theta[:, :, 1].reshape(b, 1, 1, 2) + theta[:, :, 2].reshape(b, 1, 1, 2)
    return per_x + per_y  # B x S x S x 2


class Augment(torch.nn.Module):
    """Batched augmentation + normalisation; ``forward(images, generator=None)``.

    ``in_chans`` (default: the input's) repeats a grey batch to 3 channels; ``channels_last`` returns the
    output in that memory format (what a channels_last model wants, saving a copy).
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        rotate_deg: float = 10,
        translate: float = 0.06,
        scale: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.15,
        contrast: float = 0.15,
        mean: float = 0.5,
        std: float = 0.25,
        in_chans: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.image_size, self.train_mode = int(image_size), bool(train)
        self.rotate_deg, self.translate = float(rotate_deg), float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.mean, self.std = float(mean), float(std)
        self.in_chans, self.channels_last = in_chans, channels_last

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, train={self.train_mode}, rotate_deg={self.rotate_deg}, "
            f"translate={self.translate}, scale={self.scale}, brightness={self.brightness}, "
            f"contrast={self.contrast}, mean={self.mean}, std={self.std}"
        )

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, params: torch.Tensor | None = None
    ) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"Augment wants a B x C x H x W batch, got shape {tuple(images.shape)}")
        x = to_float(images)
        if self.train_mode:
            x = self._train(x, self.draw(x.shape[0], generator) if params is None else params)
        else:
            x = self._resize(x)
        x = x.sub_(self.mean).div_(self.std)
        if self.in_chans and self.in_chans != x.shape[1]:
            if x.shape[1] != 1:
                raise ValueError(f"cannot turn {x.shape[1]} channels into {self.in_chans}")
            x = x.expand(-1, self.in_chans, -1, -1)
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Eval: shorter side to image_size (antialiased), centre crop; nothing when already that size."""
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x
        if h != w:
            th, tw = (s, max(s, round(w * s / h))) if h < w else (max(s, round(h * s / w)), s)
        else:
            th, tw = s, s
        x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (th - s) // 2, (tw - s) // 2
        return x[..., top : top + s, left : left + s]

    def draw(self, b: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The 6 x B per-sample parameters (angle, tx, ty, zoom, brightness, contrast), on the generator's device."""
        angle = _uniform(b, -self.rotate_deg, self.rotate_deg, generator).mul_(math.pi / 180)
        tx = _uniform(b, -self.translate, self.translate, generator).mul_(2)  # fraction of the side -> [-1, 1]
        ty = _uniform(b, -self.translate, self.translate, generator).mul_(2)
        zoom = _uniform(b, self.scale[0], self.scale[1], generator)
        bright = _uniform(b, 1 - self.brightness, 1 + self.brightness, generator)
        contr = _uniform(b, 1 - self.contrast, 1 + self.contrast, generator)
        return torch.stack([angle, tx, ty, zoom, bright, contr])

    def _train(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s = self.image_size
        if x.device.type == "cuda" and params.device.type == "cpu":  # 6 x B numbers drawn on the CPU: pinned,
            params = params.pin_memory()  # so the copy below does not make the host wait for the GPU
        angle, tx, ty, zoom, bright, contr = params.to(device=x.device, dtype=x.dtype, non_blocking=True)
        # output pixel (normalised coords) -> input location: rotate, shrink by the zoom, shift
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        x = F.grid_sample(x, affine_grid(theta, s), mode="bilinear", padding_mode="zeros", align_corners=False)
        # brightness then contrast about the image mean, as one multiply-add per sample
        m = x.mean(dim=(1, 2, 3)) * bright
        gain, shift = bright * contr, m * (1 - contr)
        return x.mul_(gain.view(b, 1, 1, 1)).add_(shift.view(b, 1, 1, 1)).clamp_(0.0, 1.0)
