"""How the pieces fit: the model and config files are self-contained remote code, no root command imports another
root command, and the shared package imports no root command (each command keeps only its own task; what they share
lives once in `hivit_mae_tools`)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = {"configuration_hivit_mae", "modeling_hivit_mae"}
ROOT_MODULES = {path.stem for path in ROOT.glob("*.py")} - {"setup"}
COMMANDS = ROOT_MODULES - MODEL_FILES


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in `path`, wherever they appear (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_root_file_is_installed_and_every_command_has_an_entry_point():
    setup = (ROOT / "setup.py").read_text()
    for module in ROOT_MODULES:
        assert f'"{module}"' in setup, f"{module}.py is not in setup.py's py_modules"
    for command in COMMANDS:
        assert f"= {command}:" in setup, f"{command}.py has no console entry point in setup.py"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_imports_another(command):
    others = imported_modules(ROOT / f"{command}.py") & (COMMANDS - {command})
    assert not others, f"{command}.py imports the command(s) {sorted(others)}; move what they share to hivit_mae_tools"


@pytest.mark.parametrize("path", sorted((ROOT / "hivit_mae_tools").rglob("*.py")), ids=lambda path: path.name)
def test_the_package_imports_no_command(path):
    commands = imported_modules(path) & COMMANDS
    assert not commands, f"{path.relative_to(ROOT)} imports the command(s) {sorted(commands)}"


@pytest.mark.parametrize("model_file", sorted(MODEL_FILES))
def test_model_files_are_self_contained_remote_code(model_file):
    """Hub remote code is these two files alone: they import only the libraries a user has, and each other."""
    imported = imported_modules(ROOT / f"{model_file}.py") - {"configuration_hivit_mae"}
    extra = imported - set(sys.stdlib_module_names) - {"torch", "transformers"}
    assert not extra, f"{model_file}.py imports {sorted(extra)}, which a Hub user's process may not have"
