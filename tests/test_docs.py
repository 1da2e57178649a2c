"""The README's "Where things live" section names only files and folders that exist, and lists
every source module: a newcomer can check it against the tree."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = [p for p in ROOT.rglob("*") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _layout() -> str:
    section = (ROOT / "README.md").read_text().split("## Where things live", 1)[1]
    return section.split("```", 2)[1]


def test_every_file_and_folder_named_exists():
    files = {p.name for p in TREE if p.is_file()}
    folders = {p.relative_to(ROOT).as_posix() for p in TREE if p.is_dir()}
    folder_names = {f.rsplit("/", 1)[-1] for f in folders}
    missing = []
    for name in set(re.findall(r"[\w]+\.(?:py|yaml|md|ipynb)\b", _layout())):
        if name not in files:
            missing.append(name)
    for name in set(re.findall(r"(?<![\w.])([\w/]+)/(?=[\s)]|$)", _layout(), re.M)):
        if name not in folders and name.split("/")[-1] not in folder_names:
            missing.append(name + "/")
    assert not missing, sorted(missing)


def test_every_source_module_is_listed():
    listed = set(re.findall(r"[\w]+\.py", _layout()))
    modules = {p.name for p in (ROOT / "src/odise_pl").rglob("*.py") if p.name != "__init__.py"}
    assert modules <= listed, sorted(modules - listed)


def test_library_code_never_imports_a_command_line_module():
    import ast

    cli = {"odise_pl.train", "odise_pl.eval", "odise_pl.demo", "odise_pl.app", "odise_pl.predict"}
    offenders = []
    for path in (ROOT / "src/odise_pl").rglob("*.py"):
        module = "odise_pl." + ".".join(path.relative_to(ROOT / "src/odise_pl").with_suffix("").parts)
        if module in cli:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{module} imports {n}" for n in names if n in cli]
    assert not offenders, offenders


def test_every_departure_has_its_tag_and_every_tag_its_row():
    """README's departures table: each row's key is a `# DIVERGES(key)` tag in src/ or conf/ and
    each tag a row; an untagged `DIVERGES` (no key) is refused."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("**Departures from the official code.**", 1)[1].split("\n\n", 2)[1]
    rows = set(re.findall(r"^\| `([\w-]+)` \|", table, re.M))
    tags, bare = set(), []
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "DIVERGES" in line:
                found = re.findall(r"DIVERGES\(([\w-]+)\)", line)
                tags |= set(found)
                if not found:
                    bare.append(f"{path.relative_to(ROOT)}:{n}")
    assert len(rows) >= 15, rows
    assert not bare, f"DIVERGES without a key: {bare}"
    assert rows - tags == set(), f"rows without a tag in the code: {sorted(rows - tags)}"
    assert tags - rows == set(), f"tags without a row in the README: {sorted(tags - rows)}"
