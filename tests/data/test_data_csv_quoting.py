"""Malformed CSV quoting is an error naming the line, never rows silently merged into one."""

from __future__ import annotations

import pytest

from consistentee.data import DataError, load_file
from consistentee.data.files import check_csv_quoting, read_csv_records


def test_an_unterminated_quote_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\ngood,positive\n"a great film,positive\nawful,negative\n')
    with pytest.raises(DataError, match=r"d.csv: line 3: a quoted field is never closed"):
        load_file(path)
    with pytest.raises(DataError, match="line 3"):
        read_csv_records(path.read_text(), "d.csv")


def test_quoted_fields_with_newlines_and_doubled_quotes_are_fine():
    text = 'text,label\n"two\nlines",a\n"say ""hi""",b\nplain,c\n'
    check_csv_quoting(text, "ok.csv")
    assert read_csv_records(text, "ok.csv") == [{"text": "two\nlines", "label": "a"},
                                                {"text": 'say "hi"', "label": "b"},
                                                {"text": "plain", "label": "c"}]


def test_tsv_and_ragged_rows():
    assert read_csv_records("text\tlabel\na\tb\n", "t.tsv", "\t") == [{"text": "a", "label": "b"}]
    with pytest.raises(DataError, match="t.tsv: line 2: a quoted field is never closed"):
        read_csv_records('text\tlabel\n"a\tb\n', "t.tsv", "\t")
    with pytest.raises(DataError, match="line 3 has 3 fields, the header has 2"):
        read_csv_records("a,b\n1,2\n1,2,3\n", "r.csv")
    assert read_csv_records("a,b\n1\n", "short.csv") == [{"a": "1", "b": None}]  # reported as missing later


def test_a_field_over_128_kib_is_read():
    big = "x" * 300_000
    assert read_csv_records(f"text\n{big}\n", "big.csv") == [{"text": big}]
