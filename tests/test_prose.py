"""Prose cannot drift from code: every name of our code that a docstring, a comment or the
Markdown docs (ARCHITECTURE.md, README.md, bench/README.md) mention must still be there.

Three kinds of reference are checked, all resolved over the source with ``ast`` (nothing is
imported, so the test is quick and needs neither TensorFlow nor Spark):

- a dotted name starting with ``hierarchy.`` (``hierarchy.infer.scoring.BatchScorer.probs``,
  ``:func:`~hierarchy.contracts.model.resize_for_model```): the longest prefix that is a module
  or package of the tree, then each remaining part defined in it (a module-level def, class,
  assignment or import, an import of ours followed; a class's method, attribute, field or
  ``self.`` attribute, or one of its bases' in the same module);
- in a Python file, a Sphinx role without the package's name (``:func:`score```): defined in
  that module or one of its classes, imported into it, a builtin or another installed package;
- a path to a Python file (``infer/scoring.py``, ``hierarchy/cli.py``,
  ``train/experts.py:train_experts``, ```infer/scoring.py`'s `BatchScorer.probs```): relative to
  the repository, to one of its top folders, or to the mentioning file's folder (``dist/`` is
  ``make dist``'s copy); a bare file name must be some file of the tree; with a name, the name
  must be defined in that file.

URLs are left out, and so are file names that are not ours (``IGNORED``).
"""

import ast
import builtins
import importlib.util
import io
import re
import tokenize
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("hierarchy", "jobs", "bench", "tools")
DOCS = ("ARCHITECTURE.md", "README.md", "bench/README.md")
# where a relative path may start: the repository and its top folders
PATH_BASES = ("", "hierarchy", "tests", "bench", "tools", "jobs", "ops")
# file names the prose mentions that are other projects' (pyspark's and py4j's version.py)
IGNORED = frozenset({"version.py"})

URL = re.compile(r"[A-Za-z][\w+.-]*://\S*")
DOTTED = re.compile(r"(?<![\w./-])(hierarchy(?:\.[A-Za-z_]\w*)+)")
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
PATH = re.compile(r"(?<![\w./<>-])((?:[\w.-]+/)*\w+\.py)(?!\w)(?::(" + _NAME + "))?")
# a Sphinx role naming a target relative to the module it is written in (:func:`score`)
ROLE = re.compile(r":(?:py:)?(?:func|meth|class|data|attr|const|exc|obj|mod):`~?\.?(" + _NAME
                  + ")`")
POSSESSIVE = re.compile(r"`((?:[\w.-]+/)*\w+\.py)`'s `(" + _NAME + ")`")


# --- where the prose is ---------------------------------------------------------------------

def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of prose in ``path``: every line of a Markdown file;
    the comments and docstrings (any string standing as a statement) of a Python file."""
    text = path.read_text()
    if path.suffix != ".py":
        yield from enumerate(text.splitlines(), 1)
        return
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text, str(path))):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            for n in range(node.lineno, node.end_lineno + 1):
                yield n, lines[n - 1]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def prose_files() -> list[Path]:
    files = [p for folder in CODE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    return files + [ROOT / doc for doc in DOCS]


# --- what the code defines ------------------------------------------------------------------

@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _module_file(parts: tuple[str, ...]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of a scope, into if/try/with blocks but not into defs or classes."""
    for stmt in body:
        yield stmt
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if inner and not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.ClassDef)):
                yield from _statements(inner)
        for handler in getattr(stmt, "handlers", ()):
            yield from _statements(handler.body)


def _targets(stmt: ast.stmt) -> Iterator[ast.expr]:
    if isinstance(stmt, ast.Assign):
        for target in stmt.targets:
            yield from ast.walk(target)
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        yield stmt.target


def _find(body: list[ast.stmt], name: str) -> ast.AST | None:
    """What ``name`` is in a module's or a class's body: a def, a class, an assignment or an
    import (the alias)."""
    for stmt in _statements(body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if stmt.name == name:
                return stmt
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                if (alias.asname or alias.name.split(".")[0]) == name:
                    return stmt
        elif any(isinstance(t, ast.Name) and t.id == name for t in _targets(stmt)):
            return stmt
    return None


def _class_member(cls: ast.ClassDef, name: str, module: ast.Module) -> ast.AST | None:
    """A method, attribute or field of ``cls``, an attribute its methods set on ``self``, or a
    member of one of its bases defined in the same module."""
    found = _find(cls.body, name)
    if found is not None:
        return found
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id == "self"
                and node.attr == name):
            return node
    for base in cls.bases:
        parent = _find(module.body, base.id) if isinstance(base, ast.Name) else None
        if isinstance(parent, ast.ClassDef) and parent is not cls:
            found = _class_member(parent, name, module)
            if found is not None:
                return found
    return None


def _imported(node: ast.Import | ast.ImportFrom, name: str) -> str:
    """The dotted name an import binds to ``name`` (``np`` -> ``numpy``)."""
    alias = next(a for a in node.names if (a.asname or a.name.split(".")[0]) == name)
    if isinstance(node, ast.ImportFrom):
        return f"{node.module}.{alias.name}"
    return alias.name if alias.asname else name


