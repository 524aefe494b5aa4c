"""The commands in the README and the docs pages run as written: every flag they pass exists.

Every fenced shell block of README.md, docs/*.md and experiments/tpu_vm.md is read as shell: continued lines
joined, comments dropped, ``[optional]`` brackets removed, pipelines and ``&&`` lists split, quoted strings
that hold a command (``gcloud ... --command='...'``) read too. In each command that starts one of the
project's tools (a ``msdfuse-*`` console script of setup.cfg, ``python -m msdfuse_jax.tools.NAME_main``, or
``python experiments/NAME.py``), every ``--flag`` must be one of the tool's flags (absl tools: the flags
their ``--helpfull`` lists, read once per tool, all tools side by side; argparse tools such as msdfuse-plot
and the experiments: the options their parser adds, read from the source, so torch need not be installed),
and every ``--config.a.b=...`` override must name a field
of the config that the command's ``--config=FILE:ARG`` builds. A wrong flag fails with its file, line and
flag. Also: the README's length and first block (the two set-up commands, which .ci/run runs), every
relative link (file and heading), and every test a sentence names (``tests/test_x.py::test_y``) exists.
"""

from __future__ import annotations

import ast
import configparser
import functools
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "experiments" / "tpu_vm.md"]
README_MAX_LINES = 250
SET_UP_COMMANDS = ["python3 -m pip install -c constraints.txt -e '.[test,tfds]'", "python3 -m pytest tests -n 2"]
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
# A flag line of absl's --helpfull: "  --name: help", "  --[no]name: help", "  -?,--[no]help: ...".
HELP_FLAG = re.compile(r"^\s+(?:-\S,)?--(\[no\])?([A-Za-z0-9_.-]+):")
HELPFULL_TIMEOUT_S = 300


def console_scripts() -> dict[str, str]:
  """setup.cfg's console scripts: {"msdfuse-train": "msdfuse_jax.tools.train_main", ...}."""
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  scripts = {}
  for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
    name, _, target = line.partition("=")
    scripts[name.strip()] = target.strip().split(":")[0]
  return scripts


def code_blocks(text: str) -> list[tuple[str, int, list[str]]]:
  """(language, line number of the block's first line, lines) of every fenced block of a markdown text."""
  blocks, current = [], None
  for number, line in enumerate(text.splitlines(), 1):
    fence = re.match(r"^\s*```\s*([\w+-]*)", line)
    if fence and current is None:
      current = (fence.group(1).lower(), number + 1, [])
    elif fence:
      blocks.append(current)
      current = None
    elif current is not None:
      current[2].append(line)
  return blocks


def shell_commands(text: str) -> list[tuple[int, list[str]]]:
  """(line number, words) of every simple command in the shell blocks of a markdown text."""
  commands = []
  for language, first, lines in code_blocks(text):
    if language not in SHELL_LANGUAGES:
      continue
    joined, start = "", None
    for number, line in enumerate(lines, first):
      start = number if start is None else start
      if line.rstrip().endswith("\\"):
        joined += line.rstrip()[:-1] + " "
        continue
      commands += [(start, words) for words in split_commands(joined + line)]
      joined, start = "", None
  return commands


def split_commands(line: str) -> list[list[str]]:
  """The simple commands of one shell line, their words unquoted, ``[...]`` brackets of optional parts
  removed; a quoted word that itself holds a command line is read as one too."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  lexer.commenters = "#"
  try:
    words = list(lexer)
  except ValueError:  # unbalanced quotes: not a command of ours
    return []
  commands, current = [], []
  for word in words:
    if word and set(word) <= set(";&|"):
      commands.append(current)
      current = []
    else:
      current.append(word.strip("[]"))
      if any(c.isspace() for c in word):
        commands += split_commands(word)
  commands.append(current)
  return [c for c in commands if c]


def tool_of(words: list[str]) -> tuple[str, str, list[str]] | None:
  """("module", module, its arguments) or ("script", path, its arguments) for a command that starts one of the
  project's tools (possibly after `nice -n 5`, `env`, ...), else None."""
  scripts = console_scripts()
  for i, word in enumerate(words):
    if word in scripts:
      return "module", scripts[word], words[i + 1:]
    if re.fullmatch(r"(.*/)?python[0-9.]*", word) and i + 1 < len(words):
      rest = words[i + 1:]
      if rest[0] == "-m" and len(rest) > 1 and rest[1].startswith("msdfuse_jax"):
        return "module", rest[1], rest[2:]
      if rest[0].startswith("experiments/") and rest[0].endswith(".py"):
        return "script", rest[0], rest[1:]
      return None
  return None


