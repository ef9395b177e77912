"""The package's promises about itself: a numpy-only core, extras imported only where used."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import tbptt


def test_import_tbptt_needs_numpy_only():
    """`import tbptt` (and its CLI parser) loads neither torch, matplotlib, tqdm, lightning nor
    numba."""
    code = (
        "import sys, tbptt, tbptt.app.cli; tbptt.app.cli.build_parser(); "
        "extras = ('torch', 'matplotlib', 'tqdm', 'jax', 'lightning', 'numba'); "
        "heavy = [m for m in extras if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_names_exist():
    """Everything in tbptt.__all__ is importable from the package."""
    assert all(hasattr(tbptt, name) for name in tbptt.__all__)


# -- the layout: library, analysis, torch engine, application -------------------------------------
SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every tbptt module `path` imports, wherever the import stands (inside functions and under
    TYPE_CHECKING too): `from . import x` names the submodule x when there is one."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tbptt"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tbptt":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found |= set(subs) if len(subs) == len(node.names) else {target, *subs}
    return found - {name}


MODULES = {module_name(p): p for p in (SRC / "tbptt").rglob("*.py")}


def test_no_import_cycles():
    """The graph of every import between tbptt's modules (inside functions and under
    TYPE_CHECKING too) has no cycle."""
    graph = {name: imports_of(path) & set(MODULES) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["tbptt.app.train"] >= {"tbptt.app.sample"}  # the graph sees real imports


def test_the_library_never_imports_the_application():
    """No module outside tbptt.app imports it; importing tbptt, tbptt.analysis and tbptt.torch
    loads no application module."""
    for name, path in MODULES.items():
        if not name.startswith("tbptt.app"):
            app = sorted(m for m in imports_of(path) if m.startswith("tbptt.app"))
            assert not app, f"{name} imports {app}"
    code = (
        "import sys, tbptt, tbptt.analysis, tbptt.analysis.bias, tbptt.analysis.explain, "
        "tbptt.analysis.influence, tbptt.torch; "
        "app = [m for m in sys.modules if m.startswith('tbptt.app')]; "
        "print(app); sys.exit(1 if app else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def layout_files() -> set[str]:
    """The files CONTRIBUTING.md's layout names: `src/tbptt/x/` heads a folder, and each line
    under it starts with its file names (comma-separated) before the description."""
    text = (SRC.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed, folder = set(), None
    for line in layout.splitlines():
        head = re.match(r" {4}(src/[\w/]+/)(\s|$)", line)
        if head:
            folder = head.group(1)
        elif folder and re.match(r" {6}\w", line):
            names = re.split(r"\s{2,}", line.strip())[0]
            listed |= {folder + name.strip() for name in names.split(",")}
    return listed


def test_contributing_names_every_file_under_src():
    """Every file under src/ stands in CONTRIBUTING.md's layout, in its folder, and the layout
    names no file that does not exist."""
    files = {
        str(p.relative_to(SRC.parent))
        for p in SRC.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    }
    listed = layout_files()
    assert not sorted(files - listed), f"not in CONTRIBUTING.md's layout: {sorted(files - listed)}"
    assert not sorted(listed - files), f"in the layout but not in src/: {sorted(listed - files)}"


# -- the extras a page of documentation needs ------------------------------------------------------
ROOT = SRC.parent


def extras() -> dict[str, set[str]]:
    """{extra: the distributions it installs} from pyproject.toml (tbptt[a,b] expanded); the
    test and bench extras, for developers, left out."""
    import re

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    table = table["optional-dependencies"]
    out: dict[str, set[str]] = {}
    for name in table:
        if name in ("test", "bench"):
            continue
        todo, seen = list(table[name]), set()
        while todo:
            req = todo.pop()
            ref = re.match(r"tbptt\[([\w,-]+)\]", req)
            if ref:
                todo += [r for e in ref.group(1).split(",") for r in table[e]]
            else:
                seen.add(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower())
        out[name] = seen
    return out


def test_every_page_names_the_extras_its_code_imports():
    """Each page of docs/ (and README.md) whose code imports a package of an extra (torch,
    accelerate, lightning, matplotlib, ...) names that extra, as pip's [extra], before its first
    code block; and the extra exists in pyproject.toml."""
    import re

    known = extras()
    core = {"numpy", "tbptt"} | set(sys.stdlib_module_names)
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        code = "\n".join(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M))
        modules = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M)) - core
        head = text[: text.find("```")] if "```" in text else text
        named = {e for group in re.findall(r"\[([\w, -]+)\]", head) for e in group.split(",")}
        for module in sorted(modules):
            providers = {e for e, dists in known.items() if module in dists}
            assert providers, f"{page.name} imports {module}, which no extra installs"
            assert providers & {e.strip() for e in named}, (
                f"{page.name} imports {module} but names none of the extras {sorted(providers)} "
                "before its first code block"
            )
