"""TOML + CLI configuration: precedence, type checks and one-line errors."""

from __future__ import annotations

import pytest

from library.config import parse_config
from library.errors import ConfigError
from library.train.config import TrainConfig

BASE = ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json"]


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_toml_values_and_cli_override(tmp_path):
    path = write(tmp_path, """
pretrained_model_name_or_path = "model_dir"
split_manifest = "m.json"
[training]
learning_rate = 3e-4
network_dim = 8
attacker_timesteps = [10, 20]
shuffle_caption = true
""")
    cfg = parse_config(TrainConfig, ["--config_file", path, "--network_dim", "16"])
    assert cfg.learning_rate == 3e-4
    assert cfg.network_dim == 16  # the command line wins
    assert cfg.attacker_timesteps == [10, 20]
    assert cfg.shuffle_caption is True
    assert cfg.pretrained_model_name_or_path == "model_dir"


def test_resolution_takes_sd_scripts_width_height_form(tmp_path):
    from library.config import load_config
    from library.eval.config import EvalConfig

    path = write(tmp_path, 'resolution = "512,512"\n')  # sd-scripts' TOML form
    assert parse_config(TrainConfig, ["--config_file", path] + BASE).resolution == 512
    assert parse_config(TrainConfig, BASE + ["--resolution", "256,256"]).resolution == 256
    assert load_config(TrainConfig, None, {"resolution": "64, 64", "pretrained_model_name_or_path": "m",
                                           "split_manifest": "s.json"}).resolution == 64
    with pytest.raises(ConfigError, match="--resolution: must be square"):
        parse_config(TrainConfig, BASE + ["--resolution", "512,768"])
    evaluation = ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json"]
    assert parse_config(EvalConfig, evaluation + ["--resolution", "64,64"]).resolution == 64
    assert parse_config(EvalConfig, evaluation + ["--resolution", "none"]).resolution is None  # the LoRAs' own


def test_defaults_are_the_papers():
    cfg = parse_config(TrainConfig, BASE)
    assert (cfg.network_dim, cfg.network_alpha) == (64, 32.0)
    assert cfg.privacy_lambda == 0.05 and cfg.privacy_delta == 1e-5
    assert (cfg.attacker_lr, cfg.attacker_weight_decay, cfg.k_steps) == (1e-5, 1e-4, 1)
    assert cfg.update_order == "attacker_first"
    # What the paper's configs set explicitly, the defaults take from sd-scripts: the text-encoder LoRA trains at
    # --learning_rate unless --text_encoder_lr says otherwise.
    assert cfg.text_encoder_lr is None and cfg.unet_lr is None


def test_help_shows_each_default():
    from library.config import build_parser

    text = build_parser(TrainConfig, "").format_help()
    for shown in ("(default: 64)", "(default: 32.0)", "(default: 0.0001)", "(default: AdamW)"):
        assert shown in " ".join(text.split()), shown


