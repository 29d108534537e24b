"""Architecture guards, written as tests (in the spirit of torchtitan's test_no_new_cli_options.py).

The package is being restructured so that dependencies point one way:

    cli -> train -> objectives/tasks -> models, checkpoint, tracking -> config, errors, distributed

and `data_pipeline` stands alone (it is a library of its own; the training code uses it, never
the other way round). Layers that only point down can be read, tested and replaced one at a time;
a single upward import quietly ties them back together. These tests keep that shape from eroding:

* no import cycle between first-party modules;
* a table of forbidden import directions (each with its reason);
* only `mae_scale/objectives/` may branch on an objective's name ("mae", "simmim", "beit"):
  everywhere else the objective is an object that is asked, not a string that is compared;
* no source file over MAX_LINES lines.

The import graph is built by parsing the sources with `ast`, never by importing them: importing
would run torch/DeepSpeed set-up, hide imports made inside functions until they run, and fail on a
half-restructured tree. Imports inside functions and methods count (they run when called, and a
cycle "hidden" in a function is still a cycle, only a later one); imports under
`if TYPE_CHECKING:` do not (they never run). Dynamic imports (importlib) are not seen.

Edges are exactly what the import statements name, resolved to modules that exist in the tree:
`import a.b.c` is an edge to `a.b.c` (or its nearest existing parent); `from pkg import name` is an
edge to `pkg.name` and to `pkg` when `pkg.name` is a module, else to `pkg`. No implicit edge to the
parent `__init__` of every imported module is added, although Python runs it: that would make
every package and its submodules one big cycle and hide the real ones.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("mae_scale", "data_pipeline", "launchers")

# The standard is "files of roughly 150-500 lines": past that a file usually holds two concerns
# that want separate names (and separate tests).
MAX_LINES = 500

# Objective names that only mae_scale/objectives/ may compare against.
OBJECTIVE_NAMES = frozenset({"mae", "simmim", "beit"})
# Where objective-name comparisons are looked for. data_pipeline is left out on purpose: it has no
# notion of objectives, and its `augment == "mae"` names an augmentation recipe, not an objective.
OBJECTIVE_SCAN_PACKAGES = ("mae_scale", "launchers")
OBJECTIVES_PACKAGE = "mae_scale.objectives"


# --------------------------------------------------------------------------------------------------
# Import graph
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where an import edge comes from, for failure messages."""

    path: str  # relative to the root that was scanned
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Graph:
    root: Path
    modules: dict[str, Path]  # dotted name -> file
    packages: set[str]  # dotted names whose file is an __init__.py
    edges: dict[str, dict[str, list[Site]]]  # importer -> imported -> where

    def targets(self, module: str) -> dict[str, list[Site]]:
        return self.edges.get(module, {})


def matches(name: str, prefix: str) -> bool:
    """Dotted-prefix match: `a.b` matches `a.b` and `a.b.c`, not `a.bc` (so `mae_scale.cli`
    does not match `mae_scale.cli_args`)."""
    return name == prefix or name.startswith(prefix + ".")


