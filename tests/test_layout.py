"""The module map holds: each room imports only the rooms below it, searching and serving never load the trainer or
Accelerate, the ONNX query path never loads torch, and nothing in the library imports the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

import vclr

PACKAGE = Path(vclr.__file__).parent

# what each room (a subpackage, or a top-level module) may import from the others: the README's Architecture section
FOUNDATION = {"errors", "storage", "config", "rundir"}
ALLOWED = {
    "errors": set(),
    "storage": {"errors"},  # DiskFullError: a full disk is the user's to fix
    "config": {"errors", "storage"},
    "rundir": {"errors", "storage", "config"},
    "data": {"errors", "storage", "config"},
    "model": FOUNDATION,
    "embed": FOUNDATION | {"model", "data"},
    "bench": FOUNDATION | {"model", "data", "embed", "eval.metrics", "eval.plots"},  # pure functions of eval
    "train": FOUNDATION | {"model", "data", "embed", "bench", "eval.metrics"},  # metrics for validation
    "index": FOUNDATION | {"model", "data", "embed"},
    "search": FOUNDATION | {"model", "data.images", "data.cache", "embed", "index", "export.format"},
    "export": FOUNDATION | {"model", "data", "embed", "index", "search"},
    "eval": FOUNDATION | {"model", "data", "embed", "index", "train", "bench"},  # train: sweeps train each point
    "serve": FOUNDATION | {"model", "data.images", "index", "search"},
    "cli": FOUNDATION | {"model", "data", "embed", "bench", "train", "index", "search", "export", "eval", "serve"},
    "__init__": {"errors", "config", "model", "bench", "train", "index", "search", "eval", "export"},  # lazy API
}


def _room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    """Every vclr module a file imports, at its top or inside functions: 'index', 'data.images', ..."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vclr"):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "vclr" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("vclr")]
        else:
            continue
        found |= {name.split(".", 1)[1] for name in names if "." in name}
    return found


def _allowed(target: str, allowed: set[str]) -> bool:
    """`target` ('data.images.read_image', 'index.format') is one of the allowed rooms or modules."""
    return any(target == entry or target.startswith(entry + ".") for entry in allowed)


def test_every_room_imports_only_the_rooms_below_it():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(path)
        for target in sorted(_imports(path)):
            if target.split(".")[0] != room and not _allowed(target, ALLOWED[room]):
                problems.append(f"{path.relative_to(PACKAGE)} imports vclr.{target}")
    assert problems == []


def test_every_room_is_on_the_map():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert rooms | modules == set(ALLOWED)
    assert len(modules) <= 8  # the top level stays small: the rooms are the map
    assert all((PACKAGE / room / "__init__.py").read_text().startswith('"""') for room in rooms)  # what it owns


def test_the_public_api_is_lazy_and_complete():
    import vclr as package

    assert sorted(package.__all__[1:]) == sorted(package._EXPORTS)
    code = "import sys, vclr; print(sorted(m for m in sys.modules if m.startswith('vclr')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['vclr']"  # `import vclr` imports nothing else of vclr
    assert all(getattr(package, name) is not None for name in package._EXPORTS)


def test_no_module_is_over_450_lines():
    assert [p for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) > 450] == []


READERS = ["vclr.rundir", "vclr.index.format", "vclr.index.build", "vclr.eval.metrics", "vclr.model.source",
           "vclr.embed.embedding", "vclr.embed.processes", "vclr.search.searcher", "vclr.search.encoders",
           "vclr.serve.app", "vclr.serve.engine", "vclr.export.onnx", "vclr.eval.evaluate"]

# one fresh interpreter imports the readers one by one; modules only accumulate in sys.modules, so the first reader
# after which the trainer or Accelerate is loaded is the one that imported it
CHECK = """
import importlib, sys
for module in sys.argv[1:]:
    importlib.import_module(module)
    bad = sorted(m for m in sys.modules if m == "vclr.train" or m.startswith("vclr.train.") or m == "accelerate"
                 or m.startswith("accelerate."))
    if bad:
        print(module, "loaded", ",".join(bad[:3]))
        break
"""


def test_readers_do_not_import_training_code():
    out = subprocess.run([sys.executable, "-c", CHECK, *READERS], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_onnx_query_path_and_the_service_modules_do_not_import_torch():
    modules = ["vclr.search.onnx", "vclr.search.encoders", "vclr.search.searcher", "vclr.serve.app",
               "vclr.serve.engine", "vclr.export.format", "vclr.cli"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_library_errors_name_arguments_not_flags():
    """Errors raised outside vclr.cli speak of arguments (`run`); the CLI turns those into flags (--run)."""
    import re

    flag = re.compile(r"(?<![\w`-])--[a-z]")
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _room(path) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = [c.value for c in ast.walk(node.exc)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                if any(flag.search(text) for text in texts):
                    problems.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert problems == []


def test_the_cli_names_flags_for_the_library_arguments():
    from vclr.cli.common import flags_for

    assert flags_for("give `run` or `model` (with `pretrained`); `vclr models` lists them") == \
        "give --run or --model (with --pretrained); `vclr models` lists them"
