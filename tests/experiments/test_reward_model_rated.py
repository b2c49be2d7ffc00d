"""experiments/reward_model_rated.py in process: the K-objective head
recovers K hidden linear targets (synthetic), the HelpSteer-style reader
path on a tiny file with a tiny HF checkpoint, the scoring combinations, and
bad rated lines named by file, line and field."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreward
from configs import reward_model_rated as rated_config
from experiments import reward_model_rated as driver
from jaxreward import parallel
from jaxreward.data.preference import DataError
from jaxreward.data.tokenizer import Tokenizer
from jaxreward.models.llama import Decoder, LlamaConfig
from jaxreward.models.reward_io import load_reward_model
from jaxreward.objectives.reward import weighted_objective_sum
from jaxreward.objectives.transforms import combine_log_sigmoid
from jaxreward.train import defaults
from jaxreward.train.step import unbox
from tests.data.conftest import CHATML, build_hf_bpe

HS = rated_config.HELPSTEER_ATTRIBUTES


@pytest.fixture(autouse=True)
def _mesh_uses_first_devices(monkeypatch):
    real = parallel.make_mesh
    monkeypatch.setattr(parallel, "make_mesh",
                        lambda d, f, t: real(d, f, t, devices=jax.devices()[:d * f * t]))


def _one_device(c):
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.progress_bar = False
    return c


def test_k_objective_head_recovers_the_k_hidden_linear_targets(tmp_path):
    config = _one_device(rated_config.get_config("synthetic"))
    driver.check_config(config)
    out = driver.run(config, str(tmp_path))
    final = out["eval"]
    assert final["num_records"] == 512 and out["names"] == ["k0", "k1", "k2"]
    # Recomputed from the export on the held-out split: Pearson >= 0.9 per objective.
    rm, params, _ = load_reward_model(str(tmp_path / "reward_model"))
    assert rm.num_objectives == 3
    evals = driver.synthetic_ratings(config, 512, split_seed=2)
    pred = np.asarray(jax.jit(lambda p, t, m, q: rm.apply({"params": p}, t, m, q))(
        params, evals["tokens"], evals["attention_mask"], evals["positions"]), np.float64)
    for k in range(3):
        r = np.corrcoef(pred[:, k], evals["ratings"][:, k])[0, 1]
        assert r >= 0.9, (k, r)
        np.testing.assert_allclose(final[f"pearson_k{k}"], r, atol=1e-4)
        # Each output tracks its own target, not the others'.
        assert abs(np.corrcoef(pred[:, k], evals["ratings"][:, (k + 1) % 3])[0, 1]) < 0.5
    ratings = json.loads((tmp_path / "reward_model" / "ratings.json").read_text())
    train = driver.synthetic_ratings(config, 2048, split_seed=1)
    np.testing.assert_allclose(ratings["rating_offset"], train["ratings"].mean(0), rtol=1e-5)
    assert final["combined_pearson"] >= 0.9  # the 1/K-weighted sum of outputs vs of ratings
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert {"train/pearson_k0", "train/mse_k2", "train/loss"} <= set(lines[0])
    assert {"eval/pearson_k1", "eval/mse_k0", "eval/combined_pearson"} <= set(lines[-1])


def test_resume_gives_identical_params_and_metrics(tmp_path):
    def config(stop=0):
        c = _one_device(rated_config.get_config("synthetic"))
        c.synthetic.update(num_train_records=128, num_eval_records=32)
        c.data.update(batch_size=16, eval_batch_size=32)
        c.train = defaults.train(num_steps=6, log_every=1)
        c.train.update(progress_bar=False, checkpoint_every=3, stop_after_steps=stop)
        return c

    straight = driver.run(config(), str(tmp_path / "straight"))
    assert driver.run(config(stop=3), str(tmp_path / "resumed"))["stopped_at"] == 3
    resumed = driver.run(config(), str(tmp_path / "resumed"))
    jax.tree.map(np.testing.assert_array_equal, resumed["state"].params, straight["state"].params)
    lines = lambda name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    assert lines("resumed") == lines("straight")  # every metric of every step, bit for bit
    assert [r["step"] for r in lines("resumed")] == [1, 2, 3, 4, 5, 6, 6]


def test_scoring_combinations_are_the_objectives_library_functions():
    rng = np.random.default_rng(0)
    r, ref = rng.normal(size=(6, 3)), rng.normal(size=(9, 3))
    c = rated_config.get_config("synthetic").scoring
    np.testing.assert_allclose(driver.combine_objectives(r, c, ref), r.mean(1), rtol=1e-6)
    c.weights = (0.5, 2.0, -1.0)
    np.testing.assert_allclose(driver.combine_objectives(r, c, ref),
                               weighted_objective_sum(jnp.asarray(r), jnp.asarray(c.weights)), rtol=1e-6)
    c.combine, c.quantile = "log_sigmoid_and", 0.5
    want = combine_log_sigmoid(jnp.asarray(r), jnp.broadcast_to(jnp.asarray(ref), (6, 9, 3)), quantile=0.5)
    got = driver.combine_objectives(r, c, ref)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    hand = np.log(1 / (1 + np.exp(-(r - np.median(ref, axis=0))))).sum(1)  # Σ_k log σ(r_k − median_k)
    np.testing.assert_allclose(got, hand, rtol=1e-5)


# ----------------------------------------------------- HelpSteer-style files


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An HF checkpoint dir: a tiny random Llama + a character-BPE ChatML tokenizer."""
    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=4, pad_id=0, add_bos=True, chat_template=CHATML,
                    stop_ids=(4,))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, rope_theta=1000.0, max_position_embeddings=128)
    params = unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return str(jaxreward.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, params, tok))


