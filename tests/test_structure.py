"""The house rules a newcomer relies on: imports flow one way (olmo_jax <- prune <- train), the task
modules and the benchmarks stay where they belong, importing the library defines no absl flag, no
stage of the study calls another stage, no function outside tests grows past 50 lines and no
module past 400."""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("olmo_jax", "prune", "train", "configs")


def _modules():
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    yield rel.removesuffix(".__init__"), path


MODULES = dict(_modules())


def _imports(path):
    """Modules of ours that `path` imports (`from pkg import sub` names the submodule, not pkg)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m.split(".")[0] in PACKAGES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _resolve(target):
    """The module an import names (a `from pkg import sub` may name a submodule)."""
    while target and target not in GRAPH:
        target = target.rpartition(".")[0]
    return target


def test_imports_flow_one_way():
    for mod, deps in GRAPH.items():
        top = mod.split(".")[0]
        for dep in {_resolve(d) for d in deps} - {mod, ""}:
            if top == "olmo_jax":
                assert dep.startswith("olmo_jax"), (mod, dep)
            if top == "prune":
                assert dep.split(".")[0] in ("olmo_jax", "prune"), (mod, dep)
            if dep.startswith("train.bench"):  # the benchmarks are imported by nothing but themselves
                assert mod.startswith("train.bench"), (mod, dep)
    # the task modules are used by training, evaluation and pruning, and import only olmo_jax
    for mod in [m for m in GRAPH if m.startswith("olmo_jax.tasks")]:
        assert all(d.startswith(("olmo_jax.tasks", "olmo_jax.packing", "olmo_jax.config")) for d in
                   {_resolve(x) for x in GRAPH[mod]} - {""}), mod
    assert "olmo_jax.tasks.csqa" in {_resolve(d) for d in GRAPH["prune.main"]}


def test_no_import_cycles():
    graph = {m: {_resolve(d) for d in deps} - {m, ""} for m, deps in GRAPH.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_importing_the_library_defines_no_flags():
    # third-party modules define theirs (absl.logging, Orbax): count only what ours add
    code = ("from absl import flags, logging; import orbax.checkpoint, jax, transformers; "
            "before = set(flags.FLAGS); import olmo_jax, prune, train.study, train.report, "
            "train.eval.run, train.aot.report, train.bench.harness, olmo_jax.gguf_export, olmo_jax.edge; "
            "print(sorted(set(flags.FLAGS) - before))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_functions_and_modules_stay_short():
    long = []
    for name, path in _modules():
        src = open(path).read()
        if len(src.splitlines()) > 400:
            long.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def _stage_functions() -> dict[str, set[str]]:
    """Per module the plan takes stages from (`S.`, `E.` in train/study/plan.py), the names of the
    functions it hands the runner as stages."""
    plan = ast.parse(open(MODULES["train.study.plan"]).read())
    alias = {a.asname: f"{n.module}.{a.name}" for n in ast.walk(plan) if isinstance(n, ast.ImportFrom)
             for a in n.names if a.asname}
    out: dict[str, set[str]] = {}
    for call in (n for n in ast.walk(plan) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Stage"):
        fn = call.args[1] if len(call.args) > 1 else None
        if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id in alias:
            out.setdefault(alias[fn.value.id], set()).add(fn.attr)
    return out


def test_no_stage_calls_another_stage():
    """A stage gets what it needs from the plan's declared inputs, never by running another stage
    (and the plan itself is the only caller of the runner's stage functions)."""
    stages = _stage_functions()
    every = set().union(*stages.values())
    assert {"dense", "prune", "train", "tune", "select", "teacher_cache", "schedule_round", "edge"} <= every
    for module, names in stages.items():
        tree = ast.parse(open(MODULES[module]).read())
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            called = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            called |= {c.func.attr for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                       and isinstance(c.func.value, ast.Name) and c.func.value.id in ("S", "E", "stages", "edge")}
            assert not (called & every) - {fn.name}, f"{module}.{fn.name} calls the stage(s) {called & every}"
    for mod, deps in GRAPH.items():  # only the plan refers to the stage modules
        if {"train.study.stages", "train.study.edge"} & {_resolve(d) for d in deps}:
            assert mod == "train.study.plan", mod
