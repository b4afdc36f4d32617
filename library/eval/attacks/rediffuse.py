"""ReDiffuse (Li, Dong, He & Zhang, ICML 2025, "Towards black-box membership inference attack for diffusion
models"): ask the model's *variation* API for n variations of the query image and average them. A variation
noises the image a little and denoises it; the model's denoising error on a member is small, and averaging n
variations cancels the noise, so the average of a member's variations comes back closer to the member.

Per query and variation r < n (``--rediffuse_variations``, paper: 10), with fresh noise eps_r (the paired noise
``ctx.noise("rediffuse", r)``, the same for every model):
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps_r,    t = ``--rediffuse_timestep`` (paper, SD: 10),
then deterministic DDIM from t down in steps of k (``--rediffuse_interval``, paper: 10) to the clean latent, with
the query's caption and no guidance (the variation API's); decode. The average of the n decoded images is
compared with the query as the VAE shows it, decode(z_0) (the authors' SD code compares with that, not with the
query's pixels: the VAE's own reconstruction error would otherwise swamp a small-t denoising error): the paper's
score is their SSIM (:func:`~.image_distance.ssim`, skimage's defaults); we also keep the pixel MSE of the same
two images and the latent MSE of the averaged latent against z_0. Attack
(:class:`~.image_distance.DistanceClassifierAttack`, the suite's protocol): a logistic regression on D_aux over
the three (headline), and each alone as a threshold variant fitted on D_aux; ``dssim`` = 1 - SSIM is the
paper's own attack.

Cost: n x ceil(t / k) UNet queries (twice that with guidance) and n VAE decodes per sample (defaults: 10 x 1 = 10).

Our choices: the authors' SD script (lijingwei0502/diffusion_mia, ``stable_attack.py``) defaults to t = k = 50,
n = 1 with classifier-free guidance 7.5 and reads SSIM on grayscale images; we take the paper's SD setting as a
public re-implementation states it (t = k = n = 10; the flags give the script's), no guidance by default (a
variation API conditions on the image, and the caption here; ``--rediffuse_guidance_scale 7.5`` is the script's), RGB SSIM with data range 1, and denoise to the clean latent
rather than to alpha-bar of step 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from library.eval.attacks.blackbox import context_eps, ddim_denoise, guidance_passes
from library.eval.attacks.image_distance import (
    COST_OUTPUT,
    DistanceClassifierAttack,
    ssim,
)
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig


def variation_timesteps(timestep: int, interval: int) -> list[int]:
    """The DDIM steps of one variation: t, t - k, ... (> 0), each then stepping to the next or to the clean latent."""
    return list(range(timestep, 0, -interval))


class ReDiffuseProbe(Probe):
    """Per sample: ``dssim`` (1 - SSIM of the VAE-decoded query and its averaged variations), ``pixel`` (their MSE
    in [-1, 1]), ``latent`` (the MSE of the query's latent and the averaged variation latents), and the cost."""

    name = "rediffuse"

    def __init__(self, timestep: int = 10, interval: int = 10, variations: int = 10,
                 guidance_scale: float = 1.0) -> None:
        self.timestep = int(timestep)
        self.interval = int(interval)
        self.variations = int(variations)
        self.guidance_scale = float(guidance_scale)
        self.timesteps = variation_timesteps(self.timestep, self.interval)

    def settings(self) -> dict[str, Any]:
        # "reference" names what the averages are compared with (a cache written before it compared the pixels)
        return {"timestep": self.timestep, "interval": self.interval, "variations": self.variations,
                "guidance_scale": self.guidance_scale, "reference": "decoded_z0"}

    def queries_per_sample(self) -> float:
        return float(self.variations * len(self.timesteps) * guidance_passes(self.guidance_scale))

    def variation(self, ctx: QueryContext, draw: int) -> torch.Tensor:
        """The clean latents of one variation of the batch (noise draw ``draw``), fp32."""
        abar = float(ctx.model.alphas_cumprod[self.timestep])
        z = math.sqrt(abar) * ctx.z0.float() + math.sqrt(1.0 - abar) * ctx.noise("rediffuse", draw).float()
        key = f"rediffuse:t={self.timestep}:k={self.interval}:s={self.guidance_scale}:draw={draw}"
        return ddim_denoise(z, self.timesteps, context_eps(ctx, key, self.guidance_scale), ctx.model.alphas_cumprod)

    @torch.no_grad()
    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        image_sum = torch.zeros(())
        latent_sum = torch.zeros(())
        for draw in range(self.variations):
            latents = self.variation(ctx, draw)
            image_sum = image_sum + ctx.model.decode(latents).float().cpu()
            latent_sum = latent_sum + latents.cpu()
        images, latents = image_sum / self.variations, latent_sum / self.variations
        query = ctx.model.decode(ctx.z0).float().cpu()  # the query as the VAE shows it (the authors' reference)
        return {
            "dssim": 1.0 - ssim(query, images),
            "pixel": (query.double() - images.double()).square().flatten(1).mean(dim=1),
            "latent": (ctx.z0.float().cpu().double() - latents.double()).square().flatten(1).mean(dim=1),
            COST_OUTPUT: torch.full((len(ctx),), self.queries_per_sample(), dtype=torch.float64),
        }


class ReDiffuseAttack(DistanceClassifierAttack):
    name = "rediffuse"
    description = ("logistic regression on D_aux over the distances (1 - SSIM, pixel, latent) of the query image to "
                   "the average of n variations (noise to a small t, DDIM back) by the fine-tuned pipeline")
    threat_model = "black-box: a variation API (small-t img2img) of the fine-tuned pipeline, with the query's caption"
    citation = ("Li, Dong, He & Zhang, ICML 2025, Towards black-box membership inference attack for diffusion "
                "models (ReDiffuse)")

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> ReDiffuseAttack:
        probe = ReDiffuseProbe(config.rediffuse_timestep, config.rediffuse_interval, config.rediffuse_variations,
                               config.rediffuse_guidance_scale)
        return cls(probe, config.seed)


__all__ = ["ReDiffuseAttack", "ReDiffuseProbe", "variation_timesteps"]
