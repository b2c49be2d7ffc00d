"""jaxreward/rewards/registry.py: the (prompts, completions, columns) signature,
make's keyword checking, call's shape / exception / NaN checks, combine's arithmetic."""
import json

import numpy as np
import pytest

from jaxreward import errors, rewards
from jaxreward.rewards import registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_CHECKS", dict(registry._CHECKS))


def test_builtin_members_take_columns_and_work_without_them():
    assert {"length", "distinct_words", "exact_match", "format_regex", "length_target"} <= set(rewards.names())
    # columns defaults to none (the callers in experiments/ pass two lists).
    np.testing.assert_allclose(rewards.call(rewards.get("length"), ["p", "q"], ["abc", ""]), [0.03, 0.0])
    got = rewards.call(rewards.get("distinct_words"), ["p"] * 3, ["a b a b", "x y z", "  "], {"answer": [1, 2, 3]})
    np.testing.assert_allclose(got, [0.5, 1.0, 0.0])
    assert got.dtype == np.float32
    # An empty completion: length 0, no word.
    assert rewards.call(rewards.make("length"), ["p"], [""]).tolist() == [0.0]
    assert rewards.call(rewards.make("distinct_words"), ["p"], [""]).tolist() == [0.0]


def test_register_checks_name_and_signature(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("length")(lambda p, c, cols: np.zeros(len(c)))
    with pytest.raises(ValueError, match=r"'two_args' must accept \(prompts, completions, columns\)"):
        rewards.register("two_args")(lambda p, c: np.zeros(len(c)))

    def needs_hparam(prompts, completions, columns, *, scale):
        return np.zeros(len(completions))
    with pytest.raises(ValueError, match="hyper-parameters as keywords with defaults"):
        rewards.register("needs_hparam")(needs_hparam)
    assert "two_args" not in rewards.names() and "needs_hparam" not in rewards.names()


def test_make_binds_kwargs_and_refuses_unknown_ones(scratch_registry):
    @rewards.register("scaled_length")
    def scaled_length(prompts, completions, columns, *, scale=1.0, offset=0.0):
        return np.asarray([scale * len(c) + offset for c in completions], np.float32)

    assert rewards.hyperparameters("scaled_length") == {"scale": 1.0, "offset": 0.0}
    fn = rewards.make("scaled_length", scale=2.0)
    assert fn.name == "scaled_length" and fn.kwargs == {"scale": 2.0} and repr(fn) == "scaled_length(scale=2.0)"
    assert rewards.call(fn, ["p", "p"], ["ab", "abcd"]).tolist() == [4.0, 8.0]
    with pytest.raises(ValueError, match=r"reward 'scaled_length' has no parameter 'scal'; "
                                         r"its parameters: scale, offset"):
        rewards.make("scaled_length", scal=2.0)
    with pytest.raises(ValueError, match=r"reward 'length' has no parameter 'target'; its parameters: \(none\)"):
        rewards.make("length", target=3)
    with pytest.raises(KeyError, match="registered: .*exact_match"):
        rewards.make("nope")


def test_call_checks_lengths_and_shapes():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rewards.call(rewards.get("length"), ["p", "q"], ["a"])
    with pytest.raises(ValueError, match="column 'answer' holds 1 values for 2 completions"):
        rewards.call(rewards.get("length"), ["p", "q"], ["a", "b"], {"answer": ["1"]})

    def one_value(prompts, completions, columns):
        return [1.0]
    with pytest.raises(rewards.RewardFunctionError,
                       match=r"'test_call_checks_lengths_and_shapes.<locals>.one_value' returned shape \(1,\) "
                             r"for 2 completions; expected \(2,\) or \(2, K\)"):
        rewards.call(one_value, ["p", "q"], ["a", "b"])
    with pytest.raises(rewards.RewardFunctionError, match=r"returned shape \(2, 1, 1\)"):
        rewards.call(lambda p, c, cols: np.zeros((2, 1, 1)), ["p", "q"], ["a", "b"])
    with pytest.raises(rewards.RewardFunctionError, match="returned something that is not numbers: list"):
        rewards.call(lambda p, c, cols: ["high", "low"], ["p", "q"], ["a", "b"])
    # [R, K] rewards pass, K objectives per row.
    two = rewards.call(lambda p, c, cols: [[1, 2], [3, 4]], ["p", "q"], ["a", "b"])
    assert two.dtype == np.float32 and two.tolist() == [[1, 2], [3, 4]]
    # Zero rows are fine.
    assert rewards.call(rewards.get("length"), [], []).shape == (0,)


def test_a_raising_function_is_a_one_line_user_error_naming_it():
    def picky(prompts, completions, columns):
        raise ZeroDivisionError("no\n  good")

    with pytest.raises(rewards.RewardFunctionError) as info:
        rewards.call(picky, ["p"], ["a"])
    message = str(info.value)
    assert message == ("text reward 'test_a_raising_function_is_a_one_line_user_error_naming_it.<locals>.picky' "
                       "raised ZeroDivisionError: no good")
    assert isinstance(info.value, errors.UserError) and isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert errors.message(info.value) == message
    # A registered member is named by its registry name (with its bound kwargs).
    with pytest.raises(rewards.RewardFunctionError,
                       match=r"^text reward 'exact_match' raised ValueError: exact_match needs columns\['answer'\]"):
        rewards.call(rewards.get("exact_match"), ["p"], ["#### 3"])
    with pytest.raises(rewards.RewardFunctionError,
                       match=r"^text reward \"exact_match\(fallback='none'\)\" raised ValueError: "
                             r"exact_match: row 1 has no reference answer \(answer=None\)"):
        rewards.call(rewards.make("exact_match", fallback="none"), ["p", "q"], ["#### 3", "#### 4"],
                     {"answer": ["3", None]})


def test_a_function_raising_on_one_row_is_named_with_that_row():
    """A batch call that raises is retried row by row only to name the
    first row that raises alone (and its completion); a failure that needs
    the whole batch names no row."""
    def no_c(prompts, completions, columns):
        for c in completions:
            if "c" in c:
                raise ValueError("cannot score a 'c'")
        return np.zeros(len(completions), np.float32)
    with pytest.raises(rewards.RewardFunctionError) as info:
        rewards.call(no_c, ["p"] * 4, ["aa", "bb", "cc", "dc"])
    assert str(info.value) == ("text reward 'test_a_function_raising_on_one_row_is_named_with_that_row.<locals>."
                               "no_c' raised ValueError: cannot score a 'c' (it raises on row 2 'cc')")

    def at_most_two(prompts, completions, columns):
        if len(completions) > 2:
            raise ValueError("too many")
        return np.zeros(len(completions), np.float32)
    with pytest.raises(rewards.RewardFunctionError) as info:
        rewards.call(at_most_two, ["p"] * 3, ["a", "b", "c"])
    assert str(info.value).endswith("raised ValueError: too many")


def test_nan_and_inf_rows_are_refused_naming_function_count_and_rows():
    def flaky(prompts, completions, columns):
        return np.asarray([0.0 if "ok" in c else np.nan for c in completions])

    completions = ["ok", "x" * 100, "ok", "bad 2", "bad 3", "bad 4"]
    with pytest.raises(rewards.RewardFunctionError) as info:
        rewards.call(flaky, ["p"] * 6, completions)
    # Rows 1, 3, 4, 5 are NaN: 4 bad rows, the first 3 shown, completions cut to 60 characters.
    assert str(info.value) == (
        "text reward 'test_nan_and_inf_rows_are_refused_naming_function_count_and_rows.<locals>.flaky' "
        f"returned NaN/inf for 4 of 6 rows: row 1 '{'x' * 60}...', row 3 'bad 2', row 4 'bad 3', ...")
    # inf, and a float64 too large for float32, are refused too; [R, K] rows with one bad entry as well.
    with pytest.raises(rewards.RewardFunctionError, match="NaN/inf for 1 of 2 rows: row 0 'a'$"):
        rewards.call(lambda p, c, cols: [np.inf, 1.0], ["p", "q"], ["a", "b"])
    with pytest.raises(rewards.RewardFunctionError, match="NaN/inf for 1 of 2 rows: row 1 'b'$"):
        rewards.call(lambda p, c, cols: [0.0, 1e300], ["p", "q"], ["a", "b"])
    with pytest.raises(rewards.RewardFunctionError, match="NaN/inf for 1 of 2 rows: row 1 'b'$"):
        rewards.call(lambda p, c, cols: [[0.0, 1.0], [2.0, np.nan]], ["p", "q"], ["a", "b"])


def test_combine_is_the_weighted_sum_with_each_term_reported():
    total = rewards.combine([("length", 2.0), ("distinct_words", -0.5),
                             ("length_target", 0.25, {"target": 4, "scale": 2})])
    prompts, completions = ["p", "q"], ["a a", "abcdef"]
    total_R, per = total(prompts, completions)
    # row 0 "a a":   length 3/100 = 0.03; distinct 1/2 = 0.5; length_target -|3-4|/2 = -0.5
    #                total = 2·0.03 - 0.5·0.5 + 0.25·(-0.5) = 0.06 - 0.25 - 0.125 = -0.315
    # row 1 "abcdef": length 0.06; distinct 1/1 = 1.0; length_target -|6-4|/2 = -1.0
    #                total = 2·0.06 - 0.5·1.0 + 0.25·(-1.0) = 0.12 - 0.5 - 0.25 = -0.63
    assert list(per) == ["length", "distinct_words", "length_target"]
    np.testing.assert_allclose(per["length"], [0.03, 0.06], rtol=1e-6)
    np.testing.assert_allclose(per["distinct_words"], [0.5, 1.0])
    np.testing.assert_allclose(per["length_target"], [-0.5, -1.0])
    np.testing.assert_allclose(total_R, [-0.315, -0.63], rtol=1e-6)
    assert total_R.dtype == np.float32 and all(v.dtype == np.float32 for v in per.values())
    assert total.weights == [2.0, -0.5, 0.25]

    # The same name twice (different kwargs) gets numbered keys; columns reach the terms.
    both = rewards.combine([("exact_match", 1.0), ("format_regex", 0.5, {"pattern": r".*\d"}),
                            ("format_regex", 0.1)])
    total_R, per = both(["p", "q"], ["so 7", "#### 8"], {"answer": ["7", "9"]})
    # row 0: exact 1, loose format 1, GSM8K format 0 -> 1 + 0.5 = 1.5
    # row 1: exact 0, loose format 1, GSM8K format 1 -> 0.5 + 0.1 = 0.6
    assert list(per) == ["exact_match", "format_regex#1", "format_regex#2"]
    np.testing.assert_allclose(total_R, [1.5, 0.6], rtol=1e-6)


def test_combine_refuses_bad_specs():
    with pytest.raises(ValueError, match="at least one"):
        rewards.combine([])
    with pytest.raises(ValueError, match="reward spec 1: no text reward named 'nope'; registered: distinct_words"):
        rewards.combine([("length", 1.0), ("nope", 1.0)])
    for weight in (float("nan"), float("inf"), "1", True, None):
        with pytest.raises(ValueError, match=r"reward spec 0 \('length'\): weight must be a finite number"):
            rewards.combine([("length", weight)])
    with pytest.raises(ValueError, match="must be \\(name, weight\\) or"):
        rewards.combine([("length",)])
    with pytest.raises(ValueError, match="reward 'length_target' has no parameter 'tgt'"):
        rewards.combine([("length_target", 1.0, {"tgt": 3})])
    # A term returning [R, K] cannot be summed.
    combined = rewards.combine([("length", 1.0)])
    combined.rewards[0] = rewards.BoundReward("two", lambda p, c, cols: np.ones((len(c), 2)), {})
    with pytest.raises(rewards.RewardFunctionError, match=r"returned shape \(1, 2\); a combined reward needs"):
        combined(["p"], ["a"])


def test_combine_names_a_failing_term():
    total = rewards.combine([("length", 1.0), ("exact_match", 1.0)])
    with pytest.raises(rewards.RewardFunctionError, match=r"^text reward 'exact_match' raised ValueError: "
                                                          r"exact_match: row 0 has no reference answer"):
        total(["p"], ["#### 1"], {"answer": [None]})
    json.dumps({k: v.tolist() for k, v in total(["p"], ["#### 1"], {"answer": ["1"]})[1].items()})