def _record(i, **drop):
    rec = {"prompt": f"question {i}?" if i % 3 else [{"role": "user", "content": f"chat {i}"}],
           "response": f"answer number {i}"}
    rec.update({a: (i + j) % 5 for j, a in enumerate(HS)})
    for key in drop:
        rec.pop(key)
    return rec


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _helpsteer_config(checkpoint, train_path, **data):
    c = _one_device(rated_config.get_config("smollm2_helpsteer"))
    c.model.pretrained = checkpoint
    c.data.update(train_path=train_path, max_length=40, batch_size=4, eval_batch_size=4,
                  num_eval_records=4, **data)
    c.reward.trainable_blocks = 1
    c.train = defaults.train(num_steps=2, log_every=1)
    c.train.progress_bar = False
    return c


def test_helpsteer_file_trains_reports_and_exports(tiny_checkpoint, tmp_path, capsys):
    recs = [_record(i) for i in range(14)]
    recs[5] = _record(5, correctness=None)  # a line without one attribute: skipped, reported
    path = _write(tmp_path / "hs.jsonl", recs)
    config = _helpsteer_config(tiny_checkpoint, path)
    driver.check_config(config)
    out = driver.run(config, str(tmp_path / "run"))
    printed = capsys.readouterr().out
    assert ("hs.jsonl: read 14 lines (attributes): kept 13, skipped 1 "
            "(missing field 'correctness': 1 [hs.jsonl:6])") in printed
    assert "held out 4 of 13 rated records" in printed
    assert "train: tokenized 9 rated responses: kept 9" in printed
    assert out["names"] == list(HS)
    assert {f"pearson_{a}" for a in HS} <= set(out["eval"]) and out["eval"]["num_records"] == 4
    ratings = json.loads((tmp_path / "run" / "reward_model" / "ratings.json").read_text())
    assert ratings["objectives"] == list(HS)
    rm, _, meta = load_reward_model(str(tmp_path / "run" / "reward_model"))
    assert rm.num_objectives == 5 and meta["pretrained"] == tiny_checkpoint
    # The train split's mean ratings are the stored offsets (9 records of 13, seeded split).
    kept = [r for i, r in enumerate(recs) if i != 5]
    order = np.random.default_rng(config.seed).permutation(13)
    means = np.mean([[kept[i][a] for a in HS] for i in order[:9]], axis=0)
    np.testing.assert_allclose(ratings["rating_offset"], means, rtol=1e-6)


def test_bad_rated_lines_are_named_by_file_line_and_field(tiny_checkpoint, tmp_path):
    recs = [_record(i) for i in range(8)]
    recs[2] = _record(2, correctness=None)
    config = _helpsteer_config(tiny_checkpoint, _write(tmp_path / "missing.jsonl", recs), on_error="raise")
    with pytest.raises(DataError, match=r"missing\.jsonl:3: field 'correctness': missing field"):
        driver.run(config, str(tmp_path / "a"))

    lists = [{"prompt": f"q{i}", "response": f"a{i}", "ratings": [1, 2, 3, 4, 0]} for i in range(8)]
    lists[4]["ratings"] = [1, 2, 3, 4]
    config = _helpsteer_config(tiny_checkpoint, _write(tmp_path / "count.jsonl", lists), on_error="raise",
                               attributes=())
    with pytest.raises(DataError,
                       match=r"count\.jsonl:5: field 'ratings': wrong ratings count \(expected 5, got 4\)"):
        driver.run(config, str(tmp_path / "b"))

    lists[4]["ratings"] = [1, 2, "three", 4, 0]
    config = _helpsteer_config(tiny_checkpoint, _write(tmp_path / "value.jsonl", lists), on_error="raise",
                               attributes=())
    with pytest.raises(DataError, match=r"value\.jsonl:5: field 'ratings\[2\]': bad rating"):
        driver.run(config, str(tmp_path / "c"))

    # Names and head size that disagree are refused before anything loads.
    config = _helpsteer_config(tiny_checkpoint, str(tmp_path / "value.jsonl"), attributes=HS[:3])
    with pytest.raises(defaults.ConfigError, match=r"data.attributes \(3 names.*reward.num_objectives=5"):
        driver.check_config(config)


def test_a_rating_beyond_float32_is_a_bad_rating_naming_the_line(tiny_checkpoint, tmp_path):
    # 1e308 is a finite Python float, but float32 makes it inf: the run used to
    # train on it and stop with "non-finite loss inf ... diverged". Now the
    # reader names it (on_error=raise) or skips and counts it.
    recs = [_record(i) for i in range(14)]
    recs[6]["helpfulness"] = 1e308
    config = _helpsteer_config(tiny_checkpoint, _write(tmp_path / "huge.jsonl", recs), on_error="raise")
    with pytest.raises(DataError, match=r"huge\.jsonl:7: field 'helpfulness': bad rating.*beyond the float32"):
        driver.run(config, str(tmp_path / "run"))
