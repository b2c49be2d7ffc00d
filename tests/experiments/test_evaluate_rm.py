"""experiments/evaluate_rm.py: the report arithmetic (jaxreward/train/rewardbench.py),
the text-reward registry (jaxreward/rewards), the job through the CLI with the
`text` scorer, bad input, and the `exported` / `implicit` scorers in process on
tiny models with the tiny test tokenizer."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreward
import jaxreward.main  # noqa: F401 - the lazy package does not import it by itself
from configs import evaluate_rm as eval_config
from experiments import evaluate_rm as driver
from jaxreward import rewards
from jaxreward.errors import UserError
from jaxreward.data.batching import tokenize_pairs
from jaxreward.data.preference import DataError, read_preference_pairs
from jaxreward.data.tokenizer import Tokenizer
from jaxreward.models import hf_io
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import Decoder, LlamaConfig
from jaxreward.models.reward_io import export_reward_model
from jaxreward.models.scoring import sequence_logps, token_logps
from jaxreward.train import evaluate, pairwise, rewardbench
from jaxreward.train.step import unbox
from tests.conftest import ROOT
from tests.data.conftest import CHATML, build_hf_bpe


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def _cli(*args):
    """`python -m jaxreward.main ...` on one CPU device; returns the finished process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "jaxreward.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _rows(kind_sizes, subset):
    """Synthetic rows: `n` rows of `size` responses each (size 2 = a pair)."""
    out = []
    for n, size in kind_sizes:
        out += [driver.Row("p", tuple(f"r{j}" for j in range(size)), "synthetic.jsonl", i + 1,
                           subset if size == 2 else f"{subset}_bo{size}", best_of=size > 2)
                for i in range(n)]
    return out


# ------------------------------------------------------------- arithmetic


def test_random_scorer_is_at_chance_and_oracle_is_perfect():
    rows = _rows([(2400, 2), (2400, 4)], "random")
    subsets = [r.subset for r in rows]
    scores = np.random.default_rng(0).normal(size=sum(len(r.responses) for r in rows)).astype(np.float32)
    credit, _, _ = driver.credits(rows, scores)
    report = driver.build_report(rows, subsets, credit, {})
    pair, bo4 = report["subsets"]["random"], report["subsets"]["random_bo4"]
    assert pair["n"] == bo4["n"] == 2400 and pair["kind"] == "pair" and bo4["kind"] == "best_of_4"
    assert pair["chance"] == 0.5 and bo4["chance"] == 0.25
    assert pair["ci_low"] <= 0.5 <= pair["ci_high"], pair
    assert bo4["ci_low"] <= 0.25 <= bo4["ci_high"], bo4
    # 95% Wilson half-widths at n = 2400: 1.96·sqrt(.25/2400) = 0.020, 1.96·sqrt(.1875/2400) = 0.017.
    assert pair["ci_high"] - pair["ci_low"] < 0.045 and bo4["ci_high"] - bo4["ci_low"] < 0.04

    oracle = np.concatenate([[1.0] + [0.0] * (len(r.responses) - 1) for r in rows]).astype(np.float32)
    credit, _, _ = driver.credits(rows, oracle)
    report = driver.build_report(rows, subsets, credit, {})
    for s in report["subsets"].values():
        assert s["accuracy"] == 1.0 and s["ci_high"] == 1.0
        assert s["ci_low"] == pytest.approx(evaluate.wilson_interval(2400, 2400)[0])
    assert report["score"]["accuracy"] == 1.0


def test_ties_count_as_wrong_and_best_of_shares_credit():
    np.testing.assert_array_equal(rewardbench.pair_credit(np.array([1.0, 1.0, 2.0, -0.0]),
                                                          np.array([1.0, 0.5, 3.0, 0.0])), [0, 1, 0, 0])
    chosen = np.array([3.0, 3.0, 3.0, 2.0, 3.0])
    rejected = np.array([[1.0, 2.0, 0.0],   # chosen alone at the top: 1
                         [3.0, 2.0, 0.0],   # tied with one rejected: 1/2
                         [3.0, 3.0, 3.0],   # all four tied: 1/4
                         [3.0, 2.0, 2.0],   # a rejected is higher: 0 (its own ties do not matter)
                         [3.0, 3.0, 1.0]])  # three tied at the top: 1/3
    np.testing.assert_allclose(rewardbench.best_of_credit(chosen, rejected), [1, 0.5, 0.25, 0, 1 / 3])
    with pytest.raises(ValueError, match="non-finite"):
        rewardbench.pair_credit(np.array([np.nan]), np.array([0.0]))


