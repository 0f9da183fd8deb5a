#!/usr/bin/env python3
"""Lists the top-level modules of src/ that depend on each other in a cycle, read from their
`crate::` paths (test modules left out). Prints each module's dependencies; exits 1 on a cycle.

    scripts/module_cycles.py
"""
import collections
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "src"
deps = collections.defaultdict(set)
for path in ROOT.rglob("*.rs"):
    top = path.relative_to(ROOT).with_suffix("").parts[0]
    if top in ("lib", "main"):
        continue
    code = path.read_text().split("#[cfg(test)]")[0]
    for m in re.finditer(r"crate::([a-z_]+)", code):
        if m.group(1) != top:
            deps[top].add(m.group(1))

# Tarjan's strongly connected components: a component of more than one module is a cycle.
index, low, stack, on, cycles = {}, {}, [], set(), []
def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in deps.get(v, ()):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        component = []
        while True:
            w = stack.pop()
            on.discard(w)
            component.append(w)
            if w == v:
                break
        if len(component) > 1:
            cycles.append(sorted(component))
for v in list(deps):
    if v not in index:
        visit(v)
for module in sorted(deps):
    print(f"{module} -> {', '.join(sorted(deps[module]))}")
if cycles:
    print("cycles:", cycles)
    sys.exit(1)
print("no cycle between the top-level modules")
