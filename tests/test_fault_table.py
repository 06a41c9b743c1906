"""docs/faults.md's fault table is exactly the one generated from the @pytest.mark.fault tests."""

from __future__ import annotations

from tests.fault_table import FAULTS_DOC, FIELDS, doc_table, faults, table


def test_doc_fault_table_matches_the_fault_tests():
    rows = faults()
    assert len(rows) >= 20
    for row in rows:
        assert all(row.get(field, "").strip() for field in FIELDS), f"{row['test']}: fault marker needs {FIELDS}"
        assert not any("|" in row[field] for field in FIELDS), f"{row['test']}: '|' breaks the Markdown table"
    assert doc_table(FAULTS_DOC.read_text(encoding="utf-8")) == table(rows), \
        "docs/faults.md's fault table is stale: run python tests/fault_table.py --write"
