"""The documentation stays true: docs/flags.md is what the configs say, and every cited docs/ file exists."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where the code, configs and user docs cite documentation (tests/ is left out: it quotes paths on purpose).
CITING = ("library", "networks", "scripts", "bench", "configs", ".ci")
CITING_SUFFIXES = {".py", ".sh", ".toml", ".md", ".txt", ""}
DOC_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*?\.md\b")
MD_LINK = re.compile(r"\]\((?!https?:|mailto:)([^)\s#]*)(?:#([^)\s]*))?\)")


def _flags_doc_module():
    path = REPO / "scripts" / "make_flags_doc.py"
    spec = importlib.util.spec_from_file_location("make_flags_doc", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _citing_files() -> list[Path]:
    files = [REPO / "README.md", *sorted(REPO.glob("*.py")), *sorted((REPO / "docs").glob("*.md"))]
    for folder in CITING:
        files += [p for p in sorted((REPO / folder).rglob("*"))
                  if p.is_file() and p.suffix in CITING_SUFFIXES and "__pycache__" not in p.parts]
    return files


def test_flags_doc_is_current():
    make_flags_doc = _flags_doc_module()
    assert make_flags_doc.is_current(), "docs/flags.md is stale: run python scripts/make_flags_doc.py"


def test_flags_doc_lists_every_flag():
    import dataclasses  # noqa: PLC0415

    from library.eval.config import EvalConfig  # noqa: PLC0415
    from library.train.config import TrainConfig  # noqa: PLC0415

    text = _flags_doc_module().render()
    for cls in (TrainConfig, EvalConfig):
        for field in dataclasses.fields(cls):
            assert f"`--{field.name}`" in text, field.name


def test_cited_docs_exist():
    missing = []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for cited in DOC_PATH.findall(line):
                if not (REPO / cited).is_file():
                    missing.append(f"{path.relative_to(REPO)}:{number}: {cited}")
    assert not missing, "cited documentation that does not exist:\n" + "\n".join(missing)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_markdown_links_resolve():
    broken = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target, anchor in MD_LINK.findall(line):
                linked = path.parent / target if target else path
                if not linked.exists():
                    broken.append(f"{path.relative_to(REPO)}:{number}: {target}")
                elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                    broken.append(f"{path.relative_to(REPO)}:{number}: {target}#{anchor} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text(encoding="utf-8").splitlines()[:25])
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head


def test_the_readme_flags_of_the_banded_defence_are_a_valid_smp_config():
    """The README names the defence by its flags; given as written they must make a run, not a config error."""
    from library.config import parse_config
    from library.train.config import TrainConfig

    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    flags = re.search(r"banded, calibrated \(t, loss\) proxy\*\* \(`([^`]+)`", text).group(1).split()
    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s", *flags])
    assert (config.attacker_features, config.attacker_calibration, config.attacker_max_timestep) == ("t_loss", "base",
                                                                                                     400)
