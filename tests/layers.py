#!/usr/bin/env python3
"""The arrows allowed between the crate's top-level modules (docs/development.md draws them).

Reads every `crate::<module>` path in src/ (imports and paths in code, not comments) and fails
when a module uses one it may not: a layer below may never use a layer above, and modules of
one layer do not use each other. Within a folder, no two sibling files (mod.rs aside, whose
children implement its types) may use each other in a circle. Run by `make test`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# What each module may use, lowest layer first.
ALLOWED: dict[str, set[str]] = {
    "counter": set(),
    "state": set(),
    "request": {"state"},
    "config": {"request"},
    "occupancy": {"state", "request"},
    "upstream": {"occupancy", "request", "state", "counter"},
    "admission": {"upstream", "occupancy", "config", "request", "state", "counter"},
    "host": {"admission", "upstream", "occupancy", "config", "request", "state", "counter"},
}
# Test helpers any test may use.
TEST_ONLY = {"test_support"}

PATH = re.compile(r"\bcrate::(\w+)(?:::(\w+))?")
SIBLING = re.compile(r"\b(?:super|self)::(\w+)")


def code_lines(path: Path) -> list[str]:
    """The file's lines without comments (doc links name modules without using them)."""
    return [line.split("//", 1)[0] for line in path.read_text().splitlines()]


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    top = rel.parts[0]
    return top[:-3] if top.endswith(".rs") else top


def main() -> int:
    errors: list[str] = []
    siblings: dict[str, dict[str, set[str]]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        module = module_of(path)
        if module in ("lib", *TEST_ONLY) or module.endswith("_tests"):
            continue
        if module not in ALLOWED:
            errors.append(f"{path.relative_to(SRC)}: module {module!r} is not on the map")
            continue
        folder = path.parent if path.parent != SRC else None
        for number, line in enumerate(code_lines(path), 1):
            for used, inner in PATH.findall(line):
                if used in TEST_ONLY or used == module:
                    if folder is not None and used == module and inner:
                        siblings.setdefault(module, {}).setdefault(path.stem, set()).add(inner)
                    continue
                if used not in ALLOWED[module]:
                    errors.append(f"{path.relative_to(SRC)}:{number}: {module} may not use {used}")
            if folder is not None and path.stem != "mod":
                for inner in SIBLING.findall(line):
                    if (folder / f"{inner}.rs").exists():
                        siblings.setdefault(module, {}).setdefault(path.stem, set()).add(inner)
    for module, graph in siblings.items():
        graph = {f: {u for u in used if u != "mod" and u != f} for f, used in graph.items() if f != "mod"}
        for start in graph:
            stack, seen = [(start, [start])], set()
            while stack:
                node, trail = stack.pop()
                for nxt in graph.get(node, ()):
                    if nxt == start:
                        errors.append(f"{module}/: import circle {' -> '.join(trail + [start])}")
                    elif nxt not in seen:
                        seen.add(nxt)
                        stack.append((nxt, trail + [nxt]))
    for error in dict.fromkeys(errors):
        print(error, file=sys.stderr)
    if errors:
        return 1
    print(f"layers: {len(ALLOWED)} modules, every arrow allowed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