def test_an_sd_scripts_config_loads_where_its_options_change_nothing(tmp_path, capsys):
    """A GUI-written kohya TOML: options at values that change nothing here load with a warning each; the others
    are refused all in one message, each with what to do instead (not a look-alike flag of ours)."""
    path = write(tmp_path, "[model_arguments]\nv2 = false\n[training_arguments]\nxformers = true\n"
                           "save_model_as = 'safetensors'\nmax_data_loader_n_workers = 8\nnoise_offset = 0.0\n"
                           "[additional_network_arguments]\nnetwork_dim = 8\n")
    assert parse_config(TrainConfig, BASE + ["--config_file", path]).network_dim == 8
    warned = capsys.readouterr().err
    assert warned.count("warning:") == 5 and "'xformers = True' is ignored" in warned
    path = write(tmp_path, "noise_offset = 0.05\nnetwork_train_text_encoder_only = true\nlerning_rate = 1\n"
                           "[[datasets]]\nresolution = 512\n")
    with pytest.raises(ConfigError) as refused:
        parse_config(TrainConfig, BASE + ["--config_file", path])
    message = str(refused.value)
    assert "'noise_offset' is an sd-scripts or diffusers option" in message and "--unet_lr 0" in message
    assert "did you mean 'learning_rate'" in message and "scripts/make_split.py" in message
    path = write(tmp_path, "[training_arguments]\nloss_type = 'l2'\nhuber_c = 0.1\nhuber_schedule = 'snr'\n"
                           "dynamo_backend = 'no'\nlr_scheduler_args = []\nnoise_offset_type = 'Original'\n"
                           "training_comment = ''\nzero_terminal_snr = false\nmasked_loss = false\n"
                           "no_half_vae = false\nenable_bucket = true\nweighted_captions = false\n")
    parse_config(TrainConfig, BASE + ["--config_file", path])  # a recent kohya_ss GUI's keys at their defaults
    warned = capsys.readouterr().err
    assert warned.count("warning:") == 11 and "centre-cropped squares" in warned  # training_comment is ours now
    path = write(tmp_path, "epoch = 10\nloss_type = 'huber'\n")
    with pytest.raises(ConfigError, match="use max_train_epochs.*plain epsilon MSE"):
        parse_config(TrainConfig, BASE + ["--config_file", path])
    with pytest.raises(ConfigError, match="--xformers: diffusers already uses") as flag:
        parse_config(TrainConfig, BASE + ["--xformers", "--sample_every_n_steps", "10"])
    assert "--sample_every_n_epochs" in str(flag.value) and "did you mean" not in str(flag.value)
    with pytest.raises(ConfigError, match="--no_half_vae: the VAE always runs in fp32 here"):
        parse_config(TrainConfig, BASE + ["--no_half_vae"])
    # sd-scripts' caption options: their own advice, not a look-alike ("did you mean --train_text_encoder?")
    path = write(tmp_path, "cache_text_encoder_outputs = false\ncache_text_encoder_outputs_to_disk = false\n"
                           "caption_prefix = ''\nkeep_tokens_separator = ''\ntoken_warmup_step = 0\n")
    parse_config(TrainConfig, BASE + ["--config_file", path])
    assert capsys.readouterr().err.count("warning:") == 5
    for flag, advice in ((["--cache_text_encoder_outputs"], "cached per caption already"),
                         (["--keep_tokens_separator", "|||"], "first N comma-separated tags"),
                         (["--caption_prefix", "photo, "], "edit the caption files"),
                         (["--no_token_padding"], "padded to the token length")):
        with pytest.raises(ConfigError, match=advice) as refused:
            parse_config(TrainConfig, BASE + flag)
        assert "did you mean" not in str(refused.value)


@pytest.mark.parametrize("item,expected", [
    ("weights_sd=/x.safetensors", "--network_weights"),  # a Python-API argument, not an option: was ignored
    ("for_inference=true", "--network_weights"),
    ("algo=locon", "--network_args takes conv_dim=R and conv_alpha=A"),  # LyCORIS: before any model loads
    ("=8", "entries are key=value"),  # no key: not an unknown network argument named ''
])
def test_network_args_take_the_locon_options_only(item, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(TrainConfig, BASE + ["--network_args", item])


def test_misspelled_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, 'learning_rte = 1e-4\n')
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rte'.*did you mean 'learning_rate'"):
        parse_config(TrainConfig, ["--config_file", path] + BASE)


