"""The architecture as tests: the import-linter contracts in pyproject.toml hold (and break on a
wrong import), storage is the only code that knows URL schemes or renames files, and the
library stays in short files and functions (ARCHITECTURE.md)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: grimp must build the graph of the tree in cwd, not of an installed copy
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", "pyproject.toml"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _modules(*folders: str):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def test_the_import_contracts_hold():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout
    kept = [line for line in r.stdout.splitlines() if line.endswith(" KEPT")]
    assert len(kept) == 2, r.stdout


CYCLES = """
import grimp
g = grimp.build_graph("hierarchy", include_external_packages=False)
found = set()
for m in sorted(g.modules):
    for imported in g.find_modules_directly_imported_by(m):
        try:
            if g.chain_exists(importer=imported, imported=m):
                found.add(" <-> ".join(sorted((m, imported))))
        except ValueError:  # a package and one of its own modules
            pass
print("\\n".join(sorted(found)))
"""


def _cycles(root: Path) -> list:
    """Pairs of modules that import each other, directly or through others (imports inside
    functions included)."""
    r = subprocess.run([sys.executable, "-c", CYCLES], cwd=root, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_no_module_imports_back_what_imports_it(tmp_path):
    assert _cycles(ROOT) == []
    # the check sees a circle where there is one
    shutil.copytree(ROOT / "hierarchy", tmp_path / "hierarchy",
                    ignore=shutil.ignore_patterns("__pycache__", "static"))
    with open(tmp_path / "hierarchy" / "contracts" / "errors.py", "a") as fh:
        fh.write("\nfrom hierarchy.contracts import storage  # noqa\n")
    assert "hierarchy.contracts.errors" in _cycles(tmp_path)


@pytest.mark.parametrize("where, line, broken, edge", [
    # a contract importing a stage: the import that would run up the layers
    ("hierarchy/contracts/taxonomy.py", "from hierarchy.infer import combine",
     "hierarchy's layers", "hierarchy.contracts.taxonomy -> hierarchy.infer.combine"),
    # two stages of the same layer know nothing of each other
    ("hierarchy/ingest/split.py", "from hierarchy.train import spec",
     "hierarchy's layers", "hierarchy.ingest.split -> hierarchy.train.spec"),
    # an entry point doing a stage's work itself
    ("jobs/train.py", "from hierarchy.contracts import storage",
     "jobs/ are thin entry points", "jobs.train -> hierarchy.contracts.storage"),
    ("jobs/predict.py", "import pyspark",
     "jobs/ are thin entry points", "jobs.predict -> pyspark"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, where, line, broken, edge):
    for name in ("hierarchy", "jobs"):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / where, "a") as fh:
        fh.write(f"\n{line}  # noqa\n")
    r = _lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 broken" in r.stdout
    out = r.stdout.split("Broken contracts", 1)[1]
    assert broken in out and edge in out, r.stdout


# Code that may rename a file: storage (every dataset, model and table write, atomically) and
# the JVM's class-data archive, a file of the virtualenv the JVM itself writes (spark_cds.py).
# The review page's guard parses HTTP origins (urlsplit), which are no storage location.
ALLOWED = {"hierarchy/contracts/storage.py": None, "hierarchy/spark_cds.py": {"os.replace"},
           # an HTTP request's Origin (scheme, host, port), not where files are
           "hierarchy/serve/guard.py": {"urlsplit", "scheme"}}
RENAMES = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}
URL_PARSERS = {"urlparse", "urlsplit", "url_to_fs", "get_filesystem_class", "split_protocol",
               "strip_protocol"}


def _is_scheme(node) -> bool:
    """A string constant that spells a URL scheme: "://", "file:", "s3://", "hdfs:"..."""
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return False
    v = node.value
    if v.startswith("jdbc:"):
        return False  # the metastore's database: a JDBC URL, not where files are
    return "://" in v and v.endswith("://") or (v.endswith(":") and v[:-1].isalnum()) or \
        v == "://"


def _scheme_or_rename_uses(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = node.func.attr
            if isinstance(owner, ast.Name) and (owner.id, name) in RENAMES:
                yield node.lineno, f"{owner.id}.{name}"
            elif name in ("rename", "mv", "move"):
                yield node.lineno, f".{name}()"
            elif name in ("startswith", "removeprefix", "replace", "split", "partition") and \
                    node.args and _is_scheme(node.args[0]):
                yield node.lineno, f".{name}({node.args[0].value!r})"
        if isinstance(node, ast.Compare) and _is_scheme(node.left) and \
                any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            yield node.lineno, f"{node.left.value!r} in ..."
        if isinstance(node, (ast.Name, ast.Attribute)):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if ident in URL_PARSERS or ident == "scheme":
                yield node.lineno, ident


def test_only_storage_tests_a_url_scheme_or_renames_a_file():
    found = []
    for path, tree in _modules("hierarchy", "jobs"):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED.get(rel, set())
        if allowed is None:
            continue
        found += [f"{rel}:{line}: {what}" for line, what in _scheme_or_rename_uses(tree)
                  if what not in allowed]
    assert not found, "ask hierarchy.contracts.storage instead:\n" + "\n".join(found)


def test_the_check_sees_what_it_looks_for():
    # the scan above passes on an empty list too: it must find each kind of use it forbids
    src = ("import os, shutil\nfrom urllib.parse import urlparse\n"
           "def f(u, fs):\n"
           "    os.replace(u, u)\n    shutil.move(u, u)\n    fs.mv(u, u)\n"
           "    if '://' in u: pass\n    u.startswith('s3://')\n"
           "    u.replace('file://', '')\n    return urlparse(u).scheme\n")
    whats = [what for _, what in _scheme_or_rename_uses(ast.parse(src))]
    assert whats.count("os.replace") == 1 and "shutil.move" in whats and ".mv()" in whats
    assert "'://' in ..." in whats and ".startswith('s3://')" in whats
    assert ".replace('file://')" in whats and "urlparse" in whats and "scheme" in whats
    assert not list(_scheme_or_rename_uses(ast.parse(
        "def g(u):\n    u.startswith('jdbc:')\n"
        "    return f'jdbc:postgresql://{u}' + u.replace('a', 'b')\n")))


def test_only_the_contracts_swap_folders_in():
    # a commit (a staged folder swapped in) is spelled by the contract that owns the folder
    # (Dataset.stage / replacing, storage.single_part_file), never by a stage's own calls
    found = []
    for path, tree in _modules("hierarchy", "jobs"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("hierarchy/contracts/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "storage" \
                    and node.func.attr in ("replace", "move", "staged_folder"):
                found.append(f"{rel}:{node.lineno}: storage.{node.func.attr}")
    assert not found, "\n".join(found)


MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_the_library_stays_in_short_files_and_functions():
    long_files, long_functions = [], []
    for path, tree in _modules("hierarchy", "jobs"):
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{rel}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)
