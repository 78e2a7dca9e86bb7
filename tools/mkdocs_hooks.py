"""mkdocs hooks: the CLI / config-key reference generated from ``fedjax_sim/config.py``.

``docs/cli.md`` holds two markers that are replaced at build time: ``<!-- config-keys -->`` by a
table per config section (key, type, default, valid values), read from the dataclasses and the
``validate`` checks of :mod:`fedjax_sim.config`, and ``<!-- cli-help -->`` by the ``--help``
text of every ``fedjax-sim`` subcommand. The figures in ``FIGURES`` are published under ``img/``
without copying them into ``docs/``. Nav entries whose page lives on another branch and has
not landed yet (``PENDING``) are dropped instead of failing the strict build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys

#: The checkout's root: the hooks import ``fedjax_sim`` from it (put first on sys.path in
#: :func:`on_config`; mkdocs restores sys.path after loading this file), so ``mkdocs build`` (the
#: script, whose sys.path lacks the working directory) documents this checkout's code even where
#: the package is not installed, or is installed from another checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PENDING = ("benchmarks.md", "runs.md", "finetuning.md", "migration.md")
#: Figures kept beside the code that wrote them, published under ``img/`` on the site.
FIGURES = ("examples/dp_fedavg_privacy_utility.png", "examples/robustness_compression.png",
           "examples/emnist_fedavg.png", "examples/heterogeneity.png",
           "examples/shakespeare_fedavg.png", "benchmarks/results/cpu-2core/throughput.png")
SUBCOMMANDS = (("demo",), ("run",), ("plot",), ("privacy",), ("data", "describe"))


def _constraints() -> dict[str, str]:
  """``section.key -> rule`` from ``config.RULES`` (the one rule each key is checked by)."""
  from fedjax_sim import config

  rules = {key: rule.text for key, rule in config.RULES.items()}
  for key, note in config.KEY_NOTES.items():
    rules[key] = f"{rules[key]}; {note}" if key in rules else note
  return rules


def config_reference() -> str:
  """Markdown tables of every config key, generated from ``fedjax_sim.config``."""
  from fedjax_sim import config

  rules = _constraints()
  out = []
  for section in dataclasses.fields(config.Config):
    cls = config._NESTED[(config.Config, section.name)]
    out += [f"### `{section.name}`", "", f"`{cls.__name__}`", "",
            "| key | type | default | valid values |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
      default = (f.default_factory() if f.default is dataclasses.MISSING else f.default)
      default = "null" if default is None else default
      rule = rules.get(f"{section.name}.{f.name}", "")
      kind = str(f.type).replace(" | ", " or ")  # a bare | would split the table cell
      out.append(f"| `{f.name}` | `{kind}` | `{default}` | {rule} |")
    out.append("")
  return "\n".join(out)


def cli_reference() -> str:
  """The ``--help`` text of every ``fedjax-sim`` subcommand."""
  from fedjax_sim import cli

  out = []
  old = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = "100"
  try:
    for cmd in SUBCOMMANDS:
      buf = io.StringIO()
      with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        cli.main([*cmd, "--help"])
      out += [f"### `fedjax-sim {' '.join(cmd)}`", "", "```text", buf.getvalue().rstrip(),
              "```", ""]
  finally:
    if old is None:
      del os.environ["COLUMNS"]
    else:
      os.environ["COLUMNS"] = old
  return "\n".join(out)


def on_config(config, **kwargs):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  docs = config["docs_dir"]

  def keep(item):
    if isinstance(item, dict):
      (title, value), = item.items()
      if isinstance(value, list):
        value = [v for v in value if keep(v)]
        item[title] = value
        return bool(value)
      return keep(value)
    return not (item in PENDING and not os.path.exists(os.path.join(docs, item)))

  config["nav"] = [item for item in config["nav"] if keep(item)]
  return config


def on_files(files, config, **kwargs):
  from mkdocs.structure.files import File

  root = os.path.dirname(os.path.abspath(config["config_file_path"]))
  for path in FIGURES:
    files.append(File.generated(config, "img/" + os.path.basename(path),
                                abs_src_path=os.path.join(root, path)))
  return files


def on_page_markdown(markdown, page, **kwargs):
  if "<!-- config-keys -->" in markdown:
    markdown = markdown.replace("<!-- config-keys -->", config_reference())
  if "<!-- cli-help -->" in markdown:
    markdown = markdown.replace("<!-- cli-help -->", cli_reference())
  return markdown
