"""The package's shape: modules, the cflowad imports between them (lazy ones included,
as tests/test_layers.py reads them), files over 600 lines, and the largest JS module.

    python benchmarks/structure.py src/cflowad
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_layers import import_edges, modules


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "src/cflowad")
    found = modules(source)
    edges = {(a, b) for a, b in import_edges(found) if a != b}
    sizes = sorted(
        (
            (len(p.read_text().splitlines()), str(p.relative_to(source.parent)))
            for p in source.rglob("*.py")
        ),
        reverse=True,
    )
    scripts = sorted(
        ((len(p.read_text().splitlines()), p.name) for p in source.rglob("*.js")), reverse=True
    )
    print(f"modules {len(found)}, imports between them {len(edges)}")
    print(f"over 600 lines: {[s for s in sizes if s[0] > 600]}; largest: {sizes[0]}")
    print(f"JS files {len(scripts)}, the largest {scripts[0] if scripts else None}")


if __name__ == "__main__":
    main()
