import numpy as np
import pytest

from hierarchy.contracts.taxonomy import Taxonomy, TaxonomyError

HEADER = "category_id,category_level1,category_level2,category_level3\n"
SMALL = HEADER + (
    "30,B,B2,leaf x\n"
    "10,A,A1,leaf a\n"
    "20,A,A2,leaf b\n"
    "40,B,B1,leaf a\n"  # same level-3 name under another parent: keyed by category_id
)


def tax(text: str) -> Taxonomy:
    return Taxonomy.from_csv_bytes(text.encode(), source="t.csv")


def test_real_table_has_the_competition_shape(real_categories):
    t = Taxonomy.from_csv(str(real_categories))
    assert (t.n_l1, t.n_l2, t.n_l3) == (49, 483, 5270)
    assert list(t.category_ids) == sorted(t.category_ids)
    assert sum(len(b) for b in t.branches().values()) == 5270
    assert t.fingerprint == Taxonomy.from_csv(str(real_categories)).fingerprint


def test_ids_are_contiguous_and_stable():
    t = tax(SMALL)
    assert t.category_ids == (10, 20, 30, 40)
    assert t.l1_names == ("A", "B") and t.l2_names == ("A1", "A2", "B1", "B2")
    assert t.levels_of_category(40) == (1, 2, 3)
    assert t.names_of_l3(3) == ("B", "B1", "leaf a")
    assert np.array_equal(t.branch(1), [2, 3])
    assert np.array_equal(t.local_of_l3(), [0, 1, 0, 1])
    with pytest.raises(KeyError):
        t.l3_of_category(99)


def test_fingerprint_ignores_row_order_but_not_content():
    lines = SMALL.splitlines(keepends=True)
    shuffled = tax(lines[0] + "".join(reversed(lines[1:])))
    assert shuffled.fingerprint == tax(SMALL).fingerprint
    assert tax(SMALL.replace("leaf x", "leaf y")).fingerprint != tax(SMALL).fingerprint


def test_json_round_trip():
    t = tax(SMALL)
    back = Taxonomy.from_json(t.to_json())
    assert back.fingerprint == t.fingerprint and back.category_ids == t.category_ids


@pytest.mark.parametrize("text, expected", [
    ("category_id,category_level1,category_level3\n1,a,b\n", "t.csv:1: missing column(s) "
                                                               "category_level2"),
    (HEADER + "1,A,A1,x\n2,A,A1,y\n1,A,A1,x\n", "t.csv:4: duplicate category_id 1 "
                                                 "(first on line 2)"),
    (HEADER + "1,A,A1,x\n1,B,B1,x\n", "t.csv:3: leaf category_id 1 under two parents"),
    (HEADER + "1,A,,x\n", "t.csv:2: empty category_level2 for category_id 1"),
    (HEADER + "abc,A,A1,x\n", "t.csv:2: category_id 'abc' is not an integer"),
    (HEADER + "1,A\n", "t.csv:2: 2 field(s), expected 4"),
    (HEADER, "t.csv: no categories after the header"),
    ("", "t.csv: empty file"),
])
def test_malformed_tables_are_refused_with_line_and_reason(text, expected):
    with pytest.raises(TaxonomyError) as err:
        tax(text)
    assert expected in str(err.value)
