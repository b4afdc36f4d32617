"""What the training loop trains on: records from the split manifest (or a plain folder) and their latents.

Training reads only the manifest: D_tr = D^m_aux ∪ D^m_te are the members the LoRA fits; MP/SMP-LoRA's
proxy attacker also sees D^m_aux and D^nm_aux. An image that appears in several roles (a D^m_aux image is
also in D_tr) gets one latent, cached once (upstream cached it twice with different VAE samples) and held once:
D^m_aux's and D^m_te's latents are rows of D_tr's (:func:`member_latents`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.data.dataset import ImageCaption, scan_dataset
from library.data.images import open_rgb
from library.data.latents import LatentCache
from library.data.manifest import (
    SplitManifest,
    manifest_sha256,
    read_manifest,
    split_sha256,
)
from library.errors import DataError
from library.fileio import sha256_file
from library.sd.bundle import ModelBundle, vae_fingerprint
from library.train.config import TrainConfig
from library.train.methods.base import AuxData
from library.train.samplers import check_batch_fits

if TYPE_CHECKING:
    from library.train.methods.base import TrainingMethod


@dataclass
class LabelledSet:
    """Images with their captions and clean latents.

    ``keys`` name each image where the proxy needs a stable identity (its fixed noise, its cached base features):
    the manifest's sha256 of the image, as evaluation keys its noise, so that a dataset moved to another folder
    gives the same run; for a --train_data_dir folder, the sha256 of each file; otherwise the image's path.
    ``keyed_by_content``: the keys are the images' verified sha256, which the latent cache then takes as they are.
    """

    paths: list[Path]
    captions: list[str]
    latents: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    keyed_by_content: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [str(path) for path in self.paths]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class TrainingData:
    members: LabelledSet  # D_tr
    member_aux: LabelledSet | None = None  # D^m_aux (subset of D_tr)
    nonmember_aux: LabelledSet | None = None  # D^nm_aux
    member_test: LabelledSet | None = None  # D^m_te (subset of D_tr)
    nonmember_test: LabelledSet | None = None  # D^nm_te
    manifest_sha256: str | None = None  # the file's bytes
    split_sha256: str | None = None  # its splits' content (library.data.manifest.split_sha256)
    prior: LabelledSet | None = None  # DreamBooth's class images: never a member nor a non-member, so not in sets()

    def aux_data(self) -> AuxData | None:
        """The proxy attacker's D^m_aux and D^nm_aux (None without both, or before their latents are encoded)."""
        member, nonmember = self.member_aux, self.nonmember_aux
        if not (member and nonmember) or member.latents is None or nonmember.latents is None:
            return None
        return AuxData(member.latents, member.captions, nonmember.latents, nonmember.captions, member.keys,
                       nonmember.keys)

    def sets(self) -> list[LabelledSet]:
        return [s for s in (self.members, self.member_aux, self.nonmember_aux, self.member_test,
                            self.nonmember_test) if s is not None]

    def split_roles(self) -> dict[str, str]:
        """sha256 -> "a member" / "a non-member" of every image of the split (a folder run's keys are file hashes
        too; an image keyed by its path has none)."""
        roles = {key: "a non-member" for s in (self.nonmember_aux, self.nonmember_test) if s is not None
                 for key in s.keys}
        return {**roles, **{key: "a member" for key in self.members.keys}}


def _labelled(manifest: SplitManifest, entries, repeat: bool = False) -> LabelledSet:
    """The entries as a set; ``repeat``: each as many times as its kohya ``<repeats>_<name>`` folder says (D_tr
    only: an epoch is one pass over the repeated list, as in sd-scripts; the attacker's and the evaluation's sets
    hold each image once)."""
    entries = [e for e in entries for _ in range(e.repeats if repeat else 1)]
    return LabelledSet([manifest.abs_path(e) for e in entries], [e.caption for e in entries],
                       keys=[e.sha256 for e in entries], keyed_by_content=True)


def most_repeats(labelled: LabelledSet) -> tuple[int, list[Path]]:
    """How often the most repeated image occurs, by key, and the files under which it does (each once): D_tr's
    keys are the images' sha256 (from the manifest, or hashed from a --train_data_dir folder), so kohya repeats and
    one image under two names both count."""
    counts = Counter(labelled.keys)
    if not counts:
        return 0, []
    key, repeats = counts.most_common(1)[0]
    return repeats, sorted({Path(path) for path, k in zip(labelled.paths, labelled.keys) if k == key})


