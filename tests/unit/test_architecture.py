"""The shape of the code: every module imports on its own, the import graph has no cycle, no
file is over 850 formatted lines, and the training loop stays short."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import kiln

SRC = Path(kiln.__file__).parent


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(SRC)], prefix="kiln.") if m.name != "kiln.__main__")


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other kiln module is loaded yet."""
    script = (
        "import importlib, sys\n"
        "names = sys.argv[1:]\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'kiln' or m.startswith('kiln.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *modules()], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", out.stdout


def import_graph() -> dict[str, set[str]]:
    """Module -> kiln modules it imports (at the top or inside functions)."""
    names = set(modules()) | {"kiln"}
    graph: dict[str, set[str]] = {}
    for name in names:
        rel = name.removeprefix("kiln").lstrip(".").replace(".", "/")
        path = SRC / rel / "__init__.py" if (SRC / rel).is_dir() else SRC / f"{rel}.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names and t != name}
        graph[name] = deps
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, stack, cycles = import_graph(), {}, [], []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def package(module: str) -> str:
    """The package a module belongs to: `kiln.<pkg>` for a module in a subpackage; a top-level
    module (kiln.config, kiln.errors, ...) is its own."""
    return ".".join(module.split(".")[:2])


def test_no_two_packages_import_each_other():
    """Collapsed to packages, the import graph has no pair that imports both ways: each package
    sits above or below another, never beside it (the run folder below training, training below
    the run tools, the model below parallel and interop, objectives below eval and train)."""
    graph = import_graph()
    edges: dict[tuple[str, str], str] = {}
    for module in sorted(graph):
        for dep in sorted(graph[module]):
            pair = (package(module), package(dep))
            if pair[0] != pair[1]:
                edges.setdefault(pair, f"{module} -> {dep}")
    both_ways = [f"{a} <-> {b}: {edges[a, b]}; {edges[b, a]}" for a, b in sorted(edges) if a < b and (b, a) in edges]
    assert not both_ways, "\n".join(both_ways)


def test_layers_do_not_reach_up():
    """Reading runs, evaluating and exporting never import the trainer; the config layer imports
    no registry; model code knows nothing of parallelism (a spec names its plan, kiln.parallel.plans
    holds it)."""
    graph = import_graph()
    for reader in (
        "kiln.runfolder.folder",
        "kiln.runs.rundir",
        "kiln.runs.export",
        "kiln.eval.runner",
        "kiln.eval.sample",
        "kiln.runs.fork",
        "kiln.runs.catalog",
        "kiln.runs.compare",
        "kiln.runs.report",
        "kiln.runs.doctor",
        "kiln.runs.doctor_rules",
        "kiln.runs.explain",
        "kiln.interop.hf",
        "kiln.interop.hf_files",
        "kiln.interop.convert",
    ):
        assert not {d for d in graph[reader] if d.startswith(("kiln.train.trainer", "kiln.train.session"))}, reader
    assert (
        graph["kiln.config"] <= {"kiln.errors", "kiln.tomlwrite", "kiln.config_rules"} and not graph["kiln.tomlwrite"]
    )
    assert graph["kiln.config_rules"] <= {"kiln.errors"}
    # kernels sit below the model: the model calls them, they never reach into model or training code
    assert not {
        d
        for m in graph
        if m.startswith("kiln.kernels")
        for d in graph[m]
        if d.startswith(("kiln.model", "kiln.train", "kiln.parallel"))
    }
    for model_module in ("kiln.model.layers", "kiln.model.decoder", "kiln.model.encoder"):
        assert not {d for d in graph[model_module] if d.startswith("kiln.parallel")}, model_module


def test_no_file_over_850_lines():
    # 600 lines before `ruff format`, which puts one argument a line where a call does not fit and
    # grew the same code by ~35% (cli.py 594 -> 800 lines); cli and the doctor are packages now,
    # config.py (with its per-family tables) is the one near the limit.
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 850}
    assert not long, long


def test_no_function_over_80_lines():
    # From `def` to the function's last line (decorators excluded), nested functions and methods
    # too: a longer one is split into helpers that each do one job a reader can name.
    long = [
        f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)"
        for p in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n := (node.end_lineno or node.lineno) - node.lineno + 1) > 80
    ]
    assert not long, "\n".join(long)


def test_fit_reads_in_about_forty_lines():
    from kiln.train.trainer import Trainer

    assert len(inspect.getsource(Trainer.fit).splitlines()) <= 40


LOOP_OBJECTS = ("trainer", "module", "sampler", "cfg", "config")


def _root(node: ast.expr) -> str | None:
    """The name an attribute or subscript chain starts from (`trainer` in trainer.cfg.optim.lr)."""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def loop_assignments(source: str) -> list[str]:
    """Assignments in `source` to attributes of the trainer, or of its module, sampler or config
    (through a name bound from them in the same function), and setattr calls on them."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef):
            continue
        bound = {a.arg for a in fn.args.args if a.arg in LOOP_OBJECTS}
        for node in ast.walk(fn):  # names bound from the trainer: cfg = trainer.cfg, module = ...
            if isinstance(node, ast.Assign) and _root(node.value) in bound | {"trainer"}:
                for target in node.targets:
                    names = target.elts if isinstance(target, ast.Tuple) else [target]
                    bound |= {n.id for n in names if isinstance(n, ast.Name)}
        for node in ast.walk(fn):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = [
                    t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])
                ]
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                targets = [node.args[0]] if node.args and _root(node.args[0]) in bound else []
                found += [f"{fn.name}: setattr({ast.unparse(t)}, ...)" for t in targets]
                continue
            for t in targets:
                if isinstance(t, ast.Attribute | ast.Subscript) and _root(t) in bound:
                    found.append(f"{fn.name}: {ast.unparse(t)} = ...")
    return found


def test_callbacks_never_assign_the_loops_state():
    """Callbacks act through the step interface (kiln.train.step_api), never by rebinding what the
    loop owns; the check itself catches a planted patch."""
    planted = "def on_run_start(self, trainer):\n    cfg = trainer.cfg\n    cfg.optim.lr *= 2\n"
    planted += "    trainer.sampler.batch = f\n"
    assert loop_assignments(planted) == [
        "on_run_start: cfg.optim.lr = ...",
        "on_run_start: trainer.sampler.batch = ...",
    ]
    offenders = {
        path.name: found
        for path in sorted((SRC / "train" / "callbacks").glob("*.py"))
        if (found := loop_assignments(path.read_text()))
    }
    assert not offenders, offenders
