"""The house: which module may import which (read from the code with ``ast``), one version, the wheel's contents."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from helpers import REPO

PACKAGE = REPO / "src" / "hf_pds"
# What must never be imported by the stages, the outputs, the cache, the run state or the evaluation.
TOP = {"hf_pds.pipeline_pds", "hf_pds.cli", "hf_pds"}
LEAVES = {"hf_pds.kmeans", "hf_pds.distributed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every hf_pds module that ``path`` imports, at module level or inside functions, as a dotted name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "hf_pds")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_pds":
                continue
            # ``from . import x`` / ``from .pkg import module`` name modules, not attributes.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_path(candidate) else target)
    found.discard(name)
    return found


def module_path(name: str) -> Path | None:
    relative = Path(*name.split(".")[1:])
    for path in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_the_import_graph_is_read(graph):
    assert "hf_pds.pairs" in graph["hf_pds.embedding"] and "hf_pds.hub" in graph["hf_pds.evaluation.cli"]


def test_there_are_no_import_circles(graph):
    def visit(module, path):
        for target in graph.get(module, ()):
            if target in path:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            visit(target, [*path, target])

    for module in graph:
        visit(module, [module])


def test_nothing_below_reaches_up_to_the_pipeline_or_the_cli(graph):
    below = [name for name in graph if name not in TOP | {"hf_pds.testing"}]
    reaching_up = {name: sorted(graph[name] & TOP) for name in below if graph[name] & TOP}
    assert reaching_up == {}


def test_the_k_means_engines_and_distributed_import_nothing_of_the_package(graph):
    assert {name: sorted(graph[name]) for name in LEAVES} == {name: [] for name in LEAVES}


def test_the_prototype_stage_imports_only_the_k_means_engines_and_distributed(graph):
    assert graph["hf_pds.prototypes"] <= {"hf_pds.kmeans", "hf_pds.distributed"}


def test_the_version_has_one_source():
    import hf_pds

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert hf_pds.__version__ == declared
    mentions = [path for path in PACKAGE.rglob("*.py") if f'"{declared}"' in path.read_text(encoding="utf-8")]
    assert mentions == []


def test_the_wheel_ships_every_subpackage_and_the_card_template_from_the_top_level_folder(tmp_path):
    assert not (PACKAGE / "model_card_templates").exists()  # one copy, at the repository's top level
    tree = tmp_path / "tree"  # a copy of what the build reads, so that it leaves nothing in the checkout
    ignored = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "__pycache__", "tests", "docs", "benchmarks")
    shutil.copytree(REPO, tree, ignore=ignored)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*command, str(tree)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hf_pds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_pds/model_card_templates/distilled_dataset_card.md" in names
    # Every module of the package is in the wheel (a subpackage missing from pyproject's list would not be).
    modules = {path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*.py")}
    assert sorted(modules - set(names)) == []


def test_a_test_session_leaves_no_cache_behind(tmp_path):
    environment = {name: value for name, value in os.environ.items() if name != "HF_DATASETS_CACHE"}
    environment["TMPDIR"] = str(tmp_path)  # where the session's caches are made
    one_test = f"{REPO / 'tests' / 'test_house.py'}::test_the_import_graph_is_read"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base")]
    result = subprocess.run([*command, one_test], capture_output=True, text=True, env=environment, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [path.name for path in tmp_path.iterdir() if path.name != "base"] == []  # base: pytest's tmp_path
