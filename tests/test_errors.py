"""`videonsa.errors.first_line`: what a one-line error quotes of another library's message."""

from videonsa.errors import first_line


def test_first_line_of_a_message_or_the_type_when_there_is_none():
    assert first_line(ValueError("bad header\n  File ...\nmore")) == "bad header"
    assert first_line(ValueError("\n  padded first line  \n")) == "padded first line"
    assert first_line(OSError()) == "OSError"
    assert first_line(KeyError("")) == "''"  # KeyError quotes its key
