"""The packages import only downwards (docs/design.md section 8): every import in the product,
lazy ones inside functions included, is read from the source (an AST walk) and checked against
the layer order. An upward import, an import between two packages of one layer, or an import of a
module that does not exist fails here."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"h3pretrain": REPO / "h3pretrain", "flashconv": REPO / "kernels" / "flashconv",
           "data_prep": REPO / "data_prep"}

# lowest first; a module may import its own package and the layers below it
LAYERS = [
    ["h3pretrain", "h3pretrain.errors", "h3pretrain.quiet", "h3pretrain.jsonio", "h3pretrain.rundir"],
    ["h3pretrain.config"],
    ["flashconv"],
    ["h3pretrain.model"],
    ["h3pretrain.parallel"],
    ["h3pretrain.checkpoint"],
    ["data_prep"],  # writes the shards: the tokenizer, readers of raw text
    ["h3pretrain.data"],  # reads them
    ["h3pretrain.train"],
    ["h3pretrain.export", "h3pretrain.generate", "h3pretrain.evaluate", "h3pretrain.slurm", "h3pretrain.synthetic",
     "h3pretrain.summary"],
    ["h3pretrain.cli"],
]
# the Hugging Face modeling code is shipped inside exported directories: it must stand alone
STANDALONE = "h3pretrain.export.hf_modeling"


def modules() -> dict[str, Path]:
    found = {}
    for top, root in SOURCES.items():
        for f in sorted(root.rglob("*.py")):
            parts = [top, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = f
    return found


def unit(module: str) -> str:
    """The layered package a module belongs to (the longest entry of LAYERS that prefixes it)."""
    names = [n for layer in LAYERS for n in layer if module == n or module.startswith(n + ".")]
    return max(names, key=len)


def rank(module: str) -> int:
    name = unit(module)
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def imports(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the product's own packages."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from pkg import submodule`
    return [(line, t) for line, t in out if t.split(".")[0] in SOURCES]


def violations(module: str, source: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    problems = []
    for line, target in imports(module, source, is_package):
        if target not in known:
            if target.rsplit(".", 1)[0] in known:
                continue  # `from module import name`: a name, not a module
            problems.append(f"{module}:{line} imports {target}, which does not exist")
            continue
        if module.startswith(STANDALONE) and not target.startswith(STANDALONE):
            problems.append(f"{module}:{line} imports {target}: the HF modeling code must stand alone")
        elif rank(target) > rank(module):
            problems.append(f"{module}:{line} imports {target} from a higher layer")
        elif rank(target) == rank(module) and unit(target) != unit(module):
            problems.append(f"{module}:{line} imports {target}, another package of the same layer")
    return problems


def test_no_upward_imports_and_no_package_cycles():
    known = modules()
    problems = []
    for module, path in known.items():
        problems += violations(module, path.read_text(), path.name == "__init__.py", known)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, source, expected", [
    ("h3pretrain.parallel.pipeline", "from ..train.optim import build_optimizer\n", "higher layer"),
    ("h3pretrain.model.lm", "def f():\n    from ..export.hf import export_hf\n", "higher layer"),
    ("h3pretrain.export.hf", "from ..generate import generate\n", "same layer"),
    ("h3pretrain.train.engine", "from .tensor import MegatronLayerFactory\n", "does not exist"),
    ("h3pretrain.export.hf_modeling.modeling_h3", "from h3pretrain.config import ModelConfig\n", "stand alone"),
])
def test_the_checker_catches_what_it_must(module, source, expected):
    (problem,) = violations(module, source, False, modules())
    assert expected in problem
