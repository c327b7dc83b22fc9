"""Who imports whom inside kdedge, read from the source with ``ast`` (nothing is imported).

Usage:
    python scripts/import_graph.py            # the package table (markdown) and any circles
    python scripts/import_graph.py --modules  # module-level circles and upward arrows in detail
    python scripts/import_graph.py --check    # exit 1 on a circle or an unlisted upward arrow
    python scripts/import_graph.py --table    # the table alone, as docs/architecture.md shows it

Every ``import``/``from ... import`` counts, at module level or inside a function (a lazy
import is still a dependency). Imports under ``if TYPE_CHECKING:`` do not count.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kdedge"

# Layers from the bottom up. A package may import from its own layer or any lower one; an
# import from a higher layer is an upward arrow and must be listed in ALLOWED_UP.
LAYERS: list[tuple[str, ...]] = [
    ("kdedge.io", "kdedge.yaml_io", "kdedge.cpu", "kdedge.registry", "kdedge.device"),
    ("kdedge.bundle",),
    ("kdedge.targets", "kdedge.preprocess"),
    ("kdedge.runtime",),
    ("kdedge.profile",),
    ("kdedge.models",),
    ("kdedge.train", "kdedge.config"),
    ("kdedge.export",),
    ("kdedge.serve",),
    ("kdedge.cli", "kdedge.gpu_check"),
    ("kdedge",),
]

# (importer module prefix, imported module prefix): why the arrow may run up.
ALLOWED_UP: dict[tuple[str, str], str] = {
    ("kdedge.device", "kdedge.profile.modes"):
        "on a Jetson the current power mode names the profile setting; reading it needs the nvpmodel "
        "tool's parser, which lives with the code that switches modes (imported only when "
        "/etc/nvpmodel.conf exists)",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The kdedge modules that ``path`` imports (resolved to existing modules)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                for sub in child.orelse:  # type: ignore[attr-defined]
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.add(mod)
                for alias in child.names:
                    found.add(f"{mod}.{alias.name}")
            visit(child)

    visit(tree)
    resolved = set()
    for mod in found:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        if mod and mod.startswith("kdedge") and mod != name:
            resolved.add(mod)
    # A package's own __init__ is imported whenever a submodule is; not an arrow of its own.
    return {m for m in resolved if not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def package_of(module: str) -> str:
    """The unit of the table: kdedge.X for top-level modules, kdedge.X for packages."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    best, index = -1, len(LAYERS) - 1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    arrows = []
    for src, dsts in sorted(edges.items()):
        for dst in sorted(dsts):
            if layer_of(dst) > layer_of(src) and package_of(dst) != package_of(src):
                arrows.append((src, dst))
    return arrows


def allowed(src: str, dst: str) -> bool:
    return any(
        (src == a or src.startswith(a + ".")) and (dst == b or dst.startswith(b + "."))
        for a, b in ALLOWED_UP
    )


def table(edges: dict[str, set[str]]) -> str:
    packages: dict[str, set[str]] = {}
    for src, dsts in edges.items():
        p = package_of(src)
        packages.setdefault(p, set())
        for dst in dsts:
            if package_of(dst) != p:
                packages[p].add(package_of(dst))
    order = sorted(packages, key=lambda p: (layer_of(p), p))
    lines = ["| package | imports (kdedge only) |", "|---|---|"]
    for p in order:
        deps = sorted(packages[p], key=lambda d: (layer_of(d), d))
        lines.append(f"| `{p}` | {', '.join(f'`{d}`' for d in deps) or '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="module-level detail")
    parser.add_argument("--check", action="store_true", help="exit 1 on a circle or bad arrow")
    parser.add_argument("--table", action="store_true", help="print the package table only (docs/architecture.md)")
    args = parser.parse_args(argv)
    edges = graph()
    circles = cycles(edges)
    arrows = upward(edges)
    bad = [(s, d) for s, d in arrows if not allowed(s, d)]
    print(table(edges))
    if args.table:
        return 0
    print()
    print(f"import circles: {len(circles)}")
    for comp in circles:
        print("  " + " <-> ".join(comp))
    print(f"upward arrows: {len(arrows)} ({len(bad)} not allowed)")
    for s, d in arrows:
        why = next((w for (a, b), w in ALLOWED_UP.items()
                    if (s == a or s.startswith(a + ".")) and (d == b or d.startswith(b + "."))), None)
        print(f"  {s} -> {d}" + (f"  ({why})" if why else "  NOT ALLOWED"))
    if args.modules:
        for src, dsts in sorted(edges.items()):
            print(f"{src}: {', '.join(sorted(dsts))}")
    return 1 if args.check and (circles or bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