def check_training_data(data: TrainingData, method: type[TrainingMethod], config: TrainConfig, world_size: int) -> None:
    """What the method needs of the sets, checked before any model work (so ``--dry_run`` says it): each member
    image once where the method says why (``distinct_members``: kohya repeats or one image under two names are
    refused), and an attacker's D^m_aux / D^nm_aux each filling one ``--attacker_batch_size`` batch."""
    repeats, files = most_repeats(data.members) if method.distinct_members else (1, [])
    if repeats > 1:
        raise DataError(f"{method.distinct_members}: an image occurs {repeats} times in D_tr (as "
                        f"{', '.join(map(str, files))}: kohya <repeats>_<name> folders, or one image under two "
                        f"names); train {method.name} on a set with each image once")
    if method.needs_aux and data.member_aux is not None and data.nonmember_aux is not None:
        for aux, what in ((data.member_aux, "D^m_aux"), (data.nonmember_aux, "D^nm_aux")):
            check_batch_fits(len(aux), config.attacker_batch_size, world_size, f"{what} (--attacker_batch_size)")
    method.check_data(config, len(data.members))


def load_training_records(config: TrainConfig, needs_aux: bool) -> TrainingData:
    """Resolve the images to train on (verifying the manifest's hashes); no model work yet."""
    if config.split_manifest:
        manifest = read_manifest(config.split_manifest, verify=True)
        data = TrainingData(
            members=_labelled(manifest, manifest.members(), repeat=True),
            member_aux=_labelled(manifest, manifest.member_aux),
            nonmember_aux=_labelled(manifest, manifest.nonmember_aux),
            member_test=_labelled(manifest, manifest.member_test),
            nonmember_test=_labelled(manifest, manifest.nonmember_test),
            manifest_sha256=manifest_sha256(config.split_manifest),
            split_sha256=split_sha256(manifest),
        )
        if needs_aux and (len(data.member_aux) == 0 or len(data.nonmember_aux) == 0):
            raise DataError(f"{config.split_manifest}: MP/SMP-LoRA need non-empty member_aux and nonmember_aux "
                            "sets (re-run scripts/make_split.py with aux sizes > 0)")
    else:
        if needs_aux:
            raise DataError("MP/SMP-LoRA need a split manifest (--split_manifest) to know the auxiliary "
                            "member and non-member sets; --train_data_dir is for plain LoRA")
        records: list[ImageCaption] = scan_dataset(config.train_data_dir, config.caption_extension)
        if config.dry_run:  # a manifest's images were decoded by make_split.py; a folder's are checked here
            for record in records:
                open_rgb(record.path)
        paths, captions, keys = [], [], []
        for record in records:  # kohya's <repeats>_<name> folders: repeat the image in the epoch
            paths += [record.path] * record.repeats
            captions += [record.caption] * record.repeats
            keys += [sha256_file(record.path)] * record.repeats  # by content, as a manifest keys its images
        data = TrainingData(members=LabelledSet(paths, captions, keys=keys, keyed_by_content=True))
    if len(data.members) == 0:
        raise DataError("the training set (members) is empty")
    return data


def latent_cache_dir(config: TrainConfig) -> Path | None:
    """Where on-disk latents go (None without ``--cache_latents_to_disk``)."""
    if not config.cache_latents_to_disk:
        return None
    return Path(config.latent_cache_dir or Path(config.output_dir) / "latent_cache")


def attach_latents(data: TrainingData, bundle: ModelBundle, config: TrainConfig, device: torch.device, *,
                   every_set: bool = True) -> None:
    """Encode the images once with the VAE (cached in memory, and on disk if asked): D_tr and the class images, and
    with ``every_set`` the auxiliary and test sets (a proxy attacker reads them; the other methods never look at a
    non-member, whose encoding would cost a VAE pass per image for nothing). D^m_aux and D^m_te are D_tr's rows
    (:func:`member_latents`), not sets of their own."""
    cache = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), config.resolution, latent_cache_dir(config),
                        batch_size=config.vae_batch_size, mode=config.latent_mode, seed=config.seed,
                        full_determinism=config.full_determinism)
    nonmembers = [data.nonmember_aux, data.nonmember_test] if every_set else []
    for labelled in (data.members, *nonmembers, data.prior):  # D_tr first: member_latents reads its rows
        if labelled is not None:
            digests = labelled.keys if labelled.keyed_by_content else None  # verified already: not hashed again
            labelled.latents = cache.get_many(labelled.paths, digests).to(device)
    if every_set:
        for subset in (data.member_aux, data.member_test):
            if subset is not None:
                subset.latents = member_latents(data.members, subset)


def member_latents(members: LabelledSet, subset: LabelledSet) -> torch.Tensor:
    """The latents of ``subset`` (D^m_aux or D^m_te, whose images are all in D_tr) taken from D_tr's: neither
    hashed nor encoded again, and held once. A view of D_tr's tensor where the subset's rows are contiguous (each
    image once: D_tr is D^m_aux then D^m_te), else a gather of its rows (kohya repeats, one image under two names).
    Rows are found by key (the image's sha256), so a latent is the one D_tr's encoding gave that image."""
    assert members.latents is not None
    first: dict[str, int] = {}
    for row, key in enumerate(members.keys):
        first.setdefault(key, row)
    rows = [first[key] for key in subset.keys]
    start = rows[0] if rows else 0
    if rows == list(range(start, start + len(rows))):
        return members.latents[start:start + len(rows)]
    return members.latents[rows]
