"""Image generation through diffusers' StableDiffusionPipeline, for training-time samples and evaluation.

Prompt files follow sd-scripts' text format: one prompt per line, ``#`` comments, and optional inline options
``--n <negative prompt> --w <width> --h <height> --d <seed> --s <steps> --l <cfg scale>`` (any case). sd-scripts'
``--ss <sampler>`` is read and ignored (samples use one sampler; a warning says so); any other option, and
sd-scripts' TOML / JSON prompt files, are one ConfigError line.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from library.errors import ConfigError, warn
from library.fileio import atomic_write_path
from library.sd.bundle import ModelBundle
from library.sd.text import encode_prompts

# An option is " --x" followed by whitespace or the end: the whitespace stays with the value, so an empty
# value ("--n --d 3") cannot swallow the next option.
_OPTION = re.compile(r"\s--([A-Za-z]+)(?=\s|$)")
_IGNORED_OPTIONS = {"ss": "sampler"}


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None


def parse_prompt_line(line: str, source: str = "prompt") -> PromptSpec:
    """``"a cat --n blurry --d 3 --s 20"`` -> PromptSpec(prompt="a cat", negative_prompt="blurry", ...)."""
    parts = _OPTION.split(" " + line.strip())
    spec = PromptSpec(prompt=parts[0].strip())
    fields = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
              "s": ("steps", int), "l": ("guidance_scale", float)}
    for flag, value in zip(parts[1::2], parts[2::2]):
        flag = flag.lower()
        if flag in _IGNORED_OPTIONS:
            continue
        if flag not in fields:
            raise ConfigError(f"{source}: unknown prompt option --{flag}; the options are "
                              + ", ".join(f"--{f} ({name})" for f, (name, _) in fields.items()))
        name, kind = fields[flag]
        if not value.strip() and flag != "n":  # an empty --n is no negative prompt, as in sd-scripts
            raise ConfigError(f"{source}: option --{flag} has no value")
        try:
            parsed = kind(value.strip())
        except ValueError:
            raise ConfigError(f"{source}: option --{flag} expects a {kind.__name__}, got {value.strip()!r}") from None
        if (problem := _value_problem(flag, parsed)) is not None:  # now, not in the pipeline after an epoch
            raise ConfigError(f"{source}: option --{flag} {problem}, got {value.strip()!r}")
        spec = replace(spec, **{name: parsed})
    return spec


def _value_problem(flag: str, value: float) -> str | None:
    """What is wrong with a prompt option's value (None: nothing)."""
    if flag in ("w", "h") and (value <= 0 or value % 8):
        return "must be a positive multiple of 8 (pixels)"
    if flag == "s" and value < 1:
        return "must be at least 1 (sampling steps)"
    if flag == "d" and not 0 <= value < 2**63:
        return "must be a seed in [0, 2**63)"
    if flag == "l" and not math.isfinite(value):
        return "must be a finite guidance scale"
    return None


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    if path.suffix.lower() in (".toml", ".json"):
        raise ConfigError(f"prompt file {path}: sd-scripts' {path.suffix} prompt files are not read; write one prompt "
                          "per line with inline --n / --w / --h / --d / --s / --l options (a .txt file)")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    specs = [parse_prompt_line(line, f"{path}:{i}") for i, line in lines]
    if not specs:
        raise ConfigError(f"prompt file {path} holds no prompt")
    ignored = sorted({f for _, line in lines for f in _OPTION.findall(" " + line) if f.lower() in _IGNORED_OPTIONS})
    if ignored:
        warn(f"prompt file {path}: " + ", ".join(f"--{f} ({_IGNORED_OPTIONS[f.lower()]})" for f in ignored)
             + " ignored: samples use one sampler")
    return specs


def build_pipeline(bundle: ModelBundle, sampler: str = "ddim"):
    """A StableDiffusionPipeline over the bundle's (possibly LoRA-patched) modules; no safety checker."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: PLC0415

    schedulers = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if sampler not in schedulers:
        raise ConfigError(f"sampler must be one of {sorted(schedulers)}, got {sampler!r}")
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=schedulers[sampler].from_config(bundle.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, specs: Sequence[PromptSpec], *, resolution: int, steps: int = 20, guidance_scale: float = 7.5,
             seed: int = 0, clip_skip: int = 1, max_token_length: int | None = None,
             autocast: Callable[[], ContextManager] | None = None) -> list:
    """PIL images, one per spec; image ``i`` uses the spec's seed, else ``seed + i`` (independent of order).

    The prompts are encoded as training encodes captions (:func:`library.sd.text.encode_prompts`: kohya's
    ``clip_skip`` and 75-token chunks up to ``max_token_length``), not by the pipeline, which truncates at 77 tokens
    and counts clip skip one lower; with ``clip_skip=1`` and one window both give the same embeddings.

    ``autocast``: a training run's mixed-precision context, where the UNet and text encoder are cast to bf16/fp16
    (or only one of them, in a full fine-tune) while the VAE stays fp32: denoising runs under it, and the latents
    are decoded by the fp32 VAE outside it (SD's VAE overflows in fp16).
    """
    def encode(prompt: str) -> torch.Tensor:
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt], max_token_length=max_token_length,
                              clip_skip=clip_skip)

    images = []
    for i, spec in enumerate(specs):
        generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else seed + i)
        with contextlib.nullcontext() if autocast is None else autocast():
            out = pipe(prompt_embeds=encode(spec.prompt), negative_prompt_embeds=encode(spec.negative_prompt or ""),
                       height=_given(spec.height, resolution), width=_given(spec.width, resolution),
                       num_inference_steps=_given(spec.steps, steps),
                       guidance_scale=_given(spec.guidance_scale, guidance_scale), generator=generator,
                       output_type="pil" if autocast is None else "latent")
        images.append(out.images[0] if autocast is None else _decode(pipe, out.images))
    return images


def _given(value, default):
    return default if value is None else value


def _decode(pipe, latents: torch.Tensor):
    """The pipeline's own decoding of ``latents``, by the VAE in its own dtype: one PIL image."""
    vae = pipe.vae
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def save_grid(images: Sequence, path: str | Path, columns: int | None = None) -> Path:
    """Tile PIL images into one PNG, written atomically (a killed run leaves no half-written image)."""
    from PIL import Image  # noqa: PLC0415

    if not images:
        raise ValueError("no images to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    # Cells as large as the largest image: prompts may ask for other sizes (--w / --h); none is cropped.
    width, height = max(image.size[0] for image in images), max(image.size[1] for image in images)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    path = Path(path)
    with atomic_write_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