@pytest.mark.parametrize("line, message", [
    ('network_dim = "eight"', "'network_dim' must be an integer"),
    ('network_dim = true', "'network_dim' must be an integer, got True"),  # not the rank 1
    ('learning_rate = "fast"', "'learning_rate' must be a number"),
    ('shuffle_caption = 1', "'shuffle_caption' must be true or false"),
    ('update_order = "sideways"', r"c\.toml: 'update_order' must be one of"),  # the file is named
    ('optimizer_type = "adamw9bit"', r"'optimizer_type' must be one of .* \(did you mean 'AdamW8bit'\?\)"),
    ('privacy_lambda = -0.5', "'privacy_lambda' must be a finite number >= 0"),
    ('network_dim = 0', "'network_dim' must be > 0, got 0"),  # a rank-0 LoRA trains nothing
    ('min_timestep = 500\nmax_timestep = 500', "need 0 <= min_timestep < max_timestep"),  # no t to draw
    ('attacker_timesteps = []', "'attacker_timesteps' must be a non-empty list"),
    ('attacker_timesteps = [1000]', "'attacker_timesteps' must be a non-empty list of integers in \\[0, 1000\\)"),
    ('attacker_dropout = 1.0', "'attacker_dropout' must be in \\[0, 1\\)"),  # drops every unit
    ('save_every_n_epochs = 0', "'save_every_n_epochs' must be > 0, got 0"),  # "every 0 epochs" saves never
    ('max_grad_norm = nan', "'max_grad_norm' must be a finite number, got nan"),  # it switched clipping off
    ('dp_noise_multiplier = inf', "'dp_noise_multiplier' must be a finite number, got inf"),  # the accountant hung
    ('network_alpha = -inf', "'network_alpha' must be a finite number"),
    ('lr_warmup_steps = -10', "'lr_warmup_steps' must be >= 0, got -10"),
    ('lr_warmup_steps = 2.5', "'lr_warmup_steps' must be a whole number of steps or a ratio below 1, got 2.5"),
    ('resolution = "512,768"', "'resolution': must be square .* use 512 or 512,512"),
    ('resolution = "large"', "'resolution': must be a size in pixels like 512 or 512,512, got 'large'"),
    ('resolution = "512,512,512"', "'resolution': must be square"),  # three sizes are no width,height
    ('save_last_n_epochs_state = 0', "'save_last_n_epochs_state' must be > 0, got 0"),  # the pruner read 0 as "all"
    ('save_last_n_steps_state = 0', "'save_last_n_steps_state' must be > 0, got 0"),
    ('weight_decay = -0.01', "'weight_decay' must be a finite number >= 0"),  # torch's AdamW: a traceback
    ('attacker_lr = -1e-5', "'attacker_lr' must be a finite number >= 0"),
    ('attacker_weight_decay = -1e-4', "'attacker_weight_decay' must be a finite number >= 0"),
])
def test_bad_values_get_one_clear_error(tmp_path, line, message):
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, ["--config_file", path] + BASE)


def test_optimizer_type_is_read_in_any_case_as_sd_scripts_reads_it(tmp_path):
    path = write(tmp_path, 'optimizer_type = "adamw8bit"\n')
    assert parse_config(TrainConfig, ["--config_file", path] + BASE).optimizer_type == "AdamW8bit"
    assert parse_config(TrainConfig, ["--optimizer_type", "ADAMW"] + BASE).optimizer_type == "AdamW"


def test_lr_warmup_steps_below_one_is_a_ratio_of_the_runs_steps_as_in_sd_scripts(tmp_path):
    import torch

    from library.train.setup import build_scheduler

    path = write(tmp_path, "lr_warmup_steps = 4.0\nlr_scheduler = \"cosine\"\n")
    assert parse_config(TrainConfig, ["--config_file", path] + BASE).lr_warmup_steps == 4  # steps stay steps
    steps = parse_config(TrainConfig, ["--lr_warmup_steps", "4", "--lr_scheduler", "cosine"] + BASE).lr_warmup_steps
    assert type(steps) is int  # as before: the run record and ss_lr_warmup_steps say "4", not "4.0"
    cfg = parse_config(TrainConfig, ["--lr_warmup_steps", "0.3", "--lr_scheduler", "linear"] + BASE)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(cfg, optimizer, total_steps=10)  # int(0.3 * 10) = 3 warm-up steps
    rates = []
    for _ in range(5):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 6 / 7])


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(TrainConfig, ["--config_file", write(tmp_path, "a = = 1")] + BASE)
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(TrainConfig, ["--config_file", str(tmp_path / "nope.toml")] + BASE)


def test_required_and_exclusive_inputs():
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path"):
        parse_config(TrainConfig, ["--split_manifest", "s.json"])
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_config(TrainConfig, BASE + ["--train_data_dir", "d"])
    with pytest.raises(ConfigError, match="exactly one of"):  # neither: no training data at all
        parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m"])


