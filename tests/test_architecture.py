"""The shape ARCHITECTURE.md promises, checked from the source: which part may import which, no import
circle, and parts small enough to read (no function over 120 lines, no module over 450)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lora_scripts"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_scripts"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lora_scripts"))
    return found


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def test_forbidden_arrows():
    rules = [  # (importer prefix, imported prefix): arrows ARCHITECTURE.md does not allow
        ("lora_scripts.train.llm", "lora_scripts.train.sd"), ("lora_scripts.train.sd", "lora_scripts.train.llm"),
        ("lora_scripts.export", "lora_scripts.train"), ("lora_scripts.data", "lora_scripts.train"),
        ("lora_scripts.models", "lora_scripts.train"), ("lora_scripts.demo", "lora_scripts.cli"),
        ("lora_scripts.data", "lora_scripts.label"),
        # the UI runs training as a process of its own, never in the server; nothing below it knows it
        ("lora_scripts.ui", "lora_scripts.train"), ("lora_scripts.train", "lora_scripts.ui"),
        ("lora_scripts.models", "lora_scripts.ui"), ("lora_scripts.export", "lora_scripts.ui"),
    ]
    broken = [f"{name} imports {target}" for name, path in MODULES.items() for target in imports(path, False)
              for src, dst in rules if name.startswith(src) and target.startswith(dst)]
    assert not broken, broken


def test_no_import_circle_at_module_level():
    graph = {name: {t for t in imports(path, True) if t in MODULES and t != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_functions_and_modules_stay_readable():
    long_functions, long_modules = [], []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 450:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 120:
                long_functions.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_modules and not long_functions, long_modules + long_functions
