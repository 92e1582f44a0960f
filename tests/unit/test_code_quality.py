"""The house rules that tools can check: ruff over the tree, mypy --strict over the package.

Run in the suite (not only in an editor) so that CI refuses a change that breaks them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy", "--cache-dir", "/dev/null")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles_between_stages() -> None:
    """The data's path runs one way: the datapath and metadata never import the enricher or the demo."""
    offenders = []
    for path in (REPO / "otel_kzt").rglob("*.py"):
        text = path.read_text()
        stage = path.relative_to(REPO / "otel_kzt").parts[0]
        if stage in {"agent", "k8s"} and ("otel_kzt.enricher" in text or "otel_kzt.demo" in text):
            offenders.append(str(path))
        if stage == "enricher" and ("otel_kzt.agent" in text or "otel_kzt.demo" in text):
            offenders.append(str(path))
    assert offenders == []


_E = "otel_kzt.enricher."
# Inside the enricher, the pipeline's parts (receivers -> processing -> state -> exporters) and what each
# may not import: nothing below reaches up to a transport, the core or the wiring (service, command).
_ENRICHER_FORBIDDEN = {
    "receivers": (_E + "service", _E + "command", _E + "exporters.otlp"),
    "processing": (_E + "receivers", _E + "service", _E + "command", _E + "exporters.otlp"),
    "state": (
        _E + "receivers",
        _E + "service",
        _E + "command",
        _E + "exporters.otlp",
        _E + "processing.core",
        _E + "processing.points",
    ),
    "exporters": (_E + "receivers", _E + "service", _E + "command", _E + "processing.core", _E + "state"),
}


def test_enricher_parts_import_one_way() -> None:
    """The enricher's folders follow the Collector's pipeline, and its imports run one way along it."""
    root = REPO / "otel_kzt" / "enricher"
    parts = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert parts == set(_ENRICHER_FORBIDDEN)
    offenders = []
    for part, forbidden in _ENRICHER_FORBIDDEN.items():
        for path in (root / part).rglob("*.py"):
            imports = [
                line.split()[1]
                for line in path.read_text().splitlines()
                if line.lstrip().startswith(("from otel_kzt.", "import otel_kzt."))
            ]
            offenders += [f"{path.relative_to(REPO)}: {m}" for m in imports if m.startswith(forbidden)]
    assert offenders == []


def _module_files() -> dict[str, Path]:
    """Every module of the package, the benchmarks, the deploy tooling and the tests, by dotted name."""
    found = {}
    for root in ("otel_kzt", "bench", "deploy", "tests"):
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if "node_modules" in parts:
                continue
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository's modules `name` imports, at the top or inside a function (a lazy import closes a
    circle as well), not those under `if TYPE_CHECKING:` (never run). `from pkg import sub` is `pkg.sub`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            subs = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(subs or {base})
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles() -> None:
    """No module reaches itself through its imports (the house rule; bench/enricher.py and
    bench/enricher_cluster.py once did, through a lazy import)."""
    modules = _module_files()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


_DATAPATH = "otel_kzt.agent.datapath"
_MODE_MODULES = ("netfilter", "tc", "tclinks", "cgroup", "modes", "mode", "modeswitch", "auto", "loader")


def test_the_rest_of_the_agent_does_not_know_the_modes() -> None:
    """Issue 13: outside otel_kzt/agent/datapath/ the agent reads flows and starts the datapath through the
    package (`otel_kzt.agent.datapath`, flows.py), never through a mode's module or the loader."""
    modules = _module_files()
    forbidden = {f"{_DATAPATH}.{m}" for m in _MODE_MODULES}
    assert forbidden <= modules.keys()  # the names above are the package's modules
    offenders = sorted(
        f"{name}: {dep}"
        for name, path in modules.items()
        if name.startswith("otel_kzt.") and not name.startswith(_DATAPATH)
        for dep in _imported(name, path, modules) & forbidden
    )
    assert offenders == []