def test_network_module_cannot_name_arbitrary_code():
    with pytest.raises(ConfigError, match="--network_module: invalid choice: 'os'"):  # outside the allow-list
        parse_config(TrainConfig, BASE + ["--network_module", "os"])


def test_a_leading_tilde_is_the_home_folder_in_every_path_wherever_it_is_given(tmp_path, monkeypatch):
    """The model path expanded `~` and the output folder did not: `output_dir = "~/out"` in a TOML file (or
    `--output_dir=~/out`, which no shell expands) wrote into a folder named `~` in the current one."""
    from library.config import load_config
    from library.eval.config import EvalConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    toml = tmp_path / "c.toml"
    toml.write_text('pretrained_model_name_or_path = "~/base"\noutput_dir = "~/out"\nsplit_manifest = "~/s.json"\n'
                    'class_prompt = "~ a tilde in a caption"\n')
    config = parse_config(TrainConfig, ["--config_file", str(toml), "--logging_dir=~/logs", "--resume", "latest"])
    assert (config.output_dir, config.split_manifest, config.logging_dir, config.pretrained_model_name_or_path) == (
        str(tmp_path / "out"), str(tmp_path / "s.json"), str(tmp_path / "logs"), str(tmp_path / "base"))
    assert config.class_prompt == "~ a tilde in a caption" and config.resume == "latest"  # not paths: as given
    evaluation = load_config(EvalConfig, overrides={"pretrained_model_name_or_path": "m", "split_manifest": "s.json",
                                                    "network_weights": ["~/a.safetensors", "b.safetensors"],
                                                    "output_dir": "~/eval"})
    assert evaluation.network_weights == [str(tmp_path / "a.safetensors"), "b.safetensors"]
    assert evaluation.output_dir == str(tmp_path / "eval")


def test_a_whole_number_for_a_float_option_is_a_float(tmp_path):
    """``learning_rate = 1`` (TOML) or an int override is the float 1.0: the run record and ``ss_learning_rate``
    say "1.0" whichever way it was written."""
    from library.config import load_config

    path = write(tmp_path, "learning_rate = 1\nmax_grad_norm = 2\n")
    cfg = parse_config(TrainConfig, ["--config_file", path] + BASE)
    assert (cfg.learning_rate, cfg.max_grad_norm) == (1.0, 2.0)
    assert type(cfg.learning_rate) is float and type(cfg.max_grad_norm) is float
    typed = load_config(TrainConfig, None, {"pretrained_model_name_or_path": "m", "split_manifest": "s.json",
                                            "learning_rate": 3})
    assert type(typed.learning_rate) is float and str(typed.learning_rate) == "3.0"


def test_a_toml_vae_is_refused_unless_empty(tmp_path, capsys):
    """kohya's ``vae = "..."`` in a TOML would leave the base model's VAE in use in silence: refused with the
    bake_vae advice (training and evaluation); an empty value changes nothing and loads with a warning."""
    from library.config import load_config
    from library.eval.config import EvalConfig

    path = write(tmp_path, 'vae = "my_vae.safetensors"\n')
    for cls in (TrainConfig, EvalConfig):
        with pytest.raises(ConfigError, match="'vae' is an sd-scripts or diffusers option: not supported.*bake_vae"):
            load_config(cls, path)
    path = write(tmp_path, 'vae = ""\n')
    assert parse_config(TrainConfig, ["--config_file", path] + BASE).learning_rate == 1e-4
    assert "'vae = ''' is ignored" in capsys.readouterr().err


def test_a_key_in_two_sections_is_refused(tmp_path):
    """Tables are flattened (as sd-scripts does): one key in two of them would silently take the later value."""
    path = write(tmp_path, "[training]\nlearning_rate = 1e-3\n[optimizer_arguments]\nlearning_rate = 2e-3\n")
    with pytest.raises(ConfigError, match="c.toml: key 'learning_rate' is given twice"):
        parse_config(TrainConfig, ["--config_file", path] + BASE)


