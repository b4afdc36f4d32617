"""Which settings a training run reads: the options that only one method, the proxy attacker, DreamBooth or a
LoRA network read, the warnings when a run is given options it ignores (:func:`check_for_method`), and the
settings a resume may change because this run never reads them (:func:`inert_settings`)."""

from __future__ import annotations

import dataclasses

from library.config import DEFAULT, value_sources
from library.errors import warn
from library.train.config import TrainConfig
from library.train.methods import method_class

#: What only one method reads (its training script's name -> its options), and what only DreamBooth reads.
METHOD_FIELDS = {"relaxloss": frozenset({"relaxloss_alpha"}),
                 "dp_lora": frozenset({"dp_noise_multiplier", "dp_clip_norm", "dp_delta"})}
LORA_NETWORK_FIELDS = frozenset({"network_dim", "network_alpha", "network_args", "network_dropout", "network_module",
                                 "network_train_unet_only", "dim_from_weights"})
PRIOR_FIELDS = frozenset({"prior_loss_weight", "class_data_dir", "class_prompt", "num_class_images",
                          "class_sample_steps", "prior_in_objective"})

#: What only MP/SMP-LoRA's proxy attacker reads (Eq. 5, 6, 10 and Algorithm 1's attacker phase).
ATTACKER_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig)
                            if f.name.startswith(("attacker_", "privacy_", "g_"))
                            or f.name in ("k_steps", "update_order"))


def check_for_method(config: TrainConfig, method: str) -> None:
    """Checks that depend on which training script runs: the method's own (one ConfigError line each), and one
    ``warning:`` line when the proxy attacker's settings are given to a method without one (train_lora.py
    with an SMP TOML: the run is plain LoRA, whatever the file's name says)."""
    cls = method_class(method)
    cls.check_config(config)
    given = {name for name, source in value_sources(config).items() if not source.startswith(DEFAULT)}
    if not cls.has_attacker and (ignored := sorted(given & ATTACKER_FIELDS)):
        warn(f"{', '.join(ignored)} only act on MP/SMP-LoRA's proxy attacker; {method} ignores them (train "
             "with train_mp_lora.py / train_smp_lora.py for the defence)")
    others = [f"{name} (train_{owner}.py)" for owner, fields in METHOD_FIELDS.items() if owner != method
              for name in sorted(given & fields)]
    if others:
        warn(f"{', '.join(others)} only act on that training script; {method} ignores them")
    if not config.with_prior_preservation and (ignored := sorted(given & PRIOR_FIELDS)):
        warn(f"{', '.join(ignored)} only act with --with_prior_preservation; this run ignores them")
    if config.split_manifest and "caption_extension" in given and not config.with_prior_preservation:
        warn("caption_extension is ignored: with --split_manifest the captions come from the manifest")
    if config.train_mode == "full" and (lora := sorted(given & (LORA_NETWORK_FIELDS - {"network_args"}))):
        warn(f"{', '.join(lora)} configure a LoRA; 'train_mode = full' ignores them")  # network_args: warned above
    shape = sorted(given & {"network_dim", "network_alpha", "network_args"})
    if config.dim_from_weights and shape:
        warn(f"{', '.join(shape)} ignored: --dim_from_weights shapes the network by the --network_weights file")
    when = config.sample_every_n_epochs or config.sample_at_first
    if bool(config.sample_prompts) != bool(when):  # sd-scripts samples only with prompts and a time to sample
        warn("no samples are drawn: --sample_prompts and --sample_every_n_epochs (or --sample_at_first) go together")


def inert_settings(config: TrainConfig, method: str) -> frozenset[str]:
    """The settings this run of ``method`` never reads (check_for_method warns when one is given): a resume
    may change them. What makes each inert (the method, prior preservation, caption shuffling, smoothness
    tracking, proxy restarts) is itself compared at a resume, so they are inert in the resumed run too."""
    inert = {name for owner, fields in METHOD_FIELDS.items() if owner != method for name in fields}
    if not method_class(method).has_attacker:
        inert |= ATTACKER_FIELDS
    if not config.with_prior_preservation:
        inert |= PRIOR_FIELDS | ({"caption_extension"} if config.split_manifest else set())
    if not config.shuffle_caption:
        inert.add("keep_tokens")
    if not config.track_smoothness:
        inert.add("hessian_every_n_steps")
    if config.attacker_restart == "none":
        inert.add("attacker_restart_every_n_epochs")
    if config.dim_from_weights:  # the network is shaped by the --network_weights file
        inert |= {"network_dim", "network_alpha", "network_args"}
    if config.train_mode == "full":  # no LoRA network at all
        inert |= LORA_NETWORK_FIELDS
    return frozenset(inert)
