"""The quickstart's quality check: the first function of a sample, and whether it parses."""

from gptjax.evals.python_syntax import first_function, parse_rate


def test_a_method_ends_at_the_next_decorator_and_is_dedented():
    sample = "def find(self):\n        return self.f\n    @property\n    def x(self):\n"
    assert first_function(sample) == "def find(self):\n        return self.f"


def test_a_signature_over_lines_and_a_top_level_end():
    sample = "def f(a,\n      b):\n    if a:\n\n        return b\n    return a\nx = 1\n"
    assert (
        first_function(sample) == "def f(a,\n      b):\n    if a:\n\n        return b\n    return a"
    )


def test_no_function_or_an_unfinished_one_is_none():
    assert first_function("x = 1\n") is None
    assert first_function("def f(a):\n    return a") is None  # the sample stopped in the body
    assert first_function("def f(a):\nx = 1\n") is None  # no body


def test_parse_rate_counts_whole_valid_functions_over_all_samples():
    samples = [
        "def ok(a):\n    return a + 1\n\nprint(1)\n",
        "def bad(a):\n    return (a +\nprint(1)\n",  # parses? no: the bracket never closes
        "def cut(a):\n    return a",  # unfinished
        "def method(self):\n        yield self\n    def next(self):\n",
    ]
    r = parse_rate(samples)
    assert r == {"samples": 4, "complete": 3, "parsed": 2, "rate": 0.5}
