"""Shared fixtures: the tiny SD-shaped stack on disk, a small embedded-digits dataset and its split manifest.

Built once per test session (a few seconds) and reused read-only by every end-to-end test.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from library.cli import offline_environment

offline_environment()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The tiny stack's ops are far too small for intra-op threads to pay off; with 2 threads per process
# a busy 2-core machine spends most of its time spinning (measured: 14 ms vs 86 ms per UNet forward).
torch.set_num_threads(1)

SPLIT_SIZES = {"member_aux": 12, "member_test": 12, "nonmember_aux": 12, "nonmember_test": 12}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from library.demo.tiny import save_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def mia_world(tmp_path_factory):
    """The MIA test world of tests/mia_world.py (tiny model, random images, an over-fitted LoRA), built once."""
    from mia_world import build_world

    return build_world(tmp_path_factory.mktemp("mia"))


@pytest.fixture(scope="session")
def attack_world(tmp_path_factory):
    """The attack-suite world of tests/attack_world.py (pre-trained tiny base, over-fitted LoRA), built once."""
    from attack_world import build_attack_world

    return build_attack_world(tmp_path_factory.mktemp("attack_world"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from library.demo.digits import write_digits_dataset

    path = tmp_path_factory.mktemp("digits") / "images"
    write_digits_dataset(path, resolution=32, limit=60)
    return path


@pytest.fixture(scope="session")
def manifest_path(digits_dir):
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split

    manifest = make_split(scan_dataset(digits_dir), sizes=SPLIT_SIZES, seed=0, dataset_root=digits_dir)
    path = digits_dir.parent / "split.json"
    write_manifest(manifest, path)
    return path


@pytest.fixture
def tiny_train_args(tiny_model_dir, manifest_path, tmp_path):
    """Command-line flags for a fast training run on the tiny stack (a few seconds on 2 cores)."""
    return [
        "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--split_manifest", str(manifest_path),
        "--resolution", "32",
        "--network_dim", "4", "--network_alpha", "4",
        "--train_batch_size", "4",
        "--max_train_steps", "4",
        "--learning_rate", "1e-3",
        "--save_precision", "float",
        "--output_dir", str(tmp_path / "out"),
        "--no-progress_bar",
        "--log_every_n_steps", "2",  # exercises the step-log path (and the hidden bar's postfix) in every run
    ]


@pytest.fixture
def safetensors_reads(monkeypatch):
    """Counts of the safetensors files read, by ``(how, file name)``: ``load_file`` (every tensor) or ``safe_open``
    (the header first; the LoRA readers of networks.lora_io import both when they read)."""
    import safetensors
    import safetensors.torch

    counts: Counter[tuple[str, str]] = Counter()
    for module, name in ((safetensors.torch, "load_file"), (safetensors, "safe_open")):
        def counting(path, *args, _real=getattr(module, name), _name=name, **kwargs):
            counts[_name, Path(path).name] += 1
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return counts


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder this process may not write into, root included: mode 0o500 (which does not stop root), and
    ``os.access``, what :func:`library.outputs.check_output_dir` asks, says so for everyone."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path) == folder:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o700)


@pytest.fixture
def torch_defaults_restored(monkeypatch):
    """For a test whose run turns on --full_determinism: its switches are process-wide (torch's deterministic
    kernels, cuDNN, CUBLAS_WORKSPACE_CONFIG), so they are given back afterwards, else every later test in the same
    worker runs under them (and a test that checks they start off fails, depending on the process layout)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores what the run sets
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@pytest.fixture
def small_demo_settings():
    """Factory of the demo pipeline at test size: 8 images per membership set, seconds of pre-training, 2 epochs."""
    return _small_demo_settings


def _small_demo_settings(workdir, **overrides):
    from library.demo.run import DemoSettings

    return DemoSettings(
        workdir=workdir,
        split_sizes={"member_aux": 8, "member_test": 8, "nonmember_aux": 8, "nonmember_test": 8},
        pretrain_kwargs={"vae_steps": 10, "unet_steps": 20, "batch_size": 8, "vae_batch_size": 8},
        feature_net_kwargs={"epochs": 1},
        train_overrides=["--max_train_epochs", "2", "--no-progress_bar"],
        # The whole attack suite (the default), each attack at its cheapest settings.
        eval_overrides=["--paper_epochs", "2", "--n_bootstrap", "20", "--quality_num_images", "4",
                        "--quality_steps", "2", "--no-progress_bar", "--gsa_timesteps", "2", "--blackbox_num_images",
                        "2", "--blackbox_steps", "2", "--pia_timesteps", "50", "--sima_timesteps", "0", "20",
                        "--secmi_timestep", "20", "--clid_mask_fractions", "0.5", "--pfami_perturbations", "2",
                        "--rediffuse_variations", "2"],
        **overrides,
    )


def pytest_collection_modifyitems(config, items):
    """Start the longest module first (tests/test_mechanism.py: minutes, two training subprocesses), so that
    with pytest-xdist the other worker runs the rest of the suite meanwhile instead of waiting at the end."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_mechanism.py") else 1)
