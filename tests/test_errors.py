"""The exception tree: its drawing, its summaries and the exit-code table built from it."""

from __future__ import annotations

import re

import pytest

from hypeman_images import errors
from hypeman_images.errors import HypemanError, exit_codes

CLASSES = [
    value
    for value in vars(errors).values()
    if isinstance(value, type) and issubclass(value, HypemanError)
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_the_drawing_in_the_docstring_shows_each_class_with_its_codes(
    cls: type[HypemanError],
) -> None:
    doc = errors.__doc__ or ""
    if cls is HypemanError:
        assert doc.count(cls.__name__) >= 1
        return
    # One entry runs from its "── Name" to the next "──"; it may wrap a line.
    entry = re.search(rf"── {cls.__name__} [^─]*?\(exit (\d+), HTTP (\d+)\)", doc)
    assert entry, f"{cls.__name__} is not in the tree, or lacks its (exit N, HTTP M)"
    assert (int(entry[1]), int(entry[2])) == (cls.exit_code, cls.http_status)


def test_the_drawing_names_no_class_that_is_gone() -> None:
    drawn = set(re.findall(r"── (\w+)", errors.__doc__ or ""))
    assert drawn == {cls.__name__ for cls in CLASSES} - {"HypemanError"}


@pytest.mark.parametrize("cls", CLASSES[1:], ids=lambda cls: cls.__name__)
def test_a_class_with_its_own_exit_code_has_its_own_summary(cls: type[HypemanError]) -> None:
    parent = cls.__mro__[1]
    assert issubclass(parent, HypemanError)
    if cls.exit_code != parent.exit_code:
        assert "summary" in vars(cls), f"{cls.__name__} would show {parent.__name__}'s summary"


def test_the_table_has_each_code_once_in_order_with_every_summary() -> None:
    table = exit_codes()
    codes = [code for code, _ in table]
    assert codes == sorted(set(codes))
    meanings = dict(table)
    for cls in CLASSES:
        assert cls.summary in meanings[cls.exit_code].split(", ")
    assert meanings[errors.EXIT_OK] == "ok"
    assert meanings[errors.EXIT_INTERRUPTED] == "interrupted"
    assert (
        meanings[7] == "unsupported manifest, bad layer, bad disk artifact, safety limit exceeded"
    )
