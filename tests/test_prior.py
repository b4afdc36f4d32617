"""DreamBooth's prior preservation (library.train.prior): class images, identifier checks, the prior loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.config import parse_config
from library.sd.diffusion import denoising_errors, draw_noise, per_sample_loss
from library.train.cli import train_entry
from library.train.config import TrainConfig
from library.train.config_scope import check_for_method
from library.train.prior import has_word
from library.train.trainer import Trainer, train

# Every digit caption is "a handwritten digit <name>": "handwritten" plays the identifier, "a digit" the class.
DREAMBOOTH = ["--instance_token", "handwritten", "--with_prior_preservation", "--class_prompt", "a digit",
              "--num_class_images", "6", "--class_sample_steps", "3", "--prior_loss_weight", "0.5"]


@pytest.fixture
def dreambooth_args(tiny_train_args, tmp_path):
    return tiny_train_args + DREAMBOOTH + ["--class_data_dir", str(tmp_path / "class"), "--attacker_batch_size", "2"]


def test_identifier_is_a_whole_word():
    assert has_word("a photo of sks dog", "sks") and not has_word("he asks", "sks")


def test_class_images_are_generated_once_and_never_join_the_membership_sets(dreambooth_args, tmp_path, capsys):
    trainer = Trainer(parse_config(TrainConfig, dreambooth_args), "smp_lora")
    assert "generated 6 class image(s)" in capsys.readouterr().out
    class_dir = tmp_path / "class"
    assert sorted(p.name for p in class_dir.glob("*.png")) == [f"class_{i:05d}.png" for i in range(6)]
    assert all(p.read_text() == "a digit" for p in class_dir.glob("*.txt"))
    prior_paths = set(trainer.data.prior.paths)
    assert len(prior_paths) == 6
    for labelled in trainer.data.sets():  # D_tr, D_aux, D_te: the manifest's images only
        assert not prior_paths & set(labelled.paths)
    assert len(trainer.data.members) == 24  # the fixture split's members, class images not counted
    trainer.prepare()
    from library.fileio import sha256_file

    # the proxy's sets are keyed by the manifest's image hashes: no class image among them
    assert trainer.method.aux.member_keys and not {sha256_file(p) for p in prior_paths} & set(
        trainer.method.aux.member_keys + trainer.method.aux.nonmember_keys)

    Trainer(parse_config(TrainConfig, dreambooth_args), "lora")  # a second run reuses the cached images
    assert "generated" not in capsys.readouterr().out


def test_prior_loss_is_the_class_rows_loss_and_the_method_sees_members_only(dreambooth_args):
    trainer = Trainer(parse_config(TrainConfig, dreambooth_args), "lora")
    trainer.prepare()
    ctx = trainer._context()
    noise_state, prior_state = trainer.noise_generator.get_state(), trainer.prior_sampler.state_dict()
    indices = trainer.sampler.next_indices()
    with torch.no_grad():
        result = trainer._forward(indices, ctx)
    assert len(result.losses) == len(indices) == len(result.keys) == 4
    # every per-row field the method reads (its G features: errors, t, eps, captions) holds the members' rows only
    assert {len(result.errors), len(result.latents), len(result.conditioning), len(result.draw.timesteps),
            len(result.draw.noise), len(result.captions)} == {4}
    assert set(result.keys) <= set(trainer.data.members.keys)

    # Recompute the prior term by hand: the class rows of the same draw, alone.
    trainer.noise_generator.set_state(noise_state)
    trainer.prior_sampler.load_state_dict(prior_state)
    class_rows = trainer.prior_sampler.next_indices()
    latents = torch.cat([trainer.data.members.latents[indices], trainer.data.prior.latents[class_rows]])
    draw = draw_noise(latents, trainer.noise_generator, 0, 1000)
    captions = [trainer.data.prior.captions[i] for i in class_rows]
    with torch.no_grad():
        errors = denoising_errors(trainer.bundle.unet, trainer.bundle.noise_scheduler, latents[4:],
                                  ctx.encode_text(captions), type(draw)(draw.timesteps[4:], draw.noise[4:]))
    expected = 0.5 * per_sample_loss(errors).mean()
    assert torch.allclose(result.prior_loss, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(result.adaptation_loss(), result.losses.mean() + expected, rtol=1e-5)


def test_dreambooth_trains_with_lora_and_full_finetuning_and_resumes_exactly(dreambooth_args, tmp_path):
    for mode in ("lora", "full"):
        common = dreambooth_args + ["--train_mode", mode]
        whole = train(parse_config(TrainConfig, common + ["--output_dir", str(tmp_path / mode / "a")]), "smp_lora")
        assert "prior_loss" in whole.final_logs
        train(parse_config(TrainConfig, common + ["--max_train_steps", "2", "--save_state",
                                                  "--output_dir", str(tmp_path / mode / "b")]), "smp_lora")
        resumed = train(parse_config(TrainConfig, common + ["--resume", str(tmp_path / mode / "b" / "smp_lora-state"),
                                                            "--output_dir", str(tmp_path / mode / "c")]), "smp_lora")
        a, b = load_file(whole.weights_path), load_file(resumed.weights_path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mode


@pytest.mark.parametrize("in_objective", [True, False])
def test_prior_goes_into_eq10_or_is_added_after_it(dreambooth_args, in_objective):
    flag = "--prior_in_objective" if in_objective else "--no-prior_in_objective"
    logs = train(parse_config(TrainConfig, dreambooth_args + [flag, "--max_train_steps", "1"]), "smp_lora").final_logs
    # Eq. 10 divides L_ada; with the prior in the objective L_ada is the DreamBooth loss (members + weighted prior)
    smp = logs["l_ada"] / logs["denominator"]
    assert logs["loss"] == pytest.approx(smp if in_objective else smp + logs["prior_loss"], rel=1e-5)
    assert logs["denominator"] > 1


@pytest.mark.parametrize("change, expected", [
    (["--class_data_dir", ""], "needs 'class_data_dir'"),
    (["--class_prompt", ""], "no 'class_prompt' is given"),
    (["--instance_token", "sks"], "does not contain the identifier 'sks'"),
    (["--class_prompt", "a handwritten thing"], "contains the identifier 'handwritten'"),
    (["--prior_loss_weight", "-1"], "'prior_loss_weight' must be"),
])
def test_bad_dreambooth_inputs_are_one_line(dreambooth_args, capsys, change, expected):
    assert train_entry("smp_lora", "", dreambooth_args + change) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_dp_with_a_prior_is_refused(dreambooth_args, capsys):
    assert train_entry("dp_lora", "", dreambooth_args) == 2
    assert "with_prior_preservation" in capsys.readouterr().err


def test_dry_run_says_how_many_class_images_it_would_generate(dreambooth_args, tmp_path, capsys):
    assert train_entry("lora", "", dreambooth_args + ["--dry_run"]) == 0
    assert "(6 to generate with the base model)" in capsys.readouterr().out
    assert not (tmp_path / "class").exists()


def test_class_images_are_generated_under_mixed_precision(dreambooth_args, tmp_path):
    """bf16 autocast casts the frozen UNet and text encoder, the VAE stays fp32: generation crashed in the VAE."""
    Trainer(parse_config(TrainConfig, dreambooth_args + ["--mixed_precision", "bf16"]), "lora")
    assert len(list((tmp_path / "class").glob("class_*.png"))) == 6


@pytest.mark.parametrize("change, expected", [
    (["--num_class_images", "3"], "'num_class_images' = 3 is fewer than one batch (train_batch_size = 4)"),
    (["--class_data_dir", "{file}/sub"], "--class_data_dir"),  # a path under a file: was NotADirectoryError
])
def test_impossible_class_image_settings_are_refused_before_any_generation(dreambooth_args, tmp_path, capsys,
                                                                          change, expected):
    (tmp_path / "file").write_text("not a folder")
    change = [arg.replace("{file}", str(tmp_path / "file")) for arg in change]
    for extra in (["--dry_run"], []):
        assert train_entry("smp_lora", "", dreambooth_args + change + extra) == 2
        err = capsys.readouterr()
        assert err.err.count("\n") == 1 and expected in err.err and "generated" not in err.out, err.err
    assert not (tmp_path / "class").exists()


def test_an_sd_scripts_regularisation_folder_is_read(dreambooth_args, tmp_path, capsys):
    """reg/<repeats>_<class>/*.png, no caption files: sd-scripts captions them by the class name. Before, the
    subfolder was ignored and the base model filled the top level with generated images."""
    from PIL import Image

    reg = tmp_path / "reg" / "1_a number"
    reg.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(reg / f"r{i}.png")
    args = [arg for arg in dreambooth_args if arg != "a digit"]
    args[args.index("--class_prompt") + 1:args.index("--class_prompt") + 1] = [""]  # no class prompt at all
    args[args.index("--class_data_dir") + 1] = str(tmp_path / "reg")
    trainer = Trainer(parse_config(TrainConfig, args), "lora")
    assert "generated" not in capsys.readouterr().out
    assert [p.name for p in map(Path, trainer.data.prior.paths)] == [f"r{i}.png" for i in range(6)]
    assert set(trainer.data.prior.captions) == {"a number"}
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["1_a number"]


def test_caption_extension_is_not_called_ignored_when_class_images_read_it(dreambooth_args, capsys):
    check_for_method(parse_config(TrainConfig, dreambooth_args + ["--caption_extension", ".caption"]), "lora")
    assert "caption_extension is ignored" not in capsys.readouterr().err


def test_a_caption_extension_without_its_dot_names_the_class_captions_too(dreambooth_args, tmp_path):
    """'txt' reads the members' captions (sd-scripts users write it so); the class images crashed on it in
    Path.with_suffix, after the dry run had passed."""
    trainer = Trainer(parse_config(TrainConfig, dreambooth_args + ["--caption_extension", "caption"]), "lora")
    assert sorted(p.suffix for p in (tmp_path / "class").glob("class_*")) == [".caption"] * 6 + [".png"] * 6
    assert set(trainer.data.prior.captions) == {"a digit"}


def test_a_resume_knows_the_class_images_by_content_not_by_folder(dreambooth_args, tmp_path, capsys):
    """A copied --class_data_dir resumes (to the same LoRA); other class captions are refused, naming the flag."""
    import shutil

    from library.errors import TrainingError

    whole = train(parse_config(TrainConfig, dreambooth_args + ["--output_dir", str(tmp_path / "a")]), "lora")
    train(parse_config(TrainConfig, dreambooth_args + ["--max_train_steps", "2", "--save_state",
                                                        "--output_dir", str(tmp_path / "b")]), "lora")
    copy = shutil.copytree(tmp_path / "class", tmp_path / "moved" / "class")
    state = str(tmp_path / "b" / "lora-state")
    moved = dreambooth_args + ["--class_data_dir", str(copy), "--resume", state]
    resumed = train(parse_config(TrainConfig, moved + ["--output_dir", str(tmp_path / "c")]), "lora")
    a, b = load_file(whole.weights_path), load_file(resumed.weights_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (copy / "class_00003.txt").write_text("a digit, bold")
    with pytest.raises(TrainingError, match=r"class_images_sha256 .*--class_data_dir"):
        train(parse_config(TrainConfig, moved + ["--output_dir", str(tmp_path / "d")]), "lora")

    # A state from before class_images_sha256 was recorded knows its class images by their folder alone
    summary_file = Path(state) / "train_state.json"
    summary = json.loads(summary_file.read_text())
    del summary["identity"]["class_images_sha256"]
    summary_file.write_text(json.dumps(summary))
    with pytest.raises(TrainingError, match=r"class_data_dir = .*\(set by --class_data_dir\)"):
        train(parse_config(TrainConfig, moved + ["--dry_run", "--output_dir", str(tmp_path / "e")]), "lora")
    assert train(parse_config(TrainConfig, dreambooth_args + ["--resume", state, "--dry_run",
                                                              "--output_dir", str(tmp_path / "e")]), "lora") is None


def test_class_images_from_the_split_are_refused_and_a_dry_run_checks_the_class_folder(
        dreambooth_args, manifest_path, tmp_path, capsys):
    """A class image trains the model but is never audited: one that is a non-member (or member) of the split would
    make the audit measure the wrong thing, so it is refused, by content; a dry run finds it, and the class
    folder's other faults, before any image is generated."""
    import shutil

    from library.data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    folder = tmp_path / "class"
    folder.mkdir()
    shutil.copy(manifest.abs_path(manifest.nonmember_test[0]), folder / "copy.png")  # a renamed non-member
    for extra in (["--dry_run"], []):
        assert train_entry("lora", "", dreambooth_args + extra) == 2
        captured = capsys.readouterr()
        assert f"class image {folder / 'copy.png'} is a non-member of the split" in captured.err, captured.err
        assert "generated" not in captured.out
    (folder / "copy.png").write_text("not an image")  # a corrupt one: the dry run decodes what is there
    assert train_entry("lora", "", dreambooth_args + ["--dry_run"]) == 2
    assert "copy.png" in capsys.readouterr().err
    (folder / "copy.txt").write_text("a handwritten digit\n")  # a class caption naming the identifier
    shutil.copy(manifest.abs_path(manifest.unused[0]), folder / "copy.png")  # outside the split
    assert train_entry("lora", "", dreambooth_args + ["--dry_run"]) == 2
    assert "contains the identifier 'handwritten'" in capsys.readouterr().err


def test_an_identifier_glued_to_more_letters_is_another_word():
    """"sksdog" does not name the identifier "sks": the instance caption check must not pass it."""
    assert not has_word("a photo of sksdog", "sks") and has_word("a photo of sks, dog", "sks")


def _class_folder(folder: Path, names: list[str]) -> None:
    from PIL import Image

    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text("a digit")


def test_only_the_folder_and_its_kohya_repeat_subfolders_hold_class_images(dreambooth_args, tmp_path):
    """A class folder's other subfolders (rejects, previews) are no class images: sd-scripts reads none of them."""
    from library.train.prior import class_images, missing_class_images

    _class_folder(tmp_path / "class", ["c.png", "1_dog/a.png", "extras/b.png", "dog/d.png"])
    config = parse_config(TrainConfig, dreambooth_args)
    assert [r.path.relative_to(tmp_path / "class").as_posix() for r in class_images(config, existing_only=True)] \
        == ["1_dog/a.png", "c.png"]
    assert missing_class_images(config) == 4  # 6 asked, 2 there


def test_a_class_folder_with_more_images_than_asked_needs_no_class_prompt(dreambooth_args, tmp_path):
    """Nothing is missing from a folder with 8 images for num_class_images = 6: no prompt to generate from is due."""
    from library.train.prior import check_prior_config, missing_class_images

    _class_folder(tmp_path / "class", [f"r{i}.png" for i in range(8)])
    args = dreambooth_args + ["--class_prompt", ""]
    config = parse_config(TrainConfig, args)
    assert missing_class_images(config) == 0
    check_prior_config(config)  # no refusal


def test_exactly_one_batch_of_class_images_is_enough(dreambooth_args, tmp_path):
    """Each step pairs each member with one class image: num_class_images = train_batch_size (4) must be accepted."""
    from library.train.prior import check_prior_config

    _class_folder(tmp_path / "class", [f"r{i}.png" for i in range(4)])
    check_prior_config(parse_config(TrainConfig, dreambooth_args + ["--num_class_images", "4"]))


def test_generation_fills_the_gaps_and_keeps_the_class_images_already_there(dreambooth_args, tmp_path, capsys):
    """A class image already in the folder (an earlier run's, or the user's, under a generated name) is reused,
    never rendered over: the base model makes only the missing ones, under the free names."""
    _class_folder(tmp_path / "class", ["class_00000.png"])
    before = (tmp_path / "class" / "class_00000.png").read_bytes()
    Trainer(parse_config(TrainConfig, dreambooth_args), "lora")
    assert "generated 5 class image(s)" in capsys.readouterr().out
    assert (tmp_path / "class" / "class_00000.png").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == [f"class_{i:05d}.png" for i in range(6)]


def test_a_rank_other_than_the_main_one_generates_nothing_and_takes_the_main_ones_list(dreambooth_args, tmp_path):
    """Every rank rendering the same names would race on the files; a rank reading the folder itself could see
    another list than the main one's (a run adding images meanwhile): it takes the main process's, as broadcast."""
    from library.data.dataset import ImageCaption
    from library.train.prior import prior_records

    config = parse_config(TrainConfig, dreambooth_args)
    _class_folder(tmp_path / "class", [f"class_{i:05d}.png" for i in range(6)])  # not what the main one read
    main_ones = ([ImageCaption(tmp_path / "main.png", "a digit")], 3)
    # another rank's Collectives.on_main: the work is the main process's, the value comes from its broadcast
    assert prior_records(config, None, lambda produce: main_ones) == main_ones  # no model: nothing to render


def test_the_main_process_generates_reads_and_refuses_inside_on_main(dreambooth_args, tmp_path):
    """The folder is read (and a refusal raised) inside the work given to on_main, which broadcasts its value or
    its refusal: raised before it, the other ranks would wait for the list for ever."""
    from library.errors import DataError
    from library.train.prior import prior_records

    config = parse_config(TrainConfig, dreambooth_args)
    _class_folder(tmp_path / "class", [f"class_{i:05d}.png" for i in range(6)])
    works = []

    def main_process(produce):  # the main rank's on_main: runs the work
        works.append(produce)
        return produce()

    records, made = prior_records(config, None, main_process)
    assert len(works) == 1 and made == 0 and len(records) == 6
    (tmp_path / "class" / "class_00002.txt").unlink()
    config.class_prompt = None  # an image with no caption file and no class prompt to fall back on
    with pytest.raises(DataError, match="class_00002.png has no caption file"):
        prior_records(config, None, main_process)
    assert len(works) == 2


def test_a_fuller_class_folder_gives_its_first_num_class_images_by_path(dreambooth_args, tmp_path):
    """Like diffusers, a run takes the first num_class_images (6) of 8: not all, nor another choice of them."""
    from library.train.prior import class_images

    _class_folder(tmp_path / "class", [f"r{i}.png" for i in range(8)])
    records = class_images(parse_config(TrainConfig, dreambooth_args))
    assert [r.path.name for r in records] == [f"r{i}.png" for i in range(6)]


def test_runs_sharing_a_class_folder_generate_in_turn_and_the_second_counts_again(dreambooth_args, tmp_path,
                                                                                  capfd):
    """Two runs filling one --class_data_dir at once rendered the same names (the last rename won; with other class
    prompts an image could get the other run's caption). Generation waits for the folder's lock; once it has it, the
    images the first run made are there and nothing is left to render (no model is given: rendering would fail)."""
    import threading

    from library.outputs import OutputLock
    from library.train.prior import generate_class_images

    config = parse_config(TrainConfig, dreambooth_args)
    made, errors = [], []

    def second_run() -> None:
        try:
            made.append(generate_class_images(config, None))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with OutputLock(tmp_path / "class", "--class_data_dir"):  # the first run, generating
        waiter = threading.Thread(target=second_run, daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not made and not errors
        _class_folder(tmp_path / "class", [f"class_{i:05d}.png" for i in range(6)])
    waiter.join(10)
    assert made == [0] and not errors, errors
    assert "--class_data_dir" in capfd.readouterr().err  # it said it waited


def test_a_dreambooth_run_into_a_folder_another_run_holds_is_refused_before_generating(dreambooth_args, tmp_path,
                                                                                      capsys):
    """The run's lock is taken once model and data are read; class images come before it. A run that the lock
    refuses must not spend minutes rendering them first (nor leave them behind)."""
    from library.outputs import OutputLock

    with OutputLock(tmp_path / "out"):
        assert train_entry("smp_lora", "", dreambooth_args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "--output_dir" in captured.err and "in use by another run" in captured.err
    assert "generated" not in captured.out
    assert not list((tmp_path / "class").glob("*.png"))