def matches_any(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(matches(name, p) for p in prefixes)


def discover_modules(root: Path, top_packages: tuple[str, ...]) -> tuple[dict[str, Path], set[str]]:
    """Every .py file under the top-level packages, by dotted module name. A package's
    `__init__.py` is the package's own name."""
    modules: dict[str, Path] = {}
    packages: set[str] = set()
    for top in top_packages:
        base = root / top
        if not base.is_dir():
            continue  # a package may not exist (yet) in a synthetic tree or mid-restructuring
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
                packages.add(".".join(parts))
            modules[".".join(parts)] = path
    return modules, packages


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`: the body never runs."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def iter_runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom in the tree, at any depth (functions, methods, try blocks), except
    those inside an `if TYPE_CHECKING:` body. The `else:` of such an `if` does run, so it is kept."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """`a.b.c` if that module exists, else its nearest existing parent (`import a.b.c` where c is a
    class or a not-yet-created module still runs `a.b`). None outside the tree."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def package_of(module: str, packages: set[str]) -> str:
    """The package that relative imports in `module` are resolved against: the module itself for an
    `__init__.py`, its parent otherwise."""
    return module if module in packages else module.rpartition(".")[0]


def resolve_from_base(node: ast.ImportFrom, module: str, packages: set[str]) -> str | None:
    """The absolute dotted name of `from <base> import ...`, with relative levels resolved."""
    if node.level == 0:
        return node.module
    parts = package_of(module, packages).split(".")
    if node.level - 1 >= len(parts):
        return None  # beyond the top-level package: Python refuses it too
    base_parts = parts[: len(parts) - (node.level - 1)]
    if node.module:
        base_parts += node.module.split(".")
    return ".".join(base_parts)


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, graph: Graph) -> list[str]:
    """The existing first-party modules one import statement names."""
    found: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = nearest_module(alias.name, graph.modules)
            if target:
                found.append(target)
        return found
    base = resolve_from_base(node, module, graph.packages)
    if not base:
        return found
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if alias.name != "*" and sub in graph.modules:
            # `from pkg import sub`: the submodule only. Python runs pkg/__init__ first, but the
            # statement depends on `sub`, not on what the __init__ defines (and a package's
            # submodules reading their siblings so is no cycle through the package).
            found.append(sub)
        else:
            target = nearest_module(base, graph.modules)
            if target:
                found.append(target)
    return found


def build_graph(root: Path, top_packages: tuple[str, ...]) -> Graph:
    """Parse (never import) every module under root/<top_packages> and collect the import edges
    between them."""
    modules, packages = discover_modules(root, top_packages)
    graph = Graph(root=root, modules=modules, packages=packages, edges={})
    for module, path in modules.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out = graph.edges.setdefault(module, {})
        for node in iter_runtime_imports(tree):
            for target in dict.fromkeys(imported_modules(node, module, graph)):  # once per statement
                out.setdefault(target, []).append(Site(rel, node.lineno))
        for sites in out.values():
            sites.sort(key=lambda s: s.line)  # the walk is not in source order
    return graph


@functools.lru_cache(maxsize=None)
def repo_graph() -> Graph:
    return build_graph(ROOT, FIRST_PARTY)


# --------------------------------------------------------------------------------------------------
# Cycles
# --------------------------------------------------------------------------------------------------


def strongly_connected_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm (iterative: no recursion limit to think about)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.targets(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.targets(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def shortest_cycle_through(graph: Graph, start: str, allowed: set[str]) -> list[str] | None:
    """BFS from `start` back to itself inside one component: a short, readable cycle."""
    parents: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(graph.targets(node)):
            if child not in allowed:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return list(reversed(path)) + [start]
            if child not in seen:
                seen.add(child)
                parents[child] = node
                queue.append(child)
    return None


def find_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles as closed chains [a, b, ..., a]: self-imports, plus for every strongly
    connected component of more than one module, the shortest cycle through each of its modules
    (deduplicated). Every module caught in a cycle appears in at least one reported chain, without
    enumerating the (possibly exponential) set of all cycles."""
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for module in sorted(graph.modules):
        if module in graph.targets(module):
            cycles.append([module, module])
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        members = set(component)
        for module in component:
            cycle = shortest_cycle_through(graph, module, members)
            if cycle is None:
                continue
            ring = cycle[:-1]
            turn = ring.index(min(ring))  # one rotation per cycle, whichever module it was found from
            key = tuple(ring[turn:] + ring[:turn])
            if key not in seen:
                seen.add(key)
                cycles.append(list(key) + [key[0]])
    return cycles


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    lines = ["  " + " -> ".join(cycle)]
    for src, dst in zip(cycle, cycle[1:]):
        sites = ", ".join(str(s) for s in graph.targets(src)[dst])
        lines.append(f"      {src} -> {dst}  ({sites})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Forbidden directions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Modules matching `sources` (and not `except_sources`) must not import modules matching
    `targets` (unless they match `except_targets`). All are dotted prefixes; modules that do not
    exist yet simply match nothing."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    reason: str
    except_sources: tuple[str, ...] = ()
    except_targets: tuple[str, ...] = ()

    def forbids(self, src: str, dst: str) -> bool:
        return (
            matches_any(src, self.sources)
            and not matches_any(src, self.except_sources)
            and matches_any(dst, self.targets)
            and not matches_any(dst, self.except_targets)
        )

    def __str__(self) -> str:
        src = " | ".join(self.sources) + (f" (except {' | '.join(self.except_sources)})" if self.except_sources else "")
        dst = " | ".join(self.targets) + (f" (except {' | '.join(self.except_targets)})" if self.except_targets else "")
        return f"{src}  must not import  {dst}"


RULES: tuple[Rule, ...] = (
    Rule(
        sources=("data_pipeline",),
        targets=("mae_scale", "launchers"),
        reason="the data pipeline stands alone: usable and testable without the trainer or a cluster",
    ),
    Rule(
        sources=("mae_scale.models",),
        targets=("mae_scale.train", "mae_scale.objectives", "mae_scale.cli", "mae_scale.tools", "launchers"),
        reason="models are a lower layer: the training loop, objectives and entry points build on them, "
        "not the reverse",
    ),
    Rule(
        sources=FIRST_PARTY,
        except_sources=("mae_scale.cli", "mae_scale.__main__"),
        targets=("mae_scale.cli",),
        reason="the CLI is the top layer (argument parsing, exit codes); launchers and library code call the "
        "training entry (mae_scale.train) directly",
    ),
    Rule(
        sources=("mae_scale.errors",),
        except_targets=("mae_scale.errors",),
        targets=FIRST_PARTY,
        reason="errors is a leaf every layer may import, so it can import no layer without creating a cycle",
    ),
    Rule(
        sources=("mae_scale",),
        except_sources=("mae_scale.cli", "mae_scale.tools"),
        targets=("mae_scale.tools",),
        reason="tools (bench, plan) stay off the training path; only the CLI dispatches to them",
    ),
    # Implied by the rule above, stated on its own so the training loop's rule reads directly.
    Rule(
        sources=("mae_scale.train",),
        targets=("mae_scale.tools",),
        reason="the training loop must not depend on benchmarking/planning tools",
    ),
)


def forbidden_edges(graph: Graph, rules: tuple[Rule, ...]) -> list[str]:
    found = []
    for rule in rules:
        hits = [
            f"      {src} -> {dst}  ({', '.join(str(s) for s in sites)})"
            for src in sorted(graph.edges)
            for dst, sites in sorted(graph.edges[src].items())
            if rule.forbids(src, dst)
        ]
        if hits:
            found.append(f"  rule: {rule}\n  why:  {rule.reason}\n" + "\n".join(hits))
    return found


# --------------------------------------------------------------------------------------------------
# Objective-name comparisons
# --------------------------------------------------------------------------------------------------

_COMPARISON_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def names_objective(node: ast.expr) -> bool:
    """A string constant naming an objective, or a tuple/list/set literal containing one."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in OBJECTIVE_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(names_objective(e) for e in node.elts)
    return False


def pattern_names_objective(pattern: ast.pattern) -> bool:
    """`case "mae":`, `case "simmim" | "beit":` (also nested in an `as` or an `|`)."""
    if isinstance(pattern, ast.MatchValue):
        return names_objective(pattern.value)
    if isinstance(pattern, ast.MatchOr):
        return any(pattern_names_objective(p) for p in pattern.patterns)
    if isinstance(pattern, ast.MatchAs) and pattern.pattern is not None:
        return pattern_names_objective(pattern.pattern)
    return False


def objective_comparisons(path: Path, rel: str) -> list[str]:
    """`x == "mae"`, `x in ("simmim", "beit")`, `case "beit":` ... in one file. Dict keys, defaults
    and plain assignments are fine: only branching on the name is."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(
                isinstance(op, _COMPARISON_OPS) and (names_objective(a) or names_objective(b))
                for op, a, b in zip(node.ops, sides, sides[1:])
            ):
                hits.append((node.lineno, "compare"))
        elif isinstance(node, ast.Match):
            for case in node.cases:
                if pattern_names_objective(case.pattern):
                    hits.append((case.pattern.lineno, "match"))
    return [f"  {rel}:{line}: {lines[line - 1].strip()}" for line, _ in sorted(set(hits))]


def objective_name_violations(graph: Graph, scan: tuple[str, ...], allowed: str) -> list[str]:
    found = []
    for module, path in sorted(graph.modules.items()):
        if matches_any(module, scan) and not matches(module, allowed):
            found += objective_comparisons(path, path.relative_to(graph.root).as_posix())
    return found


# --------------------------------------------------------------------------------------------------
# File length
# --------------------------------------------------------------------------------------------------


def long_files(graph: Graph, limit: int) -> list[str]:
    found = []
    for _, path in sorted(graph.modules.items()):
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > limit:
            found.append(f"  {path.relative_to(graph.root).as_posix()}: {count} lines")
    return found


# --------------------------------------------------------------------------------------------------
# The guards
# --------------------------------------------------------------------------------------------------


def test_no_import_cycles():
    graph = repo_graph()
    cycles = find_cycles(graph)
    assert not cycles, (
        "Import cycles between first-party modules (rule: dependencies point one way, "
        "cli -> train -> objectives/tasks -> models, checkpoint, tracking -> config, errors, distributed). "
        "A cycle means neither module can be understood, tested or moved without the other, and a "
        "function-level import that 'breaks' it only defers it. Break each by moving the shared piece "
        "down a layer:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)
    )


def test_no_forbidden_import_directions():
    found = forbidden_edges(repo_graph(), RULES)
    assert not found, (
        "Imports that point the wrong way between layers "
        "(cli -> train -> objectives/tasks -> models, checkpoint, tracking -> config, errors, distributed; "
        "data_pipeline stands alone):\n" + "\n\n".join(found)
    )


def test_objective_names_compared_only_in_objectives():
    found = objective_name_violations(repo_graph(), OBJECTIVE_SCAN_PACKAGES, OBJECTIVES_PACKAGE)
    assert not found, (
        f"Comparisons against an objective's name {sorted(OBJECTIVE_NAMES)} outside "
        f"{OBJECTIVES_PACKAGE.replace('.', '/')}/ (scanned: {', '.join(OBJECTIVE_SCAN_PACKAGES)}). "
        "Each such `if objective == ...` is a place a new objective must be taught about; ask the "
        "objective object instead (a method or attribute in mae_scale/objectives/):\n" + "\n".join(found)
    )


def test_no_file_over_max_lines():
    found = long_files(repo_graph(), MAX_LINES)
    assert not found, (
        f"Files over {MAX_LINES} lines in {', '.join(FIRST_PARTY)} (the standard is files of roughly "
        "150-500 lines; a longer file usually holds two concerns that want separate modules):\n"
        + "\n".join(found)
    )


# --------------------------------------------------------------------------------------------------
# Self-tests: each guard can fail (a guard that never fires protects nothing)
# --------------------------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@pytest.fixture
def synthetic(tmp_path: Path) -> Graph:
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # the cycle: a imports b inside a function, b imports a relatively
            "pkg/a.py": "def f():\n    import pkg.b\n",
            "pkg/b.py": "from . import a\n",
            # a TYPE_CHECKING-only import is no edge; its else branch is
            "pkg/c.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg import a\nelse:\n    import pkg.d\n"
            ),
            "pkg/d.py": "import os\nimport pkg.sub.nothing_here\n",  # nearest existing parent: pkg.sub
            "pkg/sub/__init__.py": "from . import e\n",  # an __init__ importing its own submodule
            "pkg/sub/e.py": "from ..d import x\nfrom .. import d as dd\nfrom ..cli_args import *\n",
            "pkg/cli.py": "",
            "pkg/cli_args.py": "",
            "other/__init__.py": "import pkg.cli_args\nfrom pkg import cli\n",
        },
    )
    return build_graph(tmp_path, ("pkg", "other", "missing"))


def test_self_graph_edges(synthetic: Graph):
    e = {src: set(dsts) for src, dsts in synthetic.edges.items()}
    assert e["pkg.a"] == {"pkg.b"}  # function-level import counts
    assert e["pkg.b"] == {"pkg.a"}  # `from . import a`: the module a (not the package it is read from)
    assert e["pkg.c"] == {"pkg.d"}  # TYPE_CHECKING body skipped, else branch kept
    assert e["pkg.d"] == {"pkg.sub"}  # stdlib ignored; missing module -> nearest existing parent
    assert e["pkg.sub"] == {"pkg.sub.e"}  # no self-edge from `from . import e` in the __init__
    assert e["pkg.sub.e"] == {"pkg.d", "pkg.cli_args"}  # `..d`, `from .. import d`, `..cli_args import *`
    assert e["other"] == {"pkg.cli_args", "pkg.cli"}
    assert synthetic.targets("pkg.sub.e")["pkg.d"] == [Site("pkg/sub/e.py", 1), Site("pkg/sub/e.py", 2)]


def test_self_cycle_found(synthetic: Graph):
    cycles = find_cycles(synthetic)
    assert ["pkg.a", "pkg.b", "pkg.a"] in cycles
    assert all("pkg.c" not in c for c in cycles)  # the TYPE_CHECKING import made no cycle
    text = describe_cycle(synthetic, ["pkg.a", "pkg.b", "pkg.a"])
    assert "pkg.a -> pkg.b -> pkg.a" in text and "pkg/a.py:2" in text and "pkg/b.py:1" in text


def test_self_cycle_self_import_and_clean_tree(tmp_path: Path):
    write_tree(tmp_path, {"q/__init__.py": "", "q/x.py": "import q.x\n", "q/y.py": "import q.x\n"})
    assert find_cycles(build_graph(tmp_path, ("q",))) == [["q.x", "q.x"]]
    (tmp_path / "q/x.py").write_text("", encoding="utf-8")
    assert find_cycles(build_graph(tmp_path, ("q",))) == []


def test_self_rules(synthetic: Graph):
    rule = Rule(sources=("pkg", "other"), except_sources=("pkg.cli",), targets=("pkg.cli",), reason="r")
    found = forbidden_edges(synthetic, (rule,))
    assert len(found) == 1 and "other -> pkg.cli  (other/__init__.py:2)" in found[0]
    assert "pkg.cli_args" not in found[0]  # prefix match is on dotted names
    assert forbidden_edges(synthetic, (Rule(sources=("nonexistent",), targets=("pkg",), reason="r"),)) == []


def test_self_objective_comparisons(tmp_path: Path):
    write_tree(
        tmp_path,
        {
            "m/__init__.py": "",
            "m/use.py": (
                "def f(o, aug='mae'):\n"  # default: fine
                "    table = {'mae': 1}\n"  # dict key: fine
                "    if o == 'mae':\n"  # 3
                "        pass\n"
                "    if o not in ('simmim', 'x'):\n"  # 5
                "        pass\n"
                "    match o:\n"
                "        case 'beit' | 'other':\n"  # 8
                "            pass\n"
                "    return o == 'vit'\n"  # not an objective
            ),
            "m/objectives/__init__.py": "def g(o):\n    return o == 'mae'\n",  # allowed here
        },
    )
    found = objective_name_violations(build_graph(tmp_path, ("m",)), ("m",), "m.objectives")
    assert [line.split(":")[1] for line in found] == ["3", "5", "8"], found


def test_self_long_files(tmp_path: Path):
    write_tree(tmp_path, {"p/__init__.py": "x = 1\n" * 5, "p/ok.py": "x = 1\n" * 4})
    assert long_files(build_graph(tmp_path, ("p",)), 4) == ["  p/__init__.py: 5 lines"]
