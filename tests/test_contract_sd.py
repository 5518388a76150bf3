"""The method contract (tests/contract.py) on the sd family: every row trains, saves, loads into the plain
diffusers pipeline and changes its image, trains only what it should, caches without changing the loss, and resumes
after a SIGKILL to the weights of an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.contract import check_row, make_bases, rows_of

ROWS = rows_of("sd")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return make_bases(tmp_path_factory.mktemp("contract-sd"), "sd")


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_method_contract(row, bases):
    check_row(row, bases)
