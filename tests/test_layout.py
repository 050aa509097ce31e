"""The package's shape: imports flow one way (no cycles, counting function-level imports too)."""
import ast
import pathlib

import pgbatch

ROOT = pathlib.Path(pgbatch.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = ("pgbatch",) + path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """pgbatch module → the pgbatch modules it imports anywhere in its body (module or function level).
  `from a.b import c` counts as importing a.b.c when that is a module, else a.b."""
  modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in modules:  # `import pgbatch.x.y` of a name inside a module: the module
          t = t.rpartition(".")[0]
        if t and t != name and t.startswith("pgbatch"):
          deps.add(t)
    graph[name] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_import_graph_has_no_cycles():
  graph = import_graph()
  assert "pgbatch.schema" in graph and "pgbatch.checkpoints.npz" in graph  # the walk sees the package
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
