"""The package follows the arrows docs/architecture.md documents: every import of moepager code, walked from
the source, goes from a part to a part listed below it there. Also: nothing but the public API and its errors at
the top of the package, every package says what it owns, and no file is a god file."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moepager"
DOC = ROOT / "docs" / "architecture.md"
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py"}
MAX_LINES = 520  # "no file over ~500 lines"


def documented_order() -> list[str]:
    """The parts, lowest first, from the block after the marker comment in docs/architecture.md."""
    text = DOC.read_text()
    block = re.search(r"<!-- parts, lowest first[^>]*-->\s*```\n(.*?)```", text, re.S)
    assert block, f"{DOC}: the parts block is missing"
    return block[1].split()


def part_of(module: str) -> str:
    """moepager.paging.cache -> paging; moepager.errors -> errors; moepager -> api."""
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (annotations only: no arrow at run time)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for n in ast.walk(node))
    return out


def module_imports(path: Path, module: str) -> list[tuple[str, int]]:
    """The moepager modules (or packages) `path` imports, resolved, with line numbers."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = _type_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "moepager":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import sessions` imports a module of that part
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                found.append((sub if is_module else target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "moepager"]
    return found


def forbidden_arrows(package: Path, order: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        source = part_of(module)
        for target, line in module_imports(path, module):
            dest = part_of(target)
            if dest == source:
                continue
            where = f"{path.relative_to(package.parent)}:{line}"
            if source not in rank or dest not in rank:
                problems.append(f"{where}: {source} -> {dest}: a part docs/architecture.md does not list")
            elif rank[dest] >= rank[source]:
                problems.append(f"{where}: {source} imports {target}, a part above it")
    return problems


def test_every_import_follows_the_documented_arrows():
    assert forbidden_arrows(PACKAGE, documented_order()) == []


def test_every_part_on_disk_is_documented():
    order = documented_order()
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts - set(order) == set()


def test_the_checker_finds_an_arrow_that_goes_up(tmp_path):
    fake = tmp_path / "moepager"
    (fake / "model").mkdir(parents=True)
    (fake / "paging").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "paging" / "__init__.py").write_text("")
    (fake / "paging" / "cache.py").write_text("from ..model import decoder\n")
    (fake / "model" / "decoder.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..paging import cache\n"
        "def f():\n    from ..paging.cache import ExpertCache\n"
    )
    problems = forbidden_arrows(fake, ["model", "paging"])
    assert problems == ["moepager/model/decoder.py:5: model imports moepager.paging.cache, a part above it"]


def test_only_the_public_api_and_its_errors_at_the_top():
    assert {p.name for p in PACKAGE.glob("*.py")} == TOP_LEVEL


@pytest.mark.parametrize("init", sorted(PACKAGE.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_every_package_says_what_it_owns(init):
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 12, f"{init}: a docstring saying what the package owns"


def test_no_file_is_a_god_file():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
