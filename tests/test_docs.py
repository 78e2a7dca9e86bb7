"""The README and the docs pages: their Python blocks run as written, the site's generated pages
are complete, and every public factory documents what it returns."""

import importlib.util
import inspect
import os
import re

import pytest
import yaml

import fedjax_sim as fs
from fedjax_sim import config as cfglib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(f for f in os.listdir(DOCS) if f.endswith(".md"))
SKIP = "<!-- skip -->"
#: Pages whose blocks compile several simulations or run privacy calibrations (~30 s or more of
#: CPU each on 2 cores): they run in the slow tier (`pytest -m slow`).
SLOW_PAGES = ("privacy.md", "scale-out.md", "aggregation.md", "finetuning.md", "dp-ftrl.md")


def python_blocks(path):
  """The fenced ```python blocks of a markdown file, minus those right after ``<!-- skip -->``."""
  text = open(path).read()
  blocks = []
  for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    before = text[:m.start()].rstrip().splitlines()
    if before and before[-1].strip() == SKIP:
      continue
    blocks.append(m.group(1))
  return blocks


def run_blocks(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # whatever a block writes lands in tmp_path
  namespace = {"__name__": "__docs__"}
  for i, block in enumerate(python_blocks(path)):
    code = compile(block, f"{os.path.basename(path)}[python block {i}]", "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own examples
  return namespace


def test_python_blocks_are_found_and_skipped(tmp_path):
  page = tmp_path / "p.md"
  page.write_text("a\n```python\nx = 1\n```\n<!-- skip -->\n\n```python\nraise SystemExit\n```\n"
                  "```bash\nls\n```\n```python\ny = 2\n```\n")
  assert python_blocks(str(page)) == ["x = 1\n", "y = 2\n"]


def test_readme_example_runs_and_learns(tmp_path, monkeypatch, capsys):
  ns = run_blocks(os.path.join(ROOT, "README.md"), tmp_path, monkeypatch)
  assert "test accuracy after 40 rounds" in capsys.readouterr().out
  # 40 rounds of DP-FedAvg (z = 0.3) on digits: well above chance (0.1).
  assert ns["metrics"]["eval_accuracy"][-1] > 0.8
  assert int(ns["state"].round) == 40


def test_readme_is_a_front_door():
  text = open(os.path.join(ROOT, "README.md")).read()
  assert len(text.splitlines()) <= 250
  assert 'pip install -e ".[test]" && pytest' in text and "fedjax-sim demo" in text
  assert "## Speed against peers" in text and "docs/benchmarks.md" in text
  # The runnable example is ~20 lines and is the README's only Python block.
  (example,) = python_blocks(os.path.join(ROOT, "README.md"))
  assert len(example.strip().splitlines()) <= 22


@pytest.mark.parametrize("page", [
    pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p
    for p in PAGES if python_blocks(os.path.join(DOCS, p))])
def test_docs_page_blocks_run(page, tmp_path, monkeypatch):
  run_blocks(os.path.join(DOCS, page), tmp_path, monkeypatch)


def _hooks():
  spec = importlib.util.spec_from_file_location("mkdocs_hooks",
                                                os.path.join(ROOT, "tools", "mkdocs_hooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_reference_lists_every_key_and_valid_name():
  import dataclasses

  text = _hooks().config_reference()
  for section in dataclasses.fields(cfglib.Config):
    assert f"### `{section.name}`" in text
    for f in dataclasses.fields(cfglib._NESTED[(cfglib.Config, section.name)]):
      assert f"| `{f.name}` |" in text, (section.name, f.name)
  for names in (cfglib.DATASETS, cfglib.MODELS, cfglib.ALGORITHMS, cfglib.PARTITIONS,
                cfglib.SERVER_OPTIMIZERS):
    for name in names:
      assert f"`{name}`" in text
  # No unescaped | inside a table cell (it would split the row).
  rows = [line for line in text.splitlines() if line.startswith("| `")]
  assert rows and all(line.count("|") == 5 for line in rows)


def test_cli_reference_covers_every_subcommand():
  text = _hooks().cli_reference()
  for cmd in ("demo", "run", "plot", "privacy", "data describe"):
    assert f"usage: fedjax-sim {cmd}" in text


def test_nav_pages_exist_or_are_pending():
  cfg = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")).read().replace("!!python", "#"))

  def pages(nav):
    for item in nav:
      value = next(iter(item.values())) if isinstance(item, dict) else item
      yield from (pages(value) if isinstance(value, list) else [value])

  listed = set(pages(cfg["nav"]))
  pending = set(_hooks().PENDING)
  assert set(PAGES) <= listed, set(PAGES) - listed  # every page is reachable
  assert all(p in PAGES or p in pending for p in listed)
  for path in _hooks().FIGURES:
    assert os.path.exists(os.path.join(ROOT, path)), path


#: Return annotations of the functions that build the library's pieces (the optax-style factories).
FACTORY_RETURNS = {"Aggregator", "Process", "Stage", "AggregationProcess", "Reducer",
                   "Algorithm", "LossFn", "ApplyFn", "PoissonSampler", "UniformSampler",
                   "_PerClient", "_Omniscient", "Rotation", "LocalTrainer",
                   "optax.GradientTransformation"}


def _public_factories():
  """The public functions of the public modules that build a stage, process, algorithm,
  sampler, attack, loss or optimizer (by their return annotation)."""
  modules = [fs.aggregators, fs.algorithms, fs.attacks, fs.sampling, fs.partition, fs.systems,
             fs.privacy, fs.models, fs.evaluation, fs.unsupervised, fs.ssl, fs.sharding,
             fs.datasets, fs.checkpoint, fs.plots, fs.zoo]
  found = {"fedjax_sim.sweep": fs.sweep, "fedjax_sim.make_client_update": fs.make_client_update}
  for module in modules:
    for name, obj in vars(module).items():
      if name.startswith("_") or not inspect.isfunction(obj):
        continue
      ret = str(inspect.signature(obj).return_annotation)
      if obj.__module__.startswith("fedjax_sim") and (
          ret in FACTORY_RETURNS or ret.startswith("Callable")):
        found[f"{obj.__module__}.{obj.__qualname__}"] = obj
  return found


def test_every_public_factory_documents_returns():
  factories = _public_factories()
  assert len(factories) > 60
  missing = sorted(name for name, f in factories.items()
                   if "Returns:" not in (inspect.getdoc(f) or ""))
  assert not missing, f"{len(missing)} public functions without a Returns: section: {missing}"


def test_doc_links_stay_inside_the_site():
  """A relative link to a repository file outside docs/ is a warning that fails the strict build
  (mkdocs publishes only docs/); name such files as code instead."""
  outside = []
  for page in PAGES:
    text = open(os.path.join(DOCS, page)).read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:|#", target):
        continue
      path = os.path.normpath(os.path.join(DOCS, target.split("#")[0]))
      if not path.startswith(DOCS + os.sep):
        outside.append(f"{page}: {target}")
  assert not outside, outside


def test_ci_builds_the_site_strictly_and_not_quietly():
  # `mkdocs build --strict --quiet` passes whatever the warnings: --quiet drops them before
  # --strict counts them.
  lines = [ln for ln in open(os.path.join(ROOT, ".ci", "run")) if "mkdocs build" in ln
           and not ln.lstrip().startswith("#")]
  assert lines and all("--strict" in ln for ln in lines)
  assert not any(re.search(r"\s(--quiet|-q)\b", ln) for ln in lines), lines


# Slow (default tier budget): a full mkdocs build; .ci/run also runs mkdocs build --strict.
@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
  pytest.importorskip("mkdocs")
  pytest.importorskip("mkdocstrings")
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  warnings_ = [ln for ln in out.stderr.splitlines() if ln.startswith("WARNING")]
  assert out.returncode == 0 and not warnings_, warnings_ or out.stderr[-2000:]
