"""How the package hangs together: the planner and the layout are plain Python, runnable on their own."""
import ast
import subprocess
import sys
from pathlib import Path

# planning a machine, CHORDS and split experts included, and every pure placement question
NO_TORCH = """
import sys
import paradit.plan, paradit.plan.cli, paradit.settings
from paradit.plan import ParallelConfig, plan, rank_roles
p = plan("wan2.2-t2v-a14b", 8, "h200", max_chords=8)
assert p.choice is not None and p.explain()
rank_roles(ParallelConfig(experts="split", stages=((1, 1, 1), (1, 1, 1))), 1)
assert 'torch' not in sys.modules, 'torch was imported'
"""


def test_planning_imports_no_torch():
    # the planner, the layout and the schedule are plain Python: the CLI checks stay fast
    run = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_the_generate_help_imports_no_torch():
    # `python -m paradit.generate --help` answers from the flags alone, before torch's imports
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "paradit.generate", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--model" in run.stdout, run.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "paradit.cli.flags" in imported and "torch" not in imported


def test_the_generate_checks_import_neither_transformers_nor_diffusers(tmp_path):
    # every check runs before paradit.pipeline's imports (transformers, which imports torch._dynamo, and
    # diffusers: seconds): a refusal comes without them. --out is checked last, after the prompt's blank
    # check and the demo model's vocabulary check, which reached the text encoder's module
    out = tmp_path / "video.txt"
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "paradit.generate", "--model", "demo",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--out {out}: the video is written as H.264 mp4" in run.stderr, run.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "paradit.cli.spec" in imported and "torch" in imported   # what it reached
    assert not {"transformers", "diffusers", "paradit.models.text_encoder", "torch._dynamo"} & imported


