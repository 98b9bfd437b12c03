"""Imports run from higher layers down, never up: the kernels (reference/, triton/) and the
modules below them import nothing from the layers that dispatch to them or use them.

Layers, bottom up: _limits, _checks, backends; reference/; triton/ (may use the reference's
dropout hash); ops/ (validation and dispatch); nn/, data/, models/, integrations/, metrics,
train, cli. Read from the source (ast), so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seqrec_kernels"
ABOVE_THE_KERNELS = ("ops", "nn", "data", "models", "integrations", "metrics", "train", "cli")

# Each lower layer and the top-level names of seqrec_kernels it must not import.
FORBIDDEN = {
    "_limits.py": ("_checks", "backends", "reference", "triton", *ABOVE_THE_KERNELS),
    "_checks.py": ("backends", "reference", "triton", *ABOVE_THE_KERNELS),
    "backends.py": ("reference", "triton", *ABOVE_THE_KERNELS),
    "reference": ("triton", *ABOVE_THE_KERNELS),
    "triton": ABOVE_THE_KERNELS,
}


def imported_package_modules(path: Path, source: str | None = None) -> set[str]:
    """The seqrec_kernels modules that `path` (or `source` as if it were at path) imports, as
    dotted names below the package ("ops.retrieval", "_limits"), relative imports resolved."""
    package = path.relative_to(PACKAGE).parts[:-1]  # the importing module's package, below seqrec_kernels
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found.update(name.name.split(".", 1)[1] for name in node.names if name.name.startswith("seqrec_kernels."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = [*package[: len(package) - node.level + 1], *(node.module or "").split(".")]
            elif (node.module or "").split(".")[0] == "seqrec_kernels":
                module = node.module.split(".")[1:]
            else:
                continue
            module = [part for part in module if part]
            # `from .. import nn` imports the submodules it names; otherwise the module itself.
            found.update({".".join(module)} if module else {name.name for name in node.names})
    return found


def _sources(layer):
    path = PACKAGE / layer
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_reaches_up(layer):
    upward = [
        f"{path.relative_to(PACKAGE.parent)} imports seqrec_kernels.{module}"
        for path in _sources(layer)
        for module in sorted(imported_package_modules(path))
        if module.split(".")[0] in FORBIDDEN[layer]
    ]
    assert upward == []


def test_the_parser_sees_every_form_of_import():
    """The check above cannot pass by missing imports: each form below is found."""
    source = (
        "import torch\n"
        "from ..ops.retrieval import topk_items\n"
        "from .. import nn\n"
        "import seqrec_kernels.models.sasrec\n"
        "def lazy():\n"
        "    from seqrec_kernels.cli import main\n"
        "from .attention import MAX_REGISTERS\n"
    )
    found = imported_package_modules(PACKAGE / "triton" / "probe.py", source)
    assert found == {"ops.retrieval", "nn", "models.sasrec", "cli", "triton.attention"}
