"""The package layout holds: no import cycle inside orchestrator/ (imports inside functions included),
dependencies run one way (jobs -> orchestrator -> models), orchestrator/ uses only what models/__init__
exports, other packages use a package through its __init__, and no module outgrows a screenful of steps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import models

ROOT = Path(__file__).resolve().parents[2]
LEAVES = {"orchestrator.storage", "orchestrator.runs", "orchestrator.logs", "orchestrator.collectives", "orchestrator.ray_start",
          "orchestrator.failures", "orchestrator.noise", "orchestrator.batch_split",
          "orchestrator.process_guard"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """Every import statement anywhere in the file (module level or inside functions): (module, names)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def orchestrator_modules() -> dict[str, Path]:
    return {module_name(path): path for path in (ROOT / "orchestrator").rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the orchestrator modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = orchestrator_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in imports_of(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_orchestrator():
    graph = import_graph()
    assert len(graph) > 20 and graph["orchestrator.train.launch"], "the graph must see the real imports"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def package_graph() -> dict[str, set[str]]:
    """The module graph collapsed to parts: each subpackage (``orchestrator.train``, ``orchestrator.plan``, ...)
    is one node holding all of its modules, each top-level module (``orchestrator.storage``) a node of its own."""
    packages = {name for name, path in orchestrator_modules().items() if path.name == "__init__.py"} - {"orchestrator"}

    def part(module: str) -> str:
        return next((p for p in packages if module == p or module.startswith(p + ".")), module)

    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    return graph


def test_no_import_cycle_between_packages():
    """orchestrator.train may use orchestrator.plan, or the other way round, never both (through any module)."""
    graph = package_graph()
    assert "orchestrator.plan" in graph["orchestrator.train"], "the graph must see the real imports"
    assert find_cycle(graph) is None, f"package cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("tree", ["orchestrator", "models", "jobs"])
def test_the_library_imports_no_tests_benchmarks_or_harness(tree):
    """Measurement harnesses live beside the tests and benchmarks that use them (harness/), never in the library."""
    for path in (ROOT / tree).rglob("*.py"):
        bad = [m for m, _ in imports_of(path) if m.split(".")[0] in {"tests", "benchmarks", "harness"}]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_leaf_modules_import_nothing_of_ours_above_them():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] <= LEAVES, f"{leaf} imports {sorted(graph[leaf] - LEAVES)}"


@pytest.mark.parametrize("tree", ["orchestrator", "models"])
def test_nothing_imports_from_jobs(tree):
    for path in (ROOT / tree).rglob("*.py"):
        bad = [m for m, _ in imports_of(path) if m == "jobs" or m.startswith("jobs.")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_orchestrator_uses_only_what_models_exports():
    exported = set(models.__all__)
    for path in (ROOT / "orchestrator").rglob("*.py"):
        for module, names in imports_of(path):
            if module == "models":
                assert set(names) <= exported, f"{path.relative_to(ROOT)}: {sorted(set(names) - exported)} not exported"
            else:
                assert not module.startswith("models."), f"{path.relative_to(ROOT)} imports the internal {module}"


def test_other_packages_go_through_a_package_init():
    """orchestrator.train may import orchestrator.data, never orchestrator.data.stream (Ray Train's public/_internal split)."""
    packages = {name for name, path in orchestrator_modules().items() if path.name == "__init__.py"} - {"orchestrator"}
    for name, path in orchestrator_modules().items():
        own = next((p for p in packages if name == p or name.startswith(p + ".")), None)
        for module, _ in imports_of(path):
            target = next((p for p in packages if module.startswith(p + ".")), None)
            assert target is None or target == own, f"{name} reaches into {module}; import from {target}"


def test_no_module_outgrows_400_lines():
    for path in list((ROOT / "orchestrator").rglob("*.py")) + list((ROOT / "models").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        allowed = 470 if path.name == "tokenizer.py" else 400  # the tokenizer is one algorithm with its parity notes
        assert lines <= allowed, f"{path.relative_to(ROOT)} has {lines} lines"


def test_jobs_stay_thin():
    for path in (ROOT / "jobs").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 65, f"{path.name} is no longer a thin entry point"


def library_modules() -> list[Path]:
    return list((ROOT / "orchestrator").rglob("*.py")) + list((ROOT / "models").rglob("*.py"))


def attribute_uses(path: Path, owner: str, attribute: str) -> list[int]:
    """Lines where ``owner.attribute`` is used (``sys.argv``, ``sys.path``), or imported by name from ``owner``."""
    tree = ast.parse(path.read_text())
    lines = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == attribute
             and isinstance(node.value, ast.Name) and node.value.id == owner]
    return lines + [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == owner
                    and any(alias.name == attribute for alias in node.names)]


def test_library_code_parses_no_command_line():
    """Arguments are parsed at the edge (``jobs.cli``): no argparse, no ``sys.argv`` in orchestrator/ or models/."""
    for path in library_modules():
        assert not [m for m, _ in imports_of(path) if m == "argparse"], f"{path.relative_to(ROOT)} imports argparse"
        assert not attribute_uses(path, "sys", "argv"), f"{path.relative_to(ROOT)} reads sys.argv"


def test_library_code_never_edits_sys_path():
    for path in library_modules():
        assert not attribute_uses(path, "sys", "path"), f"{path.relative_to(ROOT)} touches sys.path"


def test_the_checks_see_a_planted_argv_and_sys_path(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import sys\nfrom sys import argv\nsys.path.insert(0, '.')\nprint(sys.argv)\n")
    assert sorted(attribute_uses(planted, "sys", "argv")) == [2, 4] and attribute_uses(planted, "sys", "path") == [3]


def test_jobs_call_the_library_through_its_package_facades():
    """jobs/ (entry points and ``jobs.cli``) imports ``orchestrator.<package or leaf module>`` and ``models``,
    never a module inside a package (``orchestrator.plan.report``) or inside models (``models.flops``)."""
    for path in (ROOT / "jobs").rglob("*.py"):
        for module, _ in imports_of(path):
            parts = module.split(".")
            deep = (parts[0] == "orchestrator" and len(parts) > 2) or (parts[0] == "models" and len(parts) > 1)
            assert not deep, f"{path.relative_to(ROOT)} reaches past a facade into {module}"


# Modules a small Ray actor or Ray Train's controller imports when it starts (the actor's class or the training
# function is unpickled by reference), and the config every process reads. Each fresh process on a 2-core machine
# paid 2-6 s to import torch, DeepSpeed, MLflow or scikit-learn through an eager package facade.
LIGHT_MODULES = ["models", "orchestrator.config", "orchestrator.data.monitor", "orchestrator.data.stages",
                 "orchestrator.train.run_control", "orchestrator.train.controller_datasets",
                 "orchestrator.train.worker_entry", "jobs.cli"]
HEAVY = ("torch", "torchvision", "deepspeed", "mlflow", "sklearn", "matplotlib")


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_what_small_actors_import_stays_light(module):
    import subprocess
    import sys

    probe = f"import sys, {module}; print(','.join(n for n in {HEAVY!r} if n in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"importing {module} loads {loaded.stdout.strip()}"


def test_a_lazy_facade_gives_the_same_objects_as_its_modules():
    import orchestrator.eval
    import orchestrator.train
    from orchestrator.eval.probe import linear_probe
    from orchestrator.train.job import prepare_run

    assert orchestrator.train.prepare_run is prepare_run
    assert orchestrator.eval.fit_linear_probe is linear_probe  # an alias ("name as alias")
    assert "prepare_run" in dir(orchestrator.train) and "prepare_run" in orchestrator.train.__all__
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        orchestrator.train.nothing_here  # noqa: B018
