"""The stand-in's rules table (``fake_orb/RULES.md``): every rule names an Orb
source and tests that exist; every assumption says why and names tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE = REPO_ROOT / "fake_orb" / "RULES.md"
TESTS = Path(__file__).resolve().parent
TEST_REF = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def _rows(section: str) -> list[list[str]]:
    text = TABLE.read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    rows = []
    for line in body.splitlines():
        if not line.startswith("| ") or line.startswith(("| ID ", "|---")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows.append(cells)
    return rows


def _test_names(filename: str) -> set[str]:
    path = TESTS / filename
    if not path.is_file():
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


RULES = _rows("Rules")
ASSUMPTIONS = _rows("Assumptions")


def test_the_table_is_there_and_ids_are_unique() -> None:
    assert len(RULES) >= 30 and len(ASSUMPTIONS) >= 10
    ids = [r[0] for r in RULES + ASSUMPTIONS]
    assert len(ids) == len(set(ids)), "duplicate IDs"
    assert [r[0] for r in RULES] == [f"R{i}" for i in range(1, len(RULES) + 1)]
    assert [r[0] for r in ASSUMPTIONS] == [f"A{i}" for i in range(1, len(ASSUMPTIONS) + 1)]


@pytest.mark.parametrize("row", RULES + ASSUMPTIONS, ids=lambda r: r[0])
def test_every_row_names_a_source_and_existing_tests(row: list[str]) -> None:
    assert len(row) == 4, f"{row[0]}: expected 4 cells, got {len(row)}"
    ident, text, source, tests = row
    assert text, f"{ident}: no rule text"
    assert source, f"{ident}: no source / reason"
    if ident.startswith("R"):
        # An Orb document: a spec path, a client file, or a documentation page title.
        assert re.search(r"\bspec `(paths|components)\.|\bclient `orb/|\bdocs \"", source), (
            f"{ident}: the source names no spec path, client file or docs page: {source}"
        )
    refs = TEST_REF.findall(tests)
    assert refs, f"{ident}: names no test"
    assert len(refs) == tests.count("::"), f"{ident}: a test reference is malformed: {tests}"
    for filename, name in refs:
        assert name in _test_names(filename), f"{ident}: {filename}::{name} does not exist"


def test_every_new_rule_test_is_in_the_table() -> None:
    cited = {ref for row in RULES + ASSUMPTIONS for ref in TEST_REF.findall(row[3])}
    for filename in ("test_orb_rules.py", "test_invoices.py"):
        missing = {
            name for name in _test_names(filename) if (filename, name) not in cited
        } - {"test_cli_seeds_invoices_and_rules"}
        assert not missing, f"{filename}: tests no rule row names: {sorted(missing)}"