def _defined(module: ast.Module, names: list[str], node: ast.AST | None = None) -> bool:
    """Whether ``names`` (``["BatchScorer", "probs"]``) is defined in ``module`` (or, given
    ``node``, in that class or function of it)."""
    node = module if node is None else node
    for i, name in enumerate(names):
        if isinstance(node, ast.Module):
            node = _find(node.body, name)
        elif isinstance(node, ast.ClassDef):
            node = _class_member(node, name, module)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node = next((s for s in _statements(node.body) if isinstance(
                s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and s.name == name),
                None)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            # imported: followed to where it is defined if it is ours, else not ours to check
            source = _imported(node, names[i - 1])
            return (source.partition(".")[0] != "hierarchy"
                    or dotted_resolves(".".join([source, *names[i:]])))
        else:
            return False  # an attribute of a value: nothing says what it has
        if node is None:
            return False
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hierarchy."):
        return dotted_resolves(_imported(node, names[-1]))
    return True


def relative_resolves(target: str, module_path: Path) -> bool:
    """A Sphinx target without our package's name: defined in the module (or a class of it,
    for a method or attribute), imported into it, a builtin or another installed package."""
    module, names = _tree(module_path), target.split(".")
    if _defined(module, names):
        return True
    if any(_defined(module, names, cls) for cls in ast.walk(module)
           if isinstance(cls, ast.ClassDef)):
        return True
    return hasattr(builtins, names[0]) or importlib.util.find_spec(names[0]) is not None


def dotted_resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(tuple(parts[:cut]))
        if path is not None:
            return _defined(_tree(path), parts[cut:])
    return False


def _python_files() -> dict[str, list[Path]]:
    """Every Python file of the tree by its name."""
    by_name: dict[str, list[Path]] = {}
    for folder in PATH_BASES[1:]:
        for path in (ROOT / folder).rglob("*.py"):
            by_name.setdefault(path.name, []).append(path)
    return by_name


def path_resolves(ref: str, name: str | None, mentioned_in: Path,
                  by_name: dict[str, list[Path]]) -> bool:
    ref = ref.removeprefix("./").removeprefix("dist/")  # `make dist` copies jobs/ into dist/
    if "/" in ref:
        bases = [ROOT / b for b in PATH_BASES] + [mentioned_in.parent]
        candidates = [base / ref for base in bases if (base / ref).is_file()]
    else:
        candidates = by_name.get(ref, [])
    if not candidates:
        return False
    return name is None or any(_defined(_tree(p), name.split(".")) for p in candidates)


# --- the check ------------------------------------------------------------------------------

def references(text: str, following: str = "") -> Iterator[tuple[str, str, str | None]]:
    """(kind, reference, name) of each reference to our code in a line of prose (a
    ```path.py`'s `name``` may end on the ``following`` line)."""
    text = URL.sub(" ", text)
    for m in DOTTED.finditer(text):
        yield "name", m.group(1), None
    for m in ROLE.finditer(text):
        if not m.group(1).startswith("hierarchy."):
            yield "role", m.group(1), None
    named = set()
    for m in POSSESSIVE.finditer(text + " " + URL.sub(" ", following).lstrip("# ")):
        if m.start() < len(text):
            named.add(m.start(1))
            yield "path", m.group(1), m.group(2)
    for m in PATH.finditer(text):
        if m.start(1) not in named and Path(m.group(1)).name not in IGNORED:
            yield "path", m.group(1), m.group(2)


def stale(lines: Iterable[tuple[Path, int, str]]) -> tuple[list[str], int]:
    """The references in ``lines`` ((file, line number, text)) that name nothing, as
    ``file:line: reference``, and how many references were checked."""
    by_name = _python_files()
    found, checked = [], 0
    lines = sorted(lines, key=lambda line: (str(line[0]), line[1]))
    for i, (path, lineno, text) in enumerate(lines):
        after = lines[i + 1] if i + 1 < len(lines) else (None, 0, "")
        following = after[2] if after[:2] == (path, lineno + 1) else ""
        for kind, ref, name in references(text, following):
            checked += 1
            ok = (dotted_resolves(ref) if kind == "name"
                  else relative_resolves(ref, path) if kind == "role"
                  else path_resolves(ref, name, path, by_name))
            if not ok:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{where}:{lineno}: {ref}" + (f":{name}" if name else ""))
    return found, checked


def _all_prose(files: Iterable[Path]) -> Iterator[tuple[Path, int, str]]:
    for path in files:
        for lineno, text in prose_lines(path):
            yield path, lineno, text


def test_every_reference_in_the_prose_names_code_that_exists():
    found, checked = stale(_all_prose(prose_files()))
    assert checked > 300, f"only {checked} references found: is the extraction broken?"
    assert not found, f"{len(found)} of {checked} references name nothing:\n" + "\n".join(found)


def test_the_check_reports_a_stale_name_and_a_stale_path(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        '"""Scores with :func:`~hierarchy.infer.nothere.func`, as :func:`f` and :func:`g`."""\n'
        "import os  # see infer/nothere.py:x and `hierarchy/cli.py`'s `NO_SUCH`\n"
        "\n"
        "\n"
        "def f():\n"
        '    """Still `hierarchy.contracts.taxonomy.Taxonomy` and `infer/columns.py`."""\n'
        '    return "hierarchy.not.prose", os.sep  # but contracts/model.py:no_such_name\n')
    notes = tmp_path / "notes.md"
    notes.write_text("Give `infer/scoring.py`'s\n`BatchScorer.nothere` its arithmetic, not\n"
                     "https://example.org/hierarchy.infer.gone/infer/gone.py (a URL).\n")
    found, checked = stale(_all_prose([planted, notes]))
    assert checked == 9
    assert found == [f"{notes}:1: infer/scoring.py:BatchScorer.nothere",
                     f"{planted}:1: hierarchy.infer.nothere.func",
                     f"{planted}:1: g",
                     f"{planted}:2: hierarchy/cli.py:NO_SUCH",
                     f"{planted}:2: infer/nothere.py:x",
                     f"{planted}:7: contracts/model.py:no_such_name"]
