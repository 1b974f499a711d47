"""The sources read clean: no import left unused, no global read that nothing defines (pyflakes' checks
that find real faults, by ast and symtable, so that no linter is a dependency), over paradit/, bench/, tests/."""
import ast
import builtins
import re
import symtable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for folder in ("paradit", "bench", "tests") for p in (ROOT / folder).rglob("*.py"))


def names_read(tree: ast.Module) -> set[str]:
    """Every name the module reads, with those named in string annotations and in __all__."""
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Store)}
    texts = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    texts += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
    texts += [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and
              any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    for node in texts:
        for c in ast.walk(node):
            if isinstance(c, ast.Constant) and isinstance(c.value, str):
                read |= set(re.findall(r"[A-Za-z_]\w*", c.value))
    return read


def unused_imports(text: str) -> list[str]:
    """Imported names the module never reads; `# noqa: F401` keeps one imported for its effect (a probe
    that the import works) or to re-export it."""
    tree, lines = ast.parse(text), text.splitlines()
    read, found = names_read(tree), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "module", None) == "__future__":
            continue
        if any("noqa: F401" in line for line in lines[node.lineno - 1:node.end_lineno]):
            continue
        found += [f"line {node.lineno}: {a.name}" for a in node.names if (a.asname or a.name.split(".")[0]) not in read]
    return found


def undefined_globals(text: str, name: str) -> list[str]:
    """Names read as globals (at module level, or free in a function) that the module never binds and
    builtins do not hold: a NameError waiting for its line to run."""
    top = symtable.symtable(text, name, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    bound |= set(dir(builtins)) | {"__file__", "__builtins__"}
    found, tables = [], [top]
    while tables:
        table = tables.pop()
        tables += table.get_children()
        for s in table.get_symbols():
            global_read = s.is_referenced() and (not s.is_assigned() if table is top else s.is_global())
            if global_read and s.get_name() not in bound:
                found.append(f"{table.get_name()}: {s.get_name()}")
    return sorted(found)


def test_the_checks_find_what_pyflakes_finds():
    text = ("import os\nimport sys, json as j\nfrom a import b  # noqa: F401\nfrom c import (d,\n    e)\n"
            "def f(x: 'sys.Path'):\n    return e + bogus\ny = missing\n")
    assert unused_imports(text) == ["line 1: os", "line 2: json", "line 4: d"]
    assert undefined_globals(text, "t.py") == ["f: bogus", "top: missing"]


def test_no_unused_imports():
    found = [f"{p.relative_to(ROOT)} {u}" for p in FILES for u in unused_imports(p.read_text())]
    assert not found, "unused imports: " + "; ".join(found)


def test_no_undefined_globals():
    found = [f"{p.relative_to(ROOT)} {u}" for p in FILES for u in undefined_globals(p.read_text(), str(p))]
    assert not found, "undefined names: " + "; ".join(found)
