"""Every stage's code deps in dvc.yaml cover the project code its command imports.

For each stage, the command (`arpipe <cmd>`) is mapped through stages/cli.py to the module of its
command function; from there the import closure inside the project is computed statically with
`ast`: module-level and function-level imports, `from . import x` submodules, every package
`__init__` on the way, and a package whose `__init__` discovers its modules with `pkgutil`
(pipeline_lib/methods) imports all of them. A project file in the closure that no `deps:` entry
covers (a dep may be a folder) fails the test: editing it would re-run nothing.

ALLOW: files that cannot change a stage's results, so leaving them out of deps spares re-runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from datafiles import REPO

ALLOW = {
    "pipeline_lib/tracking.py": "MLflow mirror: logs what the stage computed, never an output",
    "pipeline_lib/tracking_layout.py": "MLflow mirror: the per-model comparison runs, built from the files "
                                       "the stage wrote; never an output",
    "stages/common.py": "params loading and one-line error printing",
    "stages/errors.py": "one-line printing of user errors, traceback behind --debug",
    "pipeline_lib/errors.py": "the UserError exception type: what a failure prints, never a result",
    "stages/__init__.py": "empty package marker",
    "pipeline_lib/lazy.py": "the lookup of a package's lazy names; which name comes from where is in the "
                            "package's __init__, a dep",
    "pipeline_lib/__init__.py": "package docstring and version",
}
# pipeline_lib/config.py is the params schema. What it imports serves validation of the whole file
# (every method's params, every model name, every section), which is the `validate` stage's work
# and dependency (all of pipeline_lib): the closure does not follow config.py's imports. The stages
# that read a section depend on that section's module (evaluation/config.py, corruption/config.py,
# aggregation/config.py) through their folders, and the training stages on config.py itself
# (MethodSpec merges each method's optim); for the evaluation stages config.py is only the schema.
# pipeline_lib/registered.py is the rest of that validation (model names and method params, which only
# the registries know): the same holds for it.
SCHEMA = frozenset({"pipeline_lib/config.py", "pipeline_lib/registered.py"})
SCHEMA_ONLY_STAGES = ("evaluate", "corrupt", "corruption", "aggregate")
# The MLflow mirror's own imports serve only what it logs (e.g. the model runs' resolved hyperparameters
# are rebuilt with the finetune job's code): the closure does not follow them.
MIRROR = frozenset(f for f, why in ALLOW.items() if why.startswith("MLflow mirror"))
# Reached through pipeline_lib/methods' (and method_params') plugin discovery, never run by pretraining (it
# builds only the standard objective). tests/test_pipeline_dvc.py checks editing either cure.py does not retrain it.
OTHER_METHODS = re.compile(r"pipeline_lib/(methods/(?!base\.py|standard\.py)"
                           r"|method_params/(?!__init__\.py|standard\.py))[^/]+\.py")


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return None


def _package(file: Path) -> str:
    rel = file.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(file: Path, function: str | None = None) -> set[str]:
    """Project modules `file` imports anywhere (module and function level), absolute names; with
    `function`, only its module-level imports and those inside that function (a stage's command) and
    inside the module's functions it calls."""
    tree: ast.AST = ast.parse(file.read_text(encoding="utf-8"))
    if function is not None:   # that function, and the module's functions it calls (transitively)
        module = tree
        defs = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}  # type: ignore[attr-defined]
        reached, todo = set(), [function]
        while todo:
            name = todo.pop()
            if name in reached or name not in defs:
                continue
            reached.add(name)
            todo += [c.func.id for c in ast.walk(defs[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        body = [n for n in module.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]  # type: ignore[attr-defined]
        body += [defs[n] for n in sorted(reached)]
        tree = ast.Module(body=body, type_ignores=[])
    pkg = _package(file) if file.name == "__init__.py" else _package(file).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}   # `from pkg import submodule`
        elif (isinstance(node, ast.Attribute) and node.attr == "iter_modules" and isinstance(node.value, ast.Name)
              and node.value.id == "pkgutil"):                      # plugin discovery: every module of the package
            found |= {f"{pkg}.{m.stem}" for m in file.parent.glob("*.py") if m.name != "__init__.py"}
    return {n for n in found if n.split(".")[0] in ("pipeline_lib", "stages")}


def closure(start: str, stop: frozenset[str] = frozenset()) -> set[str]:
    """Project files (repo-relative) imported from `module` or `module:function` (that function's
    imports and the module-level ones), package __init__s included;
    the imports of the files in `stop` are not followed (the files themselves are in)."""
    module, _, function = start.partition(":")
    first = _module_file(module)
    assert first is not None, start
    seen: set[Path] = {first}
    todo = [*_imports(first, function or None), *(module.split(".")[:1])]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):   # importing a.b.c runs a/__init__ and a/b/__init__ first
            file = _module_file(".".join(parts[:i]))
            if file is not None and file not in seen:
                seen.add(file)
                if str(file.relative_to(REPO)) not in stop:
                    todo.extend(_imports(file))
    return {str(f.relative_to(REPO)) for f in seen}


def _commands() -> dict[str, str]:
    """`arpipe` subcommand -> `module:function` of its command, from stages/cli.py's app.command(...) lines."""
    text = (REPO / "stages" / "cli.py").read_text(encoding="utf-8")
    return {cmd: f"stages.{mod}:{fn}" for cmd, mod, fn in re.findall(r'app\.command\("([\w-]+)"\)\((\w+)\.(\w+)\)', text)}


def _stages() -> list[tuple[str, str, list[str]]]:
    """(stage, arpipe command, code deps) of every stage in dvc.yaml."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    out = []
    for name, stage in dvc["stages"].items():
        stage = stage.get("do", stage)   # a foreach stage keeps its definition under `do`
        cmd = re.match(r"arpipe ([\w-]+)", stage["cmd"].strip())
        assert cmd, f"{name}: not an arpipe command"
        deps = [d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith(("pipeline_lib", "stages"))]
        out.append((name, cmd.group(1), deps))
    return out


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize(("stage", "command", "deps"), _stages(), ids=[s[0] for s in _stages()])
def test_stage_deps_cover_its_import_closure(stage: str, command: str, deps: list[str]) -> None:
    files = closure(_commands()[command], MIRROR | (frozenset() if stage == "validate" else SCHEMA))
    kind = stage.removesuffix("_rep")   # a replicate stage (another training seed) runs its base stage's command
    allowed = set(ALLOW) | (SCHEMA if kind in SCHEMA_ONLY_STAGES else set())
    missing = sorted(f for f in files if not _covered(f, deps) and f not in allowed
                     and not (kind == "pretrain" and OTHER_METHODS.fullmatch(f)))
    assert not missing, f"dvc.yaml stage {stage!r} imports files its deps do not cover: {missing}"


def test_closure_follows_function_level_imports_and_plugin_discovery() -> None:
    """The test's own premise: train's closure holds what its commands import inside functions
    (the training package) and, through pipeline_lib/methods' pkgutil discovery, every method."""
    files = closure("stages.train:finetune")
    assert {"pipeline_lib/training/job.py", "pipeline_lib/runtime.py", "pipeline_lib/methods/cure.py",
            "pipeline_lib/__init__.py", "stages/__init__.py"} <= files