def test_planner_module_runs():
    run = subprocess.run([sys.executable, "-m", "paradit.plan", "--model", "wan2.2-t2v-a14b", "--gpus", "8",
                          "--size", "1280x720", "--frames", "81"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Choice:" in run.stdout and "Why not the next best:" in run.stdout


# ----------------------------------------------------------------------------- the layers, read from the source
PACKAGE = Path(__file__).resolve().parent.parent / "paradit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside a function (a lazy import still makes
    a cycle: it only moves the failure to the first call); not those for type annotations only."""
    out, tree = set(), ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}  # annotations only: never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from paradit.x import module`
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {m: {d for d in imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}


def test_no_import_cycles():
    # a package's __init__ re-exporting its modules is not a cycle of the modules themselves
    graph = {m: {d for d in deps if not (MODULES[m].name == "__init__" and d.startswith(m + "."))}
             for m, deps in GRAPH.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_downwards():
    def deps(prefix):
        return {(m, d) for m, ds in GRAPH.items() if m.startswith(prefix) for d in ds}
    # models and schedulers are single-device math: no process groups
    for prefix in ("paradit.models", "paradit.schedulers"):
        assert not {m for m, p in MODULES.items() if m.startswith(prefix) and "torch.distributed" in
                    " ".join(imports(p))}, f"{prefix} imports torch.distributed"
    # the parallel machinery talks to process groups; it never reaches up into the engine or the facade
    up = {(m, d) for m, d in deps("paradit.parallel") if d.startswith(("paradit.engine", "paradit.pipeline",
                                                                         "paradit.generate", "paradit.serve",
                                                                         "paradit.cli"))}
    assert not up, f"parallel/ reaches up: {sorted(up)}"
    # the drivers know the runtime and the request, never the Pipeline
    up = {(m, d) for m, d in deps("paradit.engine") if d.startswith(("paradit.pipeline", "paradit.generate",
                                                                       "paradit.serve", "paradit.cli"))}
    assert not up, f"engine/ reaches up: {sorted(up)}"
    # and no function below the facade takes the pipeline as an argument
    for m, p in MODULES.items():
        if m.startswith(("paradit.parallel", "paradit.engine", "paradit.models", "paradit.schedulers")):
            args = {a.arg for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.arguments)
                    for a in node.args + node.kwonlyargs}
            assert "pipe" not in args and "pipeline" not in args, f"{m} takes the pipeline"


MUTABLE = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque"}
MUTATORS = {"append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "setdefault", "add",
            "discard", "sort", "reverse", "appendleft"}


def module_tables(tree: ast.Module) -> set[str]:
    """Module-level names bound to a mutable container (a dict, a list, a set...)."""
    out = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        value = getattr(node, "value", None)
        if isinstance(value, MUTABLE) or (isinstance(value, ast.Call) and getattr(
                value.func, "id", getattr(value.func, "attr", None)) in MUTABLE_CALLS):
            out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def base_name(node) -> str | None:
    """`TABLE` of TABLE[k][j], TABLE.attr, mod.TABLE (the last attribute of a module path)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr if isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls") else None
    return node.id if isinstance(node, ast.Name) else None


def writes_to_tables(sources: dict[str, str]) -> list[str]:
    """Where a function writes to a module-level container, of its own module or another's (by
    name), or to an attribute of a module-level function (a once-flag), or declares a global: state
    kept in modules. Import-time construction is not counted."""
    trees = {m: ast.parse(text) for m, text in sources.items()}
    tables = {name: m for m, tree in trees.items() for name in module_tables(tree)}
    found = []
    for m, tree in trees.items():
        functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        found += [f"{m} writes {m}.{ast.unparse(t)} (line {node.lineno})" for node in ast.walk(tree)
                  if isinstance(node, (ast.Assign, ast.AugAssign))
                  for t in getattr(node, "targets", [getattr(node, "target", None)])
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in functions]
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            local = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            local |= {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
            for node in ast.walk(fn):
                if isinstance(node, ast.Global):
                    found.append(f"{m}: global {', '.join(node.names)} (line {node.lineno})")
                targets = []
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                    targets = [t for t in getattr(node, "targets", [getattr(node, "target", None)])
                               if isinstance(t, ast.Subscript)]
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr in MUTATORS:
                    targets = [node.func.value]
                for t in targets:
                    name = base_name(t)
                    if name in tables and name not in local:
                        found.append(f"{m} writes {tables[name]}.{name} (line {node.lineno})")
    return found


def test_the_state_check_finds_a_global_counter():
    # the counter paradit had: a module-global dict, written by the collectives, cleared by the pipeline
    sources = {"a": "from collections import defaultdict\nTRAFFIC = defaultdict(lambda: [0, 0])\n"
                    "def count(op, n):\n    TRAFFIC[op][0] += n\n",
               "b": "from a import TRAFFIC\ndef call():\n    TRAFFIC.clear()\n",
               "c": "TABLE = {'x': 1}\nTABLE.update(y=2)\ndef read():\n    return TABLE['x']\n",
               # the once-flags paradit.launch had: an attribute set on the function itself
               "d": "def once():\n    if getattr(once, '_done', False):\n        return\n    once._done = True\n"}
    assert writes_to_tables(sources) == ["a writes a.TRAFFIC (line 4)", "b writes a.TRAFFIC (line 3)",
                                         "d writes d.once._done (line 4)"]


def test_no_module_level_mutable_state():
    # module globals are constants: a table may be a dict, but no function writes to it; state lives
    # in objects that are passed in (the mesh, the runtime's traffic counter, a request's record)
    found = writes_to_tables({m: p.read_text() for m, p in MODULES.items()})
    assert not found, "module-level mutable state: " + "; ".join(found)


def test_the_design_contract_names_import():
    # the public API (paradit/__init__.py): the names users and tests rely on
    from paradit import Pipeline, WanConfig, WanTransformer, load_transformer  # noqa: F401
    from paradit.parallel import ParallelConfig, init_parallel, parallelize  # noqa: F401
    from paradit.schedulers import FlowEulerScheduler, FlowUniPCScheduler, make_scheduler  # noqa: F401
    from paradit.schedulers.chords import Chords  # noqa: F401
    assert ParallelConfig(experts="split").stages_pending


# the entry points (and the package's lazy re-export) may know the facade; nothing else does
ENTRY = ("paradit.generate", "paradit.serve", "paradit.cli")


def test_nothing_below_the_facade_knows_it():
    # no module below the entry points imports paradit.pipeline, constructs a Pipeline (a `cls`
    # handed down would do it: the build returns Components, from_spec builds the facade), or writes
    # its start-up figures (pipe.startup / pipe.load_stats)
    for m, p in MODULES.items():
        if m in ("paradit", "paradit.pipeline") or m.startswith(ENTRY):
            continue
        assert "paradit.pipeline" not in GRAPH[m], f"{m} imports the facade"
        tree = ast.parse(p.read_text())
        calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert not {c for c in calls if c == "Pipeline" or c.endswith(".Pipeline")}, f"{m} builds it"
        handed = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.args.args and
                  f.args.args[0].arg == "cls" and "classmethod" not in map(ast.unparse, f.decorator_list)]
        assert not handed, f"{m}: {handed} take a class to build (the facade, handed down)"
        writes = {ast.unparse(t) for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))
                  for t in getattr(n, "targets", [getattr(n, "target", None)])}
        assert not {w for w in writes if w.startswith(("pipe.startup", "pipe.load_stats"))}, f"{m} writes the facade"


