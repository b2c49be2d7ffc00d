"""experiments/best_of_n.py on a tiny local policy: bad prompt lines are
skipped and counted (or raised), prompts longer than the policy's context
keep their last tokens, and impossible config values (greedy or empty
sampling, an objective the reward model lacks) are refused naming the field."""
import json

import pytest

from configs import best_of_n as bon_config
from experiments import best_of_n as driver
from jaxreward.data.preference import DataError
from jaxreward.errors import UserError
from jaxreward.train import defaults
from tests.experiments.test_cli import _cli
from tests.experiments.test_policy_gradient import _assert_user_error, _tiny_text_model

MAX_POSITIONS = 256  # of `_tiny_text_model`


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bon_model") / "model"
    _tiny_text_model(directory)
    return str(directory)


def _config(model_dir, prompts_path, **fields):
    c = bon_config.get_config("smollm2")
    c.model.pretrained = model_dir
    c.update(prompts_path=str(prompts_path), n=2, prompt_batch_size=2, **fields)
    c.sampling.update(max_new_tokens=4, temperature=1.0, top_p=1.0)
    driver.check_config(c)
    return c


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_AND_BAD = ['{"prompt": "say a"}', '{"prompt": 5}', '{"prompt": "say b"', '{"prompt": ""}',
                '{"prompt": "' + "x" * 300 + '"}', '{"prompt": "say c"}']


