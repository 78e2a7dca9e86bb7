"""The package's layout rules, checked on its source (AST, no imports): one-way imports, no
reaching into another package's privates, functions that take values, a thin facade, and one
place that assembles a RoundPlan."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "fedjax_sim"
FACADE = PKG / "runs" / "simulation.py"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PKG.rglob("*.py"):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """Every fedjax_sim module ``name`` imports, at any level (function-level imports included),
  with the packages whose ``__init__`` such an import runs."""
  def resolve(dotted):
    while dotted and dotted not in modules:
      dotted = dotted.rpartition(".")[0]
    return dotted or None

  found = set()
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [resolve(a.name) for a in node.names if a.name.startswith("fedjax_sim")]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name if is_pkg else name.rpartition(".")[0]
        for _ in range(node.level - 1):
          pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
      if base.startswith("fedjax_sim"):
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else resolve(base)
                   for a in node.names]
    for t in filter(None, targets):
      parts = t.split(".")
      for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
        dotted = ".".join(parts[:i])
        if dotted in modules and dotted != name and not name.startswith(dotted + "."):
          found.add(dotted)
  return found


def test_no_import_cycle_among_package_modules():
  modules = _modules()
  graph = {m: _imports(m, p, modules) for m, p in modules.items()}
  cycles, state, stack = [], {}, []

  def visit(m):  # depth-first search; a grey node met again closes a cycle
    state[m] = "grey"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "grey":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "black"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_function_level_imports(tmp_path):
  pkg = tmp_path / "fedjax_sim"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from fedjax_sim import b\n")
  (pkg / "b.py").write_text("def f():\n  from fedjax_sim.a import x\n")
  modules = {"fedjax_sim": pkg / "__init__.py", "fedjax_sim.a": pkg / "a.py",
             "fedjax_sim.b": pkg / "b.py"}
  assert _imports("fedjax_sim.b", pkg / "b.py", modules) == {"fedjax_sim.a"}
  assert _imports("fedjax_sim.a", pkg / "a.py", modules) == {"fedjax_sim.b"}


def test_no_module_imports_a_private_name_of_another_package():
  """``_name`` belongs to its package: a module may import it from its own package or an
  ancestor (``fedjax_sim._validation`` from anywhere), never from a sibling package."""
  offenders = []
  for path in PKG.rglob("*.py"):
    own = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
      dotted = []
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedjax_sim"):
        dotted = [node.module.split(".") + [a.name] for a in node.names]
      elif isinstance(node, ast.Import):
        dotted = [a.name.split(".") for a in node.names if a.name.startswith("fedjax_sim")]
      for parts in dotted:
        for i, part in enumerate(parts):
          if part.startswith("_") and not part.startswith("__"):
            holder = parts[:i]
            if own[:len(holder)] != holder:
              offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {'.'.join(parts)}")
            break
  assert not offenders, offenders


SIMULATION_DATA = {"plan", "population", "algorithm", "sampler", "mesh", "population_on",
                   "system", "memory_budget", "max_cohort_size", "performance", "context",
                   "sort_by_size", "unbatched_single_client", "chunk_size"}


def test_no_function_outside_the_facade_reads_a_simulations_attributes():
  """Functions take values (a plan, a population, a state), not the Simulation: a parameter
  named ``sim`` / ``simulation`` may only have its methods called (the compatibility paths)."""
  offenders = []
  for path in PKG.rglob("*.py"):
    if path == FACADE:
      continue
    for fn in ast.walk(ast.parse(path.read_text())):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      a = fn.args
      names = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs} & {"sim", "simulation"}
      for node in ast.walk(fn):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in names and node.attr in SIMULATION_DATA):
          offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
  assert not offenders, offenders


def test_simulation_is_a_thin_facade():
  tree = ast.parse(FACADE.read_text())
  cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Simulation")
  assert cls.end_lineno - cls.lineno + 1 <= 250


def test_only_planning_assembles_a_round_plan():
  """``RoundPlan(...)`` is called in fedjax_sim/runs/planning.py only (``dataclasses.replace``
  of a plan is not an assembly: the plan already passed every check)."""
  calls = []
  for path in PKG.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and (
          (isinstance(node.func, ast.Name) and node.func.id == "RoundPlan")
          or (isinstance(node.func, ast.Attribute) and node.func.attr == "RoundPlan")):
        calls.append(str(path.relative_to(ROOT)))
  assert calls == ["fedjax_sim/runs/planning.py"], calls


def test_store_imports_nothing_of_the_package():
  modules = _modules()
  path = PKG / "runs" / "store.py"
  assert _imports("fedjax_sim.runs.store", path, modules) == set()