def test_one_construction_path():
    # presets and checkpoints are built by runspec.build_components, and the facade is built by
    # Pipeline.from_spec alone: from_pretrained is build_spec + from_spec
    import inspect

    from paradit.pipeline import Pipeline
    source = inspect.getsource(Pipeline.from_pretrained)
    assert "cls.from_spec(build_spec(" in source and "build_components" not in source
    assert "build_components(spec, mesh)" in inspect.getsource(Pipeline.from_spec)


# ----------------------------------------------------------------------------- sizes (STYLE.md 9)
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def oversized(sources: dict[str, str]) -> list[str]:
    """Files over MAX_FILE_LINES lines and functions (nested ones too) over MAX_FUNCTION_LINES."""
    found = []
    for m, text in sources.items():
        if len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{m}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{m}.{node.name}: {n} lines")
    return found


def test_the_size_check_finds_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert oversized({"a": f"def f():\n{body}\n", "b": "def g():\n    pass\n"}) == ["a.f: 61 lines"]


def test_small_files_and_short_functions():
    found = oversized({m: p.read_text() for m, p in MODULES.items()})
    assert not found, "over the limits: " + "; ".join(found)


def test_bench_files_are_small():
    """Both rules hold for the benchmarks too (bench/scaling.py had grown to 1,032 lines, and three
    scripts' main() to 66-80)."""
    bench = PACKAGE.parent / "bench"
    found = oversized({f"bench/{p.stem}": p.read_text() for p in sorted(bench.glob("*.py"))})
    assert not found, "over the limits: " + "; ".join(found)


# ----------------------------------------------------------------------------- the layers, top first
# (docs/architecture.md's picture). A module may import its own layer and those below it, never one above.
LAYERS = (
    ("entry points", ("paradit.generate", "paradit.serve", "paradit.cli", "paradit.plan.cli", "paradit.plan.__main__",
                      "paradit.__main__")),
    ("facade", ("paradit.pipeline",)),
    ("spec and build", ("paradit.runspec", "paradit.components", "paradit.checkpoint", "paradit.compile",
                        "paradit.offload", "paradit.streaming", "paradit.outputs")),
    ("engine", ("paradit.engine",)),
    ("parallel", ("paradit.parallel",)),
    ("launch", ("paradit.launch",)),
    ("single device", ("paradit.models", "paradit.schedulers", "paradit.conditioning", "paradit.demo")),
    ("plain Python", ("paradit.plan", "paradit.settings", "paradit.residency", "paradit.config", "paradit.errors",
                      "paradit.events", "paradit.prompts", "paradit.schedulers.schedule",
                      "paradit.schedulers.chords_schedule")),
)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest prefix naming `module` (None: the package itself)."""
    found = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
             if module == p or module.startswith(p + ".")]
    return max(found)[1] if found else None


def test_every_module_has_a_layer_and_imports_downwards():
    assert not [m for m in MODULES if m != "paradit" and layer_of(m) is None], "modules in no layer"
    up = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})" for m, deps in GRAPH.items()
          if m != "paradit" for d in deps if d != "paradit" and layer_of(d) < layer_of(m)]
    assert not up, "upward imports: " + "; ".join(sorted(up))


# where process groups are created: the mesh (all of a layout's groups, eagerly), the launcher (the
# world), and the loader's read-once groups (parallel/weights.node_read_groups, once, while loading)
GROUP_MAKERS = ("new_group(", "init_device_mesh(", "DeviceMesh(", "init_process_group(", "._flatten(", "from_group(")
GROUP_HOMES = {"paradit.parallel.mesh", "paradit.launch", "paradit.parallel.weights"}


def test_process_groups_are_created_where_the_document_says():
    found = {m for m, p in MODULES.items() for line in p.read_text().splitlines()
             if not line.lstrip().startswith(("#", "from ", "import ")) and any(w in line for w in GROUP_MAKERS)}
    assert found <= GROUP_HOMES, f"process groups created in {sorted(found - GROUP_HOMES)}"


def test_timings_and_test_hooks_have_one_home():
    # paradit.events times the phases and holds the test hooks: no layer reads the hooks' variables,
    # or measures a phase into the start-up or a request's timings, by hand
    readers = {m for m, p in MODULES.items() if m != "paradit.events" for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Constant) and node.value in ("PARADIT_FAIL_AT", "PARADIT_DELAY_AT")}
    assert not readers, f"the test hooks read outside paradit.events: {sorted(readers)}"
    by_hand = {m for m, p in MODULES.items() for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Assign) and any(
                   isinstance(t, ast.Subscript) and ast.unparse(t.value).split(".")[-1] in ("startup", "timings")
                   for t in node.targets) and "perf_counter" in ast.unparse(node.value)}
    assert not by_hand, f"phases timed by hand in {sorted(by_hand)}"