def module_path(module: str) -> pathlib.Path:
  return REPO / (module.replace(".", "/") + ".py")


def uses_argparse(path: pathlib.Path) -> bool:
  return "argparse.ArgumentParser(" in path.read_text()


@functools.lru_cache(maxsize=None)
def helpfull_of_every_tool() -> dict[str, subprocess.CompletedProcess]:
  """`python -m MODULE --helpfull` of every absl console script, started side by side (each imports jax)."""
  modules = sorted({m for m in console_scripts().values() if not uses_argparse(module_path(m))})
  running = {m: subprocess.Popen([sys.executable, "-m", m, "--helpfull"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO) for m in modules}
  done = {}
  for module, proc in running.items():
    out, err = proc.communicate(timeout=HELPFULL_TIMEOUT_S)
    done[module] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
  return done


@functools.lru_cache(maxsize=None)
def tool_flags(module: str) -> frozenset[str] | None:
  """The flags of a tool module: what its absl `--helpfull` lists (bool flags also as --noNAME), or the
  options its argparse parser adds; None when there is no such module."""
  path = module_path(module)
  if not path.is_file():
    return None
  if uses_argparse(path):
    return script_flags(str(path.relative_to(REPO)))
  done = helpfull_of_every_tool().get(module) or subprocess.run(
      [sys.executable, "-m", module, "--helpfull"], capture_output=True, text=True, cwd=REPO,
      timeout=HELPFULL_TIMEOUT_S, check=False)
  names = set()
  for line in done.stdout.splitlines():
    match = HELP_FLAG.match(line)
    if match:
      names.add(match.group(2))
      if match.group(1):
        names.add("no" + match.group(2))
  assert "helpfull" in names, f"python -m {module} --helpfull listed no flags:\n{done.stderr[-2000:]}"
  return frozenset(names)


@functools.lru_cache(maxsize=None)
def script_flags(path: str) -> frozenset[str] | None:
  """The --options an experiments/ script's argparse parser adds (read from its source); None when the
  file does not exist."""
  file = REPO / path
  if not file.is_file():
    return None
  names = set()
  for node in ast.walk(ast.parse(file.read_text())):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
      names |= {a.value[2:] for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")}
  return frozenset(names)


@functools.lru_cache(maxsize=None)
def load_config(spec: str):
  """The config that ``--config=PATH[:ARG]`` builds (PATH relative to the repository root)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_docs_config_{abs(hash(path))}", REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_field_error(spec: str | None, field: str, elided: bool) -> str | None:
  """Why ``--config.<field>`` does not name a field of the config `spec` builds; None when it does."""
  if spec is None:
    return None if elided else f"--config.{field} without --config=FILE:ARG in the same command"
  try:
    node = load_config(spec)
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec} does not build: {type(e).__name__}: {e}"
  for key in field.split("."):
    if not hasattr(node, "keys") or key not in node.keys():
      return f"--config.{field}: no field {key!r} in that config"
    node = node[key]
  return None


def flag_errors(text: str, name: str) -> list[str]:
  """"FILE:LINE: problem" for every flag of a tool command in `text` that the tool does not have."""
  errors = []
  for line, words in shell_commands(text):
    tool = tool_of(words)
    if tool is None:
      continue
    kind, target, args = tool
    known = tool_flags(target) if kind == "module" else script_flags(target)
    if known is None:
      errors.append(f"{name}:{line}: {target} does not exist")
      continue
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    elided = "..." in args
    for arg in args:
      if not arg.startswith("--") or arg == "--":
        continue
      flag = arg[2:].split("=", 1)[0]
      if kind == "module" and flag.startswith("config."):
        problem = config_field_error(spec, flag[len("config."):], elided)
        if problem:
          errors.append(f"{name}:{line}: {problem}")
      elif flag not in known:
        errors.append(f"{name}:{line}: {target} has no flag --{flag}")
  return errors


def test_readme_is_short_and_opens_with_the_two_set_up_commands():
  text = (REPO / "README.md").read_text()
  assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
  _, line, first = code_blocks(text)[0]
  commands = [c.split("#")[0].strip() for c in first if c.split("#")[0].strip()]
  assert commands == SET_UP_COMMANDS, f"README.md:{line}: the first code block is {commands}"


def test_ci_installs_as_the_readme_says():
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert [l for l in ci if l.startswith("python3 ")] == SET_UP_COMMANDS


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_flag_of_the_documented_commands_exists(doc):
  errors = flag_errors(doc.read_text(), str(doc.relative_to(REPO)))
  assert not errors, "\n".join(errors)


def test_a_wrong_flag_is_named_with_its_file_and_line():
  text = "\n".join([
      "Some text.", "",
      "```bash",
      "msdfuse-costs --config=configs/cifar.py:dataset=cifar10,model=msdnet_tiny --json=c.json \\",
      "    --no_such_flag   # a comment --not_a_flag",
      "nice -n 5 python3 experiments/merge_costs.py a.json [--csv=t.csv] --bogus && echo done",
      "msdfuse-costs --config=configs/cifar.py:dataset=cifar10,model=msdnet_tiny --config.model.nosuch=1",
      "msdfuse-costs --config=configs/cifar.py:dataset=cifar10,model=msdnet_tiny --config.model.growth_rate=4",
      "gcloud compute ssh x --command='cd repo && msdfuse-costs --wrong_inside_quotes'",
      "python experiments/no_such_script.py --x=1",
      "```", "",
      "```python",
      "msdfuse-costs --not_shell",
      "```"])
  assert flag_errors(text, "X.md") == [
      "X.md:4: msdfuse_jax.tools.costs_main has no flag --no_such_flag",
      "X.md:6: experiments/merge_costs.py has no flag --bogus",
      "X.md:7: --config.model.nosuch: no field 'nosuch' in that config",
      "X.md:9: msdfuse_jax.tools.costs_main has no flag --wrong_inside_quotes",
      "X.md:10: experiments/no_such_script.py does not exist",
  ]


def test_bench_vs_torch_without_its_reference_says_so_in_one_line(tmp_path):
  # With or without torch installed, an empty --reference_dir stops it before anything is measured.
  done = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_vs_torch.py"),
                         f"--reference_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 3, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  assert "torch is not installed" in lines[0] or "MSDNet-PyTorch" in lines[0]


def anchor(heading: str) -> str:
  """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc):
  errors = []
  for number, line in enumerate(doc.read_text().splitlines(), 1):
    for target in re.findall(r"\]\(([^)\s]+)\)", line):
      if re.match(r"^[a-z]+://", target):
        continue
      path, _, fragment = target.partition("#")
      file = (doc.parent / path).resolve() if path else doc
      if not file.exists():
        errors.append(f"{doc.relative_to(REPO)}:{number}: {target}: no such file")
      elif fragment and file.suffix == ".md":
        headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
        if fragment not in headings:
          errors.append(f"{doc.relative_to(REPO)}:{number}: {target}: no heading #{fragment}")
  assert not errors, "\n".join(errors)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_the_docs_name_exists(doc):
  # "`tests/test_x.py::test_y`" and a following "`::test_z`" (same file) back a sentence: a renamed or
  # deleted test must not leave the sentence pointing at nothing.
  errors, current = [], None
  for number, line in enumerate(doc.read_text().splitlines(), 1):
    for file, name in re.findall(r"`(?:(tests/test_\w+\.py))?::(test_\w+)`", line):
      current = file or current
      path = REPO / (current or "")
      defined = ({n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
                 if current and path.is_file() else set())
      if name not in defined:
        errors.append(f"{doc.relative_to(REPO)}:{number}: {current}::{name} is not a test there")
  assert not errors, "\n".join(errors)