def test_the_authors_metadata_is_taken_as_given_but_never_as_a_path():
    """sd-scripts' --training_comment and --metadata_* (in a TOML too): any words, but a value that is a file path
    is one ConfigError naming the flag before anything runs (the save would refuse it after the training)."""
    config = parse_config(TrainConfig, BASE + ["--metadata_title", "Digits v2", "--training_comment", "C:-3 run"])
    assert (config.metadata_title, config.training_comment) == ("Digits v2", "C:-3 run")
    for flag, value in (("--metadata_author", "/home/me"), ("--training_comment", "C:\\data\\faces"),
                        ("--metadata_tags", "~/faces")):
        with pytest.raises(ConfigError, match=rf"'{flag[2:]}' .* looks like a file path.*write a name, not a path"):
            parse_config(TrainConfig, BASE + [flag, value])


def test_every_metadata_flag_the_saved_file_reads_is_a_training_option():
    """user_metadata reads these attributes of the config: a renamed option would silently write nothing."""
    import dataclasses

    from networks.lora_format import USER_METADATA_KEYS

    assert set(USER_METADATA_KEYS) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_sd_scripts_metadata_flags_for_other_files_are_refused_with_why(tmp_path, capsys):
    """--metadata_thumbnail would embed an image (in a private run, likely a member) in every copy of the LoRA;
    merge / preprocessor / embedding flags describe other kinds of files. A kohya TOML leaving them empty loads."""
    with pytest.raises(ConfigError, match="metadata_thumbnail.*would publish an image"):
        parse_config(TrainConfig, BASE + ["--metadata_thumbnail", "face.png"])
    with pytest.raises(ConfigError, match="metadata_thumbnail.*would publish an image"):
        parse_config(TrainConfig, BASE + ["--config_file", write(tmp_path, "metadata_thumbnail = 'face.png'\n")])
    config = parse_config(TrainConfig, BASE + ["--metadata_usage_hint", "prompt 'a digit'", "--config_file",
                                               write(tmp_path, "metadata_thumbnail = ''\nmetadata_merged_from = ''\n")])
    assert config.metadata_usage_hint == "prompt 'a digit'"
    assert capsys.readouterr().err.count("warning:") == 2