def test_mean_over_sections_interval_uses_kish_effective_n():
    sections = {"A": rewardbench.stat(30, 40), "B": rewardbench.stat(5, 10)}
    mean = rewardbench.mean_of_sections(sections)
    # mean = (0.75 + 0.5) / 2 = 0.625; n_eff = 2² / (1/40 + 1/10) = 4 / 0.125 = 32
    assert mean["accuracy"] == 0.625 and mean["n"] == pytest.approx(32.0)
    assert (mean["ci_low"], mean["ci_high"]) == pytest.approx(evaluate.wilson_interval(0.625 * 32, 32))
    one = rewardbench.mean_of_sections({"A": sections["A"]})  # one section: its own interval
    assert (one["ci_low"], one["ci_high"]) == pytest.approx((sections["A"]["ci_low"], sections["A"]["ci_high"]))


def test_text_reward_registry():
    assert {"length", "distinct_words"} <= set(rewards.names())
    np.testing.assert_allclose(rewards.call(rewards.get("length"), ["p", "q"], ["abc", ""]), [0.03, 0.0])
    got = rewards.call(rewards.get("distinct_words"), ["p"] * 3, ["a b a b", "x y z", "  "])
    np.testing.assert_allclose(got, [0.5, 1.0, 0.0])
    assert got.dtype == np.float32
    with pytest.raises(KeyError, match="registered: .*distinct_words"):
        rewards.get("nope")
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for 2 completions"):
        rewards.call(lambda p, c, cols: [1.0], ["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("length")(lambda p, c: np.zeros(len(c)))


# ------------------------------------------------------------ the CLI job


def _toy_files(tmp_path):
    """With the `length` reward (characters / 100) the credits are known:
    subset a: 2 of 3 pairs right; b: 1 tie (wrong); c: best-of-4 credits 1, 1/2, 0, 1."""
    pairs = _write(tmp_path / "toy_pairs.jsonl", [
        {"prompt": "q1", "chosen": "long answer", "rejected": "short", "subset": "a"},
        {"prompt": "q2", "chosen": "longer one", "rejected": "tiny", "subset": "a"},
        {"prompt": "q3", "chosen": "no", "rejected": "a longer reply", "subset": "a"},
        {"prompt": "q4", "chosen": "same", "rejected": "SAME", "subset": "b"},
    ])
    best_of = _write(tmp_path / "toy_best_of.jsonl", [
        {"prompt": "q5", "chosen": "xxxxxx", "rejected": ["xx", "xxx", "x"], "subset": "c"},
        "",  # blank lines are ignored
        {"prompt": "q6", "chosen": "xxxx", "rejected": ["xxxx", "xx", "x"], "subset": "c"},
        {"prompt": "q7", "chosen": "xx", "rejected": ["xxx", "x", "x"], "subset": "c"},
        {"prompt": [{"role": "user", "content": "q8"}], "chosen": "xxxxx", "rejected": ["x", "x", "x"],
         "subset": "c"},
    ])
    return pairs, best_of


def test_cli_text_scorer_end_to_end(tmp_path):
    pairs, best_of = _toy_files(tmp_path)
    tok_dir = tmp_path / "tok"
    hf_io.save_tokenizer(tok_dir, _tiny_tokenizer())  # only its chat template renders q8's prompt
    wd = tmp_path / "run"
    proc = _cli("--config=configs/evaluate_rm.py:text", f"--workdir={wd}", f"--config.data.paths={pairs}",
                f"--config.data.paths={best_of}", f"--config.scorer.tokenizer={tok_dir}",
                '--config.report.sections={"S1": ["a", "b"], "S2": ["c"]}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((wd / "evaluation.json").read_text())
    sub, sec = report["subsets"], report["sections"]
    assert {k: (s["n"], s["correct"]) for k, s in sub.items()} == {"a": (3, 2.0), "b": (1, 0.0), "c": (4, 2.5)}
    # Sections weight subsets by rows: S1 = (3·(2/3) + 1·0) / (3 + 1) = 2/4 = 0.5 (the plain mean
    # of its subset accuracies would be (2/3 + 0)/2 = 1/3); S2 = 2.5/4 = 0.625.
    # Score = unweighted mean over sections = (0.5 + 0.625)/2 = 0.5625, n_eff = 2²/(1/4 + 1/4) = 8.
    assert sec["S1"]["accuracy"] == 0.5 and sec["S2"]["accuracy"] == 0.625
    assert (sec["S1"]["ci_low"], sec["S1"]["ci_high"]) == pytest.approx(evaluate.wilson_interval(2, 4))
    assert (sec["S2"]["ci_low"], sec["S2"]["ci_high"]) == pytest.approx(evaluate.wilson_interval(2.5, 4))
    assert report["score"]["accuracy"] == 0.5625 and report["score"]["n"] == pytest.approx(8.0)
    assert sub["c"]["kind"] == "best_of_4" and sub["c"]["chance"] == 0.25 and sub["a"]["chance"] == 0.5

    lines = [json.loads(l) for l in (wd / "scores.jsonl").read_text().splitlines()]
    assert [(l["file"], l["line"], l["subset"], l["correct"]) for l in lines] == [
        (pairs, 1, "a", 1.0), (pairs, 2, "a", 1.0), (pairs, 3, "a", 0.0), (pairs, 4, "b", 0.0),
        (best_of, 1, "c", 1.0), (best_of, 3, "c", 0.5), (best_of, 4, "c", 0.0), (best_of, 5, "c", 1.0)]
    assert lines[0]["chosen"] == 0.11 and lines[0]["rejected"] == 0.05 and lines[0]["kind"] == "pair"
    assert lines[5]["rejected"] == [0.04, 0.02, 0.01] and lines[5]["kind"] == "best_of_4"

    png = (wd / "subset_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "score (unweighted mean over 2 section(s)): 0.5625" in proc.stdout


def _last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_cli_bad_input_says_what_and_where(tmp_path):
    missing = _cli("--config=configs/evaluate_rm.py:text", f"--workdir={tmp_path / 'a'}",
                   f"--config.data.paths={tmp_path / 'nope.jsonl'}")
    assert missing.returncode != 0
    assert f"data.paths[0]: '{tmp_path / 'nope.jsonl'}' is not a file" in _last_line(missing)
    assert not (tmp_path / "a" / "config.json").exists()  # refused before anything ran

    path = _write(tmp_path / "no_subset.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "subset": "s"},
                                                  {"prompt": "q", "chosen": "a", "rejected": "b"}])
    absent = _cli("--config=configs/evaluate_rm.py:text", f"--workdir={tmp_path / 'b'}",
                  f"--config.data.paths={path}", '--config.report.sections={"all": ["s"]}')
    assert absent.returncode != 0
    assert f"{path}:2: field 'subset': missing field" in _last_line(absent), absent.stderr[-2000:]
    assert not (tmp_path / "b" / "evaluation.json").exists()


def test_config_checks_name_the_field(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.json").write_text("{}")
    (tmp_path / "neither").mkdir()
    cases = [("exported", {}, "scorer.reward_model_dir is empty"),
             ("exported", {"scorer.reward_model_dir": str(tmp_path / "neither")},
              f"scorer.reward_model_dir: '{tmp_path / 'neither'}' has neither reward_model.json nor ensemble.json"),
             ("exported", {"scorer.reward_model_dir": str(tmp_path / "ens"), "ensemble.aggregate": "median"},
              "ensemble.aggregate must be one of mean, min, mean_minus_std; got 'median'"),
             ("text", {"scorer.text_reward": "nope"}, "scorer.text_reward: no text reward named 'nope'"),
             ("implicit", {"scorer.policy": str(tmp_path / "x")}, "scorer.policy: "),
             ("text", {"scorer.kind": "oracle"}, "scorer.kind must be one of exported, implicit, text"),
             ("text", {"data.paths": (path, path)}, "data.paths lists a file twice"),
             ("text", {"data.max_prompt_length": 512}, "data.max_prompt_length=512 leaves no room"),
             ("text", {"report.sections": {"S": "a"}}, "report.sections.S must be a non-empty list")]
    for variant, fields, message in cases:
        c = eval_config.get_config(variant)
        c.data.paths = (path,)
        for name, value in fields.items():
            node, _, key = name.rpartition(".")
            c[node][key] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            jaxreward.main.check_config(c)   # the shared checks (data.max_prompt_length), then the driver's
    jaxreward.main.check_config(_text_config([path]))  # the text variant on a file is fine


def _text_config(paths, **data):
    c = eval_config.get_config("text")
    c.data.paths = tuple(paths)
    c.data.update(data)
    c.report.plot = False
    return c


def test_absent_subset_is_default_without_sections_and_files_are_sections(tmp_path):
    one = _write(tmp_path / "one.jsonl", [{"prompt": "q", "chosen": "aaa", "rejected": "b"},
                                          {"prompt": "q", "chosen": "a", "rejected": "bb", "subset": "s"}])
    two = _write(tmp_path / "two.jsonl", [{"prompt": "q", "chosen": "aa", "rejected": "b"}])
    report = driver.run(_text_config([one, two]), str(tmp_path / "wd"))
    assert {k: (s["n"], s["correct"]) for k, s in report["subsets"].items()} == {"default": (2, 2.0), "s": (1, 0.0)}
    assert {k: (s["n"], s["accuracy"], s["subsets"]) for k, s in report["sections"].items()} == {
        "one.jsonl": (2, 0.5, ["default", "s"]), "two.jsonl": (1, 1.0, ["default"])}
    assert report["score"]["accuracy"] == 0.75

    # A bad best-of line is reported with file, line and field.
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": ["b", "c"]},
                                          {"prompt": "q", "chosen": "a", "rejected": ["b", ""]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected\[1\]': empty response"):
        driver.run(_text_config([bad], on_error="raise"), str(tmp_path / "wd2"))
    report = driver.run(_text_config([bad]), str(tmp_path / "wd3"))  # on_error="skip": counted, row 1 kept
    assert report["num_rows"] == 1
    assert "read 2 lines (best_of): kept 1, skipped 1 (empty rejected[1] response: 1 [bad.jsonl:2])" in \
        report["files"][0]["read_report"]


def test_tfds_source_scores_the_same_rows(tmp_path):
    pairs, _ = _toy_files(tmp_path)
    direct = driver.run(_text_config([pairs]), str(tmp_path / "jsonl"))
    via_tfds = driver.run(_text_config([pairs], source="tfds", tfds_data_dir=str(tmp_path / "tfds")),
                          str(tmp_path / "tfds_run"))
    assert via_tfds["subsets"] == direct["subsets"] and via_tfds["score"] == direct["score"]
    assert (tmp_path / "tfds_run" / "scores.jsonl").read_text() == (tmp_path / "jsonl" / "scores.jsonl").read_text()


# ------------------------------------------------------- model scorers


def _tiny_tokenizer():
    return Tokenizer(build_hf_bpe(), bos_id=1, eos_id=4, pad_id=0, add_bos=True, chat_template=CHATML)


def _tiny_arch(vocab):
    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, max_position_embeddings=64)


def _model_files(tmp_path):
    """A pair file (one pair long enough to be cut at max_length 24) and a best-of-4 file."""
    pairs = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "hi there", "chosen": "the cat", "rejected": "a dog", "subset": "chat"},
        {"prompt": "what is this " * 3, "chosen": "that is the thing, " * 2, "rejected": "no", "subset": "chat"},
    ])
    best_of = _write(tmp_path / "best_of.jsonl", [
        {"prompt": "pick", "chosen": "one", "rejected": ["two", "three!", "4"], "subset": "math"},
        {"prompt": [{"role": "user", "content": "hey"}], "chosen": "ok", "rejected": ["no", "hm", "eh"],
         "subset": "math"},
    ])
    return pairs, best_of


def _scores(workdir):
    return [json.loads(l) for l in open(os.path.join(workdir, "scores.jsonl"))]


def _single(tok, prompt, response, prompt_limit=None):
    """One unpadded sequence [1, L]: BOS + prompt (its end, if longer than
    `prompt_limit` tokens), response + EOS, and its masks."""
    p = tok.encode(prompt, add_bos=tok.add_bos)
    if prompt_limit and len(p) > prompt_limit:
        p = p[:1] + p[len(p) - (prompt_limit - 1):]  # keeps the BOS
    ids = p + tok.encode(response) + [tok.eos_id]
    tokens = np.asarray([ids], np.int32)
    loss = np.asarray([[False] * len(p) + [True] * (len(ids) - len(p))])
    return tokens, np.ones_like(tokens, bool), np.arange(len(ids), dtype=np.int32)[None], loss


def tiny_export(tmp_path, num_objectives):
    """A random tiny reward model exported to `tmp_path/rm` with the test
    tokenizer (`tmp_path/tok`); returns (tokenizer, model, params)."""
    tok = _tiny_tokenizer()
    hf_io.save_tokenizer(tmp_path / "tok", tok)
    rm = RewardModel(_tiny_arch(tok.vocab_size), num_objectives=num_objectives)
    params = unbox(jax.jit(rm.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    export_reward_model(str(tmp_path / "rm"), rm, params, str(tmp_path / "tok"))
    return tok, rm, params


def test_exported_scorer_matches_the_training_path(tmp_path):
    tok, rm, params = tiny_export(tmp_path, num_objectives=2)
    pairs_path, best_of_path = _model_files(tmp_path)
    c = eval_config.get_config("exported")
    c.scorer.update(reward_model_dir=str(tmp_path / "rm"), objective=1)
    c.data.update(paths=(pairs_path, best_of_path), max_length=24, batch_size=8)
    c.report.plot = False
    report = driver.run(c, str(tmp_path / "wd"))
    got = _scores(tmp_path / "wd")

    # Pairs: exactly what the reward_model job scores (tokenize_pairs + one [2B, T] forward).
    pairs, _ = read_preference_pairs(pairs_path)
    arrays, trunc = tokenize_pairs(pairs, tok, max_length=24)
    assert trunc.prompt_truncated == 1  # the long pair really is cut
    rc, rr = jax.jit(lambda b: pairwise.pair_rewards(rm, params, b))(arrays)
    np.testing.assert_allclose([g["chosen"] for g in got[:2]], rc[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([g["rejected"] for g in got[:2]], rr[:, 1], rtol=1e-5, atol=1e-6)
    # Best-of rows: each response scored alone, unpadded. The chat prompt (rendered by the
    # template) is 23 tokens; all four responses share one cut to the adaptive limit
    # max(24 // 2, 24 - longest response) = 24 - 3 ("ok" + EOS) = 21 tokens, BOS kept.
    score = jax.jit(lambda *x: rm.apply({"params": params}, *x))  # eager would compile op by op
    chat = tok.apply_chat_template([{"role": "user", "content": "hey"}], add_generation_prompt=True)
    assert len(tok.encode(chat, add_bos=True)) == 23
    for g, prompt, responses in [(got[2], "pick", ["one", "two", "three!", "4"]),
                                 (got[3], chat, ["ok", "no", "hm", "eh"])]:
        want = [float(score(*_single(tok, prompt, r, 21)[:3])[0, 1]) for r in responses]
        np.testing.assert_allclose([g["chosen"], *g["rejected"]], want, rtol=1e-5, atol=1e-6)
        top = max(want)
        assert g["correct"] == (1.0 / want.count(top) if want[0] == top else 0.0)
    assert report["subsets"]["math"]["kind"] == "best_of_4"


def test_an_ensemble_export_scores_by_its_aggregate_of_the_members(tmp_path):
    """scorer.reward_model_dir = an ensemble folder: every response's score is
    ensemble_reward(aggregate) of the scores each member folder gives alone;
    correctness is ranked by that score."""
    from jaxreward.models import ensemble
    from jaxreward.objectives.reward import ensemble_reward
    tok = _tiny_tokenizer()
    hf_io.save_tokenizer(tmp_path / "tok", tok)
    rm = RewardModel(_tiny_arch(tok.vocab_size), num_objectives=2)
    members = [unbox(jax.jit(rm.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))["params"])
               for seed in (0, 1, 2)]
    ensemble.export_ensemble(str(tmp_path / "ens"), rm, ensemble.stack(members), str(tmp_path / "tok"))
    pairs_path, best_of_path = _model_files(tmp_path)

    def run(reward_dir, name, mesh=(-1, 1, 1), **ens):
        c = eval_config.get_config("exported")
        c.scorer.update(reward_model_dir=reward_dir, objective=1)
        c.ensemble.update(ens)
        c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        c.data.update(paths=(pairs_path, best_of_path), max_length=24, batch_size=8)
        c.report.plot = False
        driver.check_config(c)
        return driver.run(c, str(tmp_path / name)), _scores(tmp_path / name)

    alone = [run(str(tmp_path / "ens" / f"member_{e}"), f"m{e}")[1] for e in range(3)]
    # min on a 2x2x2 mesh: members' params sharded over fsdp and tensor, the member axis whole.
    for aggregate, mesh in (("mean_minus_std", (-1, 1, 1)), ("min", (2, 2, 2))):
        report, got = run(str(tmp_path / "ens"), aggregate, mesh, aggregate=aggregate, std_coef=0.5)
        assert report["scorer"]["description"].startswith(f"reward-model ensemble {tmp_path / 'ens'} (3 members, ")
        for i, row in enumerate(got):
            r_E = np.asarray([[m[i]["chosen"], *np.atleast_1d(m[i]["rejected"])] for m in alone])
            want = np.asarray(ensemble_reward(jnp.asarray(r_E), aggregate, std_coef=0.5))
            np.testing.assert_allclose([row["chosen"], *np.atleast_1d(row["rejected"])], want,
                                       rtol=1e-5, atol=1e-6)
            top = want.max()
            assert row["correct"] == (1.0 / (want == top).sum() if want[0] == top else 0.0)


def test_implicit_scorer_is_beta_times_log_ratio(tmp_path):
    tok = _tiny_tokenizer()
    arch = _tiny_arch(tok.vocab_size)
    for name, seed in (("policy", 1), ("reference", 2)):
        p = unbox(jax.jit(Decoder(arch).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))["params"])
        jaxreward.save_pretrained(tmp_path / name, arch, p, tok)
    pairs_path, best_of_path = _model_files(tmp_path)

    def config(reference, normalize):
        c = eval_config.get_config("implicit")
        c.scorer.update(policy=str(tmp_path / "policy"), reference=str(tmp_path / reference), beta=0.5,
                        length_normalize=normalize)
        c.data.update(paths=(pairs_path, best_of_path), max_length=24, batch_size=8)
        c.report.plot = False
        return c

    model, pol, _ = jaxreward.load_pretrained(tmp_path / "policy")
    _, ref, _ = jaxreward.load_pretrained(tmp_path / "reference")
    for normalize in (False, True):
        driver.run(config("reference", normalize), str(tmp_path / f"wd{normalize}"))
        got = _scores(tmp_path / f"wd{normalize}")
        tokens, mask, positions, loss = _single(tok, "pick", "three!")
        lp = jax.jit(lambda p: sequence_logps(token_logps(model, p, tokens, mask, positions), loss,
                                              average=normalize))
        want = 0.5 * (lp(pol) - lp(ref))[0]
        np.testing.assert_allclose(got[2]["rejected"][1], want, rtol=1e-5, atol=1e-6)

    # The policy against itself: every score is 0, so every pair is a tie (wrong) and every
    # best-of-4 row a four-way tie (1/4).
    report = driver.run(config("policy", False), str(tmp_path / "self"))
    assert all(g["chosen"] == 0.0 for g in _scores(tmp_path / "self"))
    assert report["subsets"]["chat"]["accuracy"] == 0.0 and report["subsets"]["math"]["accuracy"] == 0.25


def test_best_of_reader_checks_text_and_roles_as_the_pair_reader_does(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": ["b", "c"]}
    path = _write(tmp_path / "bo.jsonl", [
        good,
        '{"prompt": "q", "chosen": "a\\ud800", "rejected": ["b"]}',      # lone surrogate
        {"prompt": "q", "chosen": "a", "rejected": ["b\x00"]},             # NUL
        {"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": ["b"]},
        good])
    rows, report = driver.read_best_of(path, on_error="skip", render_chat=lambda m, **kw: "x")
    assert [r.line for r in rows] == [1, 5]   # every valid row kept
    assert report.skipped == {"bad text in 'chosen'": 1, "bad text in 'rejected'": 1, "bad role in 'prompt'": 1}
    with pytest.raises(DataError, match=r"bo\.jsonl:2: field 'chosen': bad text \(lone surrogate U\+D800"):
        driver.read_best_of(path, on_error="raise")


def test_file_kind_is_decided_by_most_lines_not_the_first(tmp_path, capsys):
    # One pair-shaped line first, then four best-of rows: read as best-of, and
    # the odd line is the one skipped (it used to turn the four into skips).
    row = {"prompt": "q", "chosen": "a", "rejected": ["b", "c", "d"]}
    path = _write(tmp_path / "mixed.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "rock"}] + [row] * 4)
    assert driver.file_kind(path) == "best_of"
    assert "mixed.jsonl: 4 best-of lines (a `rejected` list) and 1 pair lines: read as best-of rows" in (
        capsys.readouterr().out)
    rows, report = driver.read_best_of(path)
    assert [r.line for r in rows] == [2, 3, 4, 5] and report.skipped == {"wrong type of 'rejected'": 1}
    pairs = _write(tmp_path / "pairs.jsonl", [row] + [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2)
    assert driver.file_kind(pairs) == "pairs"
    # No majority: refused in one line rather than half of it skipped.
    tie = _write(tmp_path / "tie.jsonl", [row, {"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match=r"tie\.jsonl: as many best-of lines \(a `rejected` list\) as "
                                        r"pair lines \(1 each\), so it is neither kind"):
        driver.file_kind(tie)


def test_damaged_export_metadata_is_one_line(tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "reward_model.json").write_text('{"llama_config": {"vocab')
    proc = _cli("--config=configs/evaluate_rm.py:exported", f"--workdir={tmp_path / 'w'}",
                f"--config.scorer.reward_model_dir={folder}", f"--config.data.paths={_toy_files(tmp_path)[0]}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _last_line(proc).startswith(f"error: {folder / 'reward_model.json'} is damaged or not a "
                                       "reward-model export (JSONDecodeError")


def test_missing_backbone_says_where_the_path_came_from(tmp_path):
    """An export whose reward_model.json "pretrained" no longer exists (moved,
    or a relative path from another cwd) said only "'/x/gone.gguf' is neither
    an existing path nor a known model name", a path the user never typed.
    Now it names reward_model.json's field and scorer.tokenizer, the way around."""
    d = tmp_path / "reward_model"
    d.mkdir()
    gone = tmp_path / "gone.gguf"
    (d / "reward_model.json").write_text(json.dumps({"pretrained": str(gone)}))
    config = eval_config.get_config("exported")
    config.scorer.reward_model_dir = str(d)
    with pytest.raises(UserError) as info:
        driver.scorer_tokenizer(config)
    message = str(info.value)
    assert message.startswith(f"the backbone '{gone}' named by {d / 'reward_model.json'} (field `pretrained`)")
    assert "is neither an existing path" in message and "--config.scorer.tokenizer" in message


def test_score_line_counts_the_rows_the_score_covers(tmp_path, capsys):
    """With report.sections covering some subsets only, the last line said
    "score (...) (3 rows)" while the score covered 2 of them (the third row's
    subset is in no section)."""
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "aa", "rejected": "b", "subset": "a"},
                                         {"prompt": "q", "chosen": "a", "rejected": "bb", "subset": "a"},
                                         {"prompt": "q", "chosen": "aa", "rejected": "b", "subset": "b"}])
    config = _text_config([path])
    config.report.sections = {"S": ["a"]}
    report = driver.run(config, str(tmp_path / "wd"))
    assert report["num_rows"] == 3 and report["score"]["num_rows"] == 2
    assert "(2 of the 3 rows; the others are in no section)" in capsys.readouterr().out
    report = driver.run(_text_config([path]), str(tmp_path / "wd2"))  # sections from files: all rows
    assert report["score"]["num_rows"] == 3
    assert re.search(r"^score \(.* \(3 rows\)$", capsys.readouterr().out, re.M)
