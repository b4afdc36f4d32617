"""DreamBooth's prior preservation (Ruiz et al. 2023), as diffusers' and kohya's DreamBooth trainers do it.

The instance images (the manifest's members, D_tr) carry an identifier in their captions ("a photo of sks dog",
``--instance_token sks``). ``--with_prior_preservation`` adds, to every step, as many *class images* ("a photo of a
dog") denoised in the same batched forward, and their loss times ``--prior_loss_weight``: the model keeps what it
knew of the class while it learns the instance.

Class images come from ``--class_data_dir``: images with same-stem caption files, or without, captioned by
``--class_prompt``; an sd-scripts regularisation folder works too (its ``<repeats>_<class>`` subfolders are read, an
image without a caption file is captioned by its class name as sd-scripts does; the repeats are not used). When
the folder holds fewer than ``--num_class_images``, the base model generates the missing ones from
``--class_prompt`` (seeded per image, so the cache is the same whoever fills it) and writes them there with their
caption, as diffusers' ``train_dreambooth.py`` does; later runs reuse them. Like diffusers, a run uses the first
``num_class_images`` images of the folder (sorted by path).

Class images are never members nor non-members: they are not in the split manifest (one with the content of a
split image is refused), the proxy attacker of MP/SMP-LoRA never sees them, and the membership sets (and their
counts) are the manifest's alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, ContextManager, Mapping

import torch

from library.data.dataset import (
    REPEATS_DIR,
    ImageCaption,
    caption_suffix,
    is_image,
    read_caption_file,
)
from library.data.images import open_rgb
from library.errors import ConfigError, DataError
from library.fileio import atomic_write_path, atomic_write_text, sha256_file
from library.outputs import OutputLock, check_output_dir
from library.runtime import hashed_seed
from library.sd.bundle import ModelBundle
from library.sd.sampling import PromptSpec, build_pipeline, generate
from library.train.config import TrainConfig

GENERATED_PREFIX = "class_"
PriorRecords = tuple[list[ImageCaption], int]  # the class images with their captions, and how many were generated


def _images(folder: Path) -> list[Path]:
    """The class images of ``folder``: its own and those of kohya ``<repeats>_<class>`` subfolders (an sd-scripts
    regularisation folder, ``reg/1_dog/*.png``), sorted by path; none when it does not exist yet."""
    if not folder.is_dir():
        return []
    folders = [folder] + sorted(sub for sub in folder.iterdir() if sub.is_dir() and REPEATS_DIR.match(sub.name))
    return sorted(p for sub in folders for p in sub.iterdir() if is_image(p))


def has_word(caption: str, word: str) -> bool:
    """``word`` appears in ``caption`` as a whole token (so "sks" is not found in "asks")."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", caption) is not None


def check_instance_captions(paths: list[Path], captions: list[str], token: str) -> None:
    """Every instance caption names the identifier; else one DataError line naming the first that does not."""
    for path, caption in zip(paths, captions):
        if not has_word(caption, token):
            raise DataError(f"the caption of member image {path} ({caption!r}) does not contain the identifier "
                            f"'{token}' (--instance_token): write it into the member captions (e.g. 'a photo of "
                            f"{token} dog'), or drop --instance_token")


def missing_class_images(config: TrainConfig) -> int:
    """How many class images the base model must still generate into ``--class_data_dir``."""
    return max(0, config.num_class_images - len(_images(Path(config.class_data_dir or ""))))


def check_prior_config(config: TrainConfig) -> None:
    """Prior preservation's settings, before any model work (one ConfigError line each)."""
    if not config.with_prior_preservation:
        return
    if not config.class_data_dir:
        raise ConfigError("'with_prior_preservation' needs 'class_data_dir': a folder of class images, or an empty "
                          "one for the base model to fill from 'class_prompt'")
    folder = Path(config.class_data_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"'class_data_dir' {folder} is not a folder")
    if config.num_class_images < config.train_batch_size:  # every step pairs each member with a class image
        raise ConfigError(f"'num_class_images' = {config.num_class_images} is fewer than one batch "
                          f"(train_batch_size = {config.train_batch_size}): each step denoises as many class images "
                          "as members; use at least that many")
    if missing_class_images(config):  # the base model will write them there: a folder that can take them
        check_output_dir(folder, "--class_data_dir", create=not config.dry_run)
    if missing_class_images(config) and not config.class_prompt:
        raise ConfigError(f"'class_data_dir' {folder} holds fewer than num_class_images = {config.num_class_images} "
                          "class images and no 'class_prompt' is given to generate the rest: add images or set "
                          "class_prompt (e.g. 'a photo of a dog')")
    if config.instance_token and config.class_prompt and has_word(config.class_prompt, config.instance_token):
        raise ConfigError(f"'class_prompt' {config.class_prompt!r} contains the identifier "
                          f"'{config.instance_token}': the class prompt names the class only (e.g. 'a photo of a dog')")


def generate_class_images(config: TrainConfig, bundle: ModelBundle,
                          autocast: Callable[[], ContextManager] | None = None) -> int:
    """Fill ``--class_data_dir`` up to ``--num_class_images`` with the base model's images; how many were made.

    Call it before any adapter is attached, or with the adapter switched off: the prior is the *base* model's.
    Runs sharing the folder generate one at a time, under its lock (:class:`~library.outputs.OutputLock`, waiting):
    one run renders the missing images, the next finds them there, and no image is rendered twice or gets another
    run's caption. A full folder is only read, and needs no lock (nor write access)."""
    if not missing_class_images(config):
        return 0
    with OutputLock(config.class_data_dir, "--class_data_dir", wait=True):
        return _fill(config, bundle, missing_class_images(config), autocast)  # counted again: another run's turn


def _fill(config: TrainConfig, bundle: ModelBundle, missing: int,
          autocast: Callable[[], ContextManager] | None) -> int:
    """Render ``missing`` class images into the free ``class_NNNNN.png`` names, each seeded by its index."""
    if not missing:
        return 0
    folder = Path(config.class_data_dir)
    pipe = build_pipeline(bundle)
    made, index = 0, 0
    while made < missing:
        image_path = folder / f"{GENERATED_PREFIX}{index:05d}.png"
        index += 1
        if image_path.exists():
            continue
        spec = PromptSpec(config.class_prompt, seed=hashed_seed("class-image", config.seed, index - 1))
        image = generate(pipe, [spec], resolution=config.resolution, steps=config.class_sample_steps,
                         clip_skip=config.clip_skip, max_token_length=config.max_token_length, autocast=autocast)[0]
        with atomic_write_path(image_path) as tmp:
            image.save(tmp, format="PNG")
        atomic_write_text(image_path.with_suffix(caption_suffix(config.caption_extension)), config.class_prompt)
        made += 1
    return made


def _class_record(config: TrainConfig, folder: Path, image: Path) -> ImageCaption:
    """One class image with its caption (caption file, else ``--class_prompt``, else its kohya class name)."""
    caption_path = image.with_suffix(caption_suffix(config.caption_extension))
    kohya_class = REPEATS_DIR.match(image.parent.name) if image.parent != folder else None
    if caption_path.is_file():
        caption = read_caption_file(caption_path)
    elif config.class_prompt:
        caption = config.class_prompt
    elif kohya_class:  # sd-scripts captions such an image by its folder's class name
        caption = kohya_class.group(2)
    else:
        raise DataError(f"class image {image} has no caption file {caption_path.name} and no 'class_prompt' is "
                        "given: write one, or set class_prompt")
    if config.instance_token and has_word(caption, config.instance_token):
        raise DataError(f"the caption of class image {image} ({caption!r}) contains the identifier "
                        f"'{config.instance_token}': class captions name the class only")
    return ImageCaption(image, caption)


def class_images(config: TrainConfig, *, existing_only: bool = False) -> list[ImageCaption]:
    """The first ``--num_class_images`` class images with their captions; ``existing_only``: those there now (a dry
    run checks them before any is generated)."""
    folder = Path(config.class_data_dir)
    records = [_class_record(config, folder, image) for image in _images(folder)[:config.num_class_images]]
    if len(records) < config.num_class_images and not existing_only:
        raise DataError(f"'class_data_dir' {folder} holds {len(records)} class image(s), fewer than num_class_images "
                        f"= {config.num_class_images}")
    return records


def check_outside_split(records: list[ImageCaption], split: Mapping[str, str]) -> None:
    """No class image is one of the split's images (``split``: sha256 -> which set): class images are trained on
    but never audited, so a member or non-member among them would make the audit measure the wrong thing."""
    for record in records:
        role = split.get(sha256_file(record.path))
        if role is not None:
            raise DataError(f"class image {record.path} is {role} of the split (the same file content): class "
                            "images are trained on but never audited, so they must come from outside the split; "
                            "remove it (an empty --class_data_dir is filled by the base model from --class_prompt)")


def check_class_images(config: TrainConfig, split: Mapping[str, str]) -> None:
    """The class images there now, before any is generated: captions, decoding, outside the split (one line each)."""
    records = class_images(config, existing_only=True)
    for record in records:
        open_rgb(record.path)
    check_outside_split(records, split)


def prior_records(config: TrainConfig, bundle: ModelBundle,
                  on_main: Callable[[Callable[[], PriorRecords]], PriorRecords],
                  autocast: Callable[[], ContextManager] | None = None) -> PriorRecords:
    """The class images a run trains its prior on, generated first where missing (from the base model as loaded:
    call this before the trained parameters are attached), and how many were generated.

    Only the main process generates and reads the folder; ``on_main``
    (:meth:`~library.train.collectives.Collectives.on_main`) gives every rank its list, so all ranks train on the
    same images even if another run adds some meanwhile, and its refusal stops every rank. Torch's global RNG is
    left as it was, so the adapter's initialisation does not depend on the generation."""

    def main_process_records() -> PriorRecords:
        state = torch.get_rng_state()
        made = generate_class_images(config, bundle, autocast) if missing_class_images(config) else 0
        torch.set_rng_state(state)
        return class_images(config), made

    return on_main(main_process_records)