def test_bad_lines_are_skipped_and_counted_and_a_long_prompt_keeps_its_end(model_dir, tmp_path, capsys):
    """Lines 2-4 are bad (wrong type, malformed JSON, empty); line 5 has more
    tokens than fit beside max_new_tokens = 4 in 256 positions. Every valid
    prompt is sampled, the long one from its last 252 tokens."""
    path = _write_jsonl(tmp_path / "p_bad.jsonl", GOOD_AND_BAD)
    rows = driver.run(_config(model_dir, path), str(tmp_path))
    printed = capsys.readouterr().out
    assert ("p_bad.jsonl: read 6 lines (jsonl): kept 3, skipped 3 (empty prompt: 1 [p_bad.jsonl:4]; "
            "malformed JSON: 1 [p_bad.jsonl:3]; wrong type of 'prompt': 1 [p_bad.jsonl:2])") in printed
    assert (f"1 of 3 prompts were longer than {MAX_POSITIONS - 4} tokens (max_prompt_length=0: what fits "
            f"beside sampling.max_new_tokens=4 in max_position_embeddings {MAX_POSITIONS}) and keep their "
            "last tokens") in printed
    assert [r["prompt"] for r in rows] == ["say a", "x" * 300, "say c"]
    written = [json.loads(x) for x in (tmp_path / "best_of_n.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in written] == [r["prompt"] for r in rows]
    assert all(len(r["completions"]) == 2 for r in written)


def test_max_prompt_length_cuts_prompts_and_must_fit_the_policy(model_dir, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "say a"}', '{"prompt": "say bb"}'])
    rows = driver.run(_config(model_dir, path, max_prompt_length=8), str(tmp_path))
    assert "2 of 2 prompts were longer than 8 tokens (max_prompt_length) and keep their last tokens" \
        in capsys.readouterr().out
    assert len(rows) == 2
    with pytest.raises(UserError, match=r"^config field max_prompt_length=253: with sampling.max_new_tokens=4 "
                                        r"it exceeds the policy's max_position_embeddings 256; use at most 252"):
        driver.run(_config(model_dir, path, max_prompt_length=253), str(tmp_path))


def test_on_error_raise_stops_at_the_first_bad_line_and_a_file_without_prompts_is_refused(model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "p_bad.jsonl", GOOD_AND_BAD)
    with pytest.raises(DataError, match=r"p_bad\.jsonl:2: field 'prompt': wrong type"):
        driver.run(_config(model_dir, path, on_error="raise"), str(tmp_path))
    none_left = _write_jsonl(tmp_path / "p_none.jsonl", GOOD_AND_BAD[1:4])
    with pytest.raises(UserError, match=r"^config field prompts_path: no prompt left to sample from; "
                                        r"p_none\.jsonl: read 3 lines .*kept 0, skipped 3"):
        driver.run(_config(model_dir, none_left), str(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("sampling.temperature", 0.0, "config field sampling.temperature must be a finite number in (0.0, inf), "
                                  "got 0.0"),
    ("sampling.max_new_tokens", 0, "config field sampling.max_new_tokens must be an integer >= 1, got 0"),
    ("on_error", "ignore", "config field on_error must be one of skip, raise; got 'ignore'"),
    ("max_prompt_length", -1, "config field max_prompt_length must be an integer >= 0, got -1"),
    ("objective", 1, "config field objective=1: without reward_model_dir the text reward 'distinct_words' "
                     "ranks, and it has 1 objective"),
])
def test_check_config_names_the_field(field, value, message):
    c = bon_config.get_config("smollm2")
    *section, key = field.split(".")
    (c[section[0]] if section else c)[key] = value
    with pytest.raises(defaults.ConfigError) as e:
        driver.check_config(c)
    assert str(e.value) == message


@pytest.mark.parametrize("export_file, objectives", [("reward_model.json", 1), ("ensemble.json", 2)])
def test_an_objective_the_reward_model_lacks_is_refused_before_it_loads(tmp_path, export_file, objectives):
    """The head size is read from the export's JSON (a single model's or an
    ensemble's), so the check needs no weights."""
    (tmp_path / export_file).write_text(json.dumps({"num_objectives": objectives}))
    c = bon_config.get_config("smollm2")
    c.update(reward_model_dir=str(tmp_path), objective=objectives - 1)
    driver.check_config(c)
    c.objective = objectives
    with pytest.raises(defaults.ConfigError) as e:
        driver.check_config(c)
    assert str(e.value) == (f"config field objective={objectives}: the reward model has {objectives} "
                            "objective(s)")


def test_bad_sampling_and_objective_are_one_line_through_the_cli(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps({"num_objectives": 1}))
    for i, (args, message) in enumerate([
            ((f"--config.reward_model_dir={tmp_path / 'rm'}", "--config.objective=1"),
             "config field objective=1: the reward model has 1 objective(s)"),
            (("--config.sampling.temperature=0",), "config field sampling.temperature must be a finite number "
                                                   "in (0.0, inf)")]):
        proc = _cli("--config=configs/best_of_n.py:smollm2", f"--workdir={tmp_path / str(i)}", *args, check=False)
        _assert_user_error(proc, message)


def test_exact_match_scores_with_the_answers_of_the_prompt_file(model_dir, tmp_path):
    """`text_reward=exact_match` was accepted, but the driver dropped the
    file's `answer` column, so the run failed only after the model had loaded
    and sampled ("exact_match needs columns['answer'] ...; columns given:
    none"). The answers now reach the reward; a file without them is refused
    before the policy loads, naming `text_reward`."""
    path = _write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "say 4", "answer": "4"}',
                                               '{"prompt": "say 6", "answer": "6"}'])
    rows = driver.run(_config(model_dir, path, text_reward="exact_match"), str(tmp_path))
    assert len(rows) == 2 and all(len(r["rewards"]) == 2 for r in rows)
    bare = _write_jsonl(tmp_path / "bare.jsonl", ['{"prompt": "say 4"}', '{"prompt": "say 6"}'])
    c = _config(model_dir, bare, text_reward="exact_match")
    c.model.pretrained = str(tmp_path / "no_such_model")  # never loaded: refused first
    with pytest.raises(UserError, match=r"exact_match needs columns\['answer'\].*\(text_reward: fails on every "
                                        r"prompt, each tried on an empty completion before the policy loads\)"):
        driver.run(c, str(tmp_path))
