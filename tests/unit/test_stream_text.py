"""Streamed text holds back what could still become a stop sequence (``legion.engine.llama``)."""

import pytest

from legion.engine.llama import _stop_prefix_len


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [
        ("Paris is", ["\n\n"], 0),
        ("Paris\n", ["\n\n"], 1),  # may be the start of a blank line
        ("Paris\nQ", ["\n\n", "\nQuestion:"], 2),
        ("Paris\nQues", ["\nQuestion:", "\nQ:"], 5),
        ("Paris\nQx", ["\nQuestion:", "\nQ:"], 0),
        ("", ["\n\n"], 0),
        ("abc", [], 0),
    ],
)
def test_the_held_back_tail_is_the_longest_start_of_a_stop(text, stops, held):
    assert _stop_prefix_len(text, stops) == held