def test_newer_sd_scripts_options_get_their_own_advice(tmp_path, capsys):
    """sd-scripts 2025-26 options (uploads, DeepSpeed, validation, a scheduler class by name): advice, not "did you
    mean" a look-alike; a GUI-written TOML holding them at values that change nothing loads with warnings."""
    for flags, advice in ((["--huggingface_repo_id", "me/faces"], "nothing is uploaded"),
                          (["--validation_split", "0.1"], "non-members, which evaluate_mia.py measures"),
                          (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR"], "never names code to import"),
                          (["--initial_epoch", "3"], "use --resume"),
                          (["--caption_extention", ".txt"], "use --caption_extension")):
        with pytest.raises(ConfigError, match=advice) as refused:
            parse_config(TrainConfig, BASE + flags)
        assert "did you mean" not in str(refused.value)
    path = write(tmp_path, "deepspeed = false\nzero_stage = 2\nvalidation_split = 0.0\nhuggingface_repo_id = ''\n"
                           "lr_decay_steps = 0\ntorch_compile = false\nweighting_scheme = 'uniform'\n")
    parse_config(TrainConfig, BASE + ["--config_file", path])
    assert capsys.readouterr().err.count("warning:") == 7
    with pytest.raises(ConfigError, match="DeepSpeed is not used"):
        parse_config(TrainConfig, BASE + ["--config_file", write(tmp_path, "deepspeed = true\n")])


def test_an_explicit_none_unsets_only_an_optional_option():
    """``load_config``'s overrides may unset an Optional option with None (as ``--max_train_epochs none``); None for
    any other option is one ConfigError naming it, not a None that fails later inside the run."""
    from library.config import load_config

    base = {"pretrained_model_name_or_path": "m", "split_manifest": "s.json"}
    assert load_config(TrainConfig, None, {**base, "max_train_epochs": None}).max_train_epochs is None
    with pytest.raises(ConfigError, match="overrides: 'seed' must not be empty"):
        load_config(TrainConfig, None, {**base, "seed": None})


def test_a_number_for_a_text_option_is_its_text(tmp_path):
    """``output_name = 2024`` (TOML writes numbers unquoted) names the files "2024", as the flag would; a list is
    still refused."""
    assert parse_config(TrainConfig, ["--config_file", write(tmp_path, "output_name = 2024\n")] + BASE).output_name \
        == "2024"
    with pytest.raises(ConfigError, match="'output_name' must be a string"):
        parse_config(TrainConfig, ["--config_file", write(tmp_path, "output_name = [1]\n")] + BASE)


def test_an_output_name_with_the_extension_is_kept_with_a_warning(capsys):
    """sd-scripts appends .safetensors to --output_name whatever it ends in; so do we, and say so."""
    assert parse_config(TrainConfig, BASE + ["--output_name", "pets.safetensors"]).output_name == "pets.safetensors"
    err = capsys.readouterr().err
    assert "'output_name' 'pets.safetensors' ends in .safetensors, which the files get appended" in err
    assert "(pets.safetensors.safetensors, as in sd-scripts); drop it from the name for pets.safetensors" in err
    parse_config(TrainConfig, BASE + ["--output_name", "pets"])
    assert "warning" not in capsys.readouterr().err


def test_an_unknown_section_lists_the_sd_scripts_sections_too(tmp_path):
    """A kohya user's misspelled ``[training_argument]`` must learn that sd-scripts' sections are read here."""
    path = write(tmp_path, "[training_argument]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"did you mean \[training_arguments\]\?.* and sd-scripts' general and "
                                          r"\*_arguments"):
        parse_config(TrainConfig, ["--config_file", path] + BASE)


def test_a_config_file_cannot_name_another_config_file(tmp_path):
    """``config_file`` inside a TOML would be silently unread (no includes): said so, not "unknown key"."""
    with pytest.raises(ConfigError, match="'config_file' cannot be set inside a config file"):
        parse_config(TrainConfig, ["--config_file", write(tmp_path, 'config_file = "other.toml"\n')] + BASE)


def test_nan_in_a_list_of_numbers_is_named_as_not_finite():
    """Each item of a list option is checked for NaN / infinity as a single number is, with the same message."""
    from library.eval.config import EvalConfig

    with pytest.raises(ConfigError, match="'clid_mask_fractions' must be a finite number, got nan"):
        parse_config(EvalConfig, BASE + ["--clid_mask_fractions", "0.3", "nan"])


def test_a_list_of_paths_is_taken_by_load_config(tmp_path):
    """Python callers pass ``Path`` objects, also in a list (the LoRA files to attack): read as their text."""
    from library.config import load_config
    from library.eval.config import EvalConfig

    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    config = load_config(EvalConfig, overrides={"pretrained_model_name_or_path": "m", "split_manifest": "s.json",
                                                "network_weights": files})
    assert config.network_weights == [str(f) for f in files]


def test_privacy_lambda_zero_is_allowed():
    """lambda = 0 switches the privacy term off (the ablation of Eq. 6 / Eq. 10): a value, not a mistake."""
    assert parse_config(TrainConfig, BASE + ["--privacy_lambda", "0"]).privacy_lambda == 0.0


def test_training_settings_at_their_edges_are_valid():
    """max_grad_norm 0 means "no clipping" and any multiple of 8 is a resolution: both train, not refused."""
    cfg = parse_config(TrainConfig, BASE + ["--max_grad_norm", "0", "--resolution", "520"])
    assert (cfg.max_grad_norm, cfg.resolution) == (0.0, 520)


def test_state_retention_without_saved_states_warns_that_it_does_nothing(capsys):
    """--save_last_n_epochs_state prunes saved states: with epoch saves but no --save_state there are none, which a
    user who expects old states to go (or to stay) must be told; with both it is quiet."""
    retention = BASE + ["--save_every_n_epochs", "1", "--save_last_n_epochs_state", "2"]
    parse_config(TrainConfig, retention)
    assert "'save_last_n_epochs_state' prunes the checkpoints of 'save_every_n_epochs' and 'save_state'" \
        in capsys.readouterr().err
    parse_config(TrainConfig, retention + ["--save_state"])
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("flag, own, other", [
    ("save_last_n_epochs", ["--save_every_n_epochs", "1"], ["--save_every_n_steps", "1"]),
    ("save_last_n_steps", ["--save_every_n_steps", "1"], ["--save_every_n_epochs", "1"]),
    ("save_last_n_epochs_state", ["--save_every_n_epochs", "1", "--save_state"], ["--save_every_n_steps", "1",
                                                                                 "--save_state"]),
    ("save_last_n_steps_state", ["--save_every_n_steps", "1", "--save_state"], ["--save_every_n_epochs", "1",
                                                                               "--save_state"]),
])
def test_each_retention_flag_answers_to_its_own_cadence(capsys, flag, own, other):
    """Epoch and step saves are pruned apart: a step retention flag in a run that saves only per epoch prunes
    nothing (and names the step flag to set), while its own cadence makes it quiet whatever the other does."""
    every = "save_every_n_epochs" if "epochs" in flag else "save_every_n_steps"
    parse_config(TrainConfig, BASE + other + [f"--{flag}", "2"])
    assert f"'{flag}' prunes the checkpoints of '{every}'" in capsys.readouterr().err
    parse_config(TrainConfig, BASE + own + [f"--{flag}", "2"])
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_a_seed_from_0_to_2_63_minus_1_is_valid(seed):
    """torch takes any non-negative int64 seed: both ends of that range are a run, not a refusal."""
    assert parse_config(TrainConfig, BASE + ["--seed", str(seed)]).seed == seed


def test_a_seed_past_int64_is_refused_with_its_range():
    """2**63 overflows the int64 torch seeds with (derived seeds too): one line giving the valid range."""
    with pytest.raises(ConfigError, match=r"'seed' must be an integer in \[0, 2\*\*63 - 1 = 9223372036854775807\], "
                                          r"got 9223372036854775808"):
        parse_config(TrainConfig, BASE + ["--seed", str(2**63)])


@pytest.mark.parametrize("flag", ["--unet_lr", "--text_encoder_lr"])
def test_a_negative_part_rate_is_refused_saying_that_0_turns_the_part_off(flag):
    """A negative part rate is no way to switch a part off: the error tells the user that 0 is."""
    with pytest.raises(ConfigError, match=r"must be a finite number >= 0 \(0 means: do not train that part\)"):
        parse_config(TrainConfig, BASE + [flag, "-1e-4"])


# A kohya / diffusers key at its no-op value (TOML literal) loads with a warning; at a value that would change
# training it is refused. Each pair pins one key's predicate in library.train.foreign_flags.
FOREIGN_VALUES = [
    ("v2", "false", "true"),
    ("v_parameterization", "false", "true"),
    ("sdxl", "false", "true"),
    ("optimizer_args", "[]", "['betas=0.9,0.99']"),
    ("lr_scheduler_num_cycles", "1", "3"),
    ("caption_separator", "','", "';'"),
    ("token_warmup_min", "1", "4"),
    ("huggingface_repo_id", "''", "'me/faces'"),
    ("validation_split", "0.0", "0.1"),
    ("center_crop", "true", "false"),
    ("allow_tf32", "false", "true"),
    ("snr_gamma", "0", "5.0"),
    ("use_8bit_adam", "false", "true"),
    ("full_fp16", "false", "true"),
    ("no_half_vae", "true", None),
]


@pytest.mark.parametrize("key,harmless,refused", FOREIGN_VALUES, ids=[row[0] for row in FOREIGN_VALUES])
def test_a_foreign_key_loads_at_its_no_op_value_and_is_refused_at_any_other(key, harmless, refused, tmp_path,
                                                                             capsys):
    """A GUI-written config must load where the key changes nothing, and never silently train otherwise."""
    parse_config(TrainConfig, BASE + ["--config_file", write(tmp_path, f"{key} = {harmless}\n")])
    assert capsys.readouterr().err.count("warning:") == 1
    if refused is not None:
        with pytest.raises(ConfigError, match=f"'{key}' is an sd-scripts or diffusers option"):
            parse_config(TrainConfig, BASE + ["--config_file", write(tmp_path, f"{key} = {refused}\n")])
