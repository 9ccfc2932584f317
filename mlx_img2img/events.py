"""What the denoising loop tells its caller, and how features hook into it.

Step events replace a bare progress counter: each carries the latents and the predicted clean latents
(x0), so progress bars, previews and a server's progress endpoint all read the same thing, and the
receiver can stop the run (return True) for a clean, distinct cancelled outcome.

Step hooks are the one extension point of the one loop: what varies per step for a feature (the
inpainting channels and mask blending, ControlNet residuals) is a hook, not a second loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx


@dataclass
class StepEvent:
    """After one denoising step. `index` counts from 1 to `total` over the whole generation (with a
    refiner, over both models' steps); `model` says which model ran it ("base" or "refiner")."""

    index: int
    total: int
    timestep: float
    latents: mx.array  # NHWC, after the step
    x0: mx.array  # NHWC, the clean latents the model predicted at this step (lazy: computed when read)
    model: str = "base"


# A receiver of step events; returning True asks the run to stop after this step.
StepCallback = Callable[[StepEvent], bool | None]


@dataclass
class StepContext:
    """What a hook knows about the step it is called for."""

    index: int  # into the sampler's timesteps
    sampler: Any  # the Scheduler
    last: bool  # the final step of this run


class StepHook:
    """Per-step behaviour of a feature. Every method has a no-op default, so a hook overrides only
    what it changes; hooks are applied in order."""

    def unet_input(self, x: mx.array, step: StepContext) -> mx.array:
        """The (scaled) model input; e.g. inpainting UNets take the mask and masked-image latents too."""
        return x

    def unet_extras(self, x: mx.array, step: StepContext) -> dict[str, Any]:
        """Extra keyword arguments of the UNet call for this step (e.g. ControlNet residuals)."""
        return {}

    def after_step(self, x: mx.array, step: StepContext) -> mx.array:
        """The latents after the sampler's step; e.g. blending the kept region back in."""
        return x
