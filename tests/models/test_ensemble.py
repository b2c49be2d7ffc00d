"""jaxreward/models/ensemble.py: scoring equals the objectives library's
aggregates, export/load round trip and its errors, and one vmapped step
equals E separate train steps."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward import parallel
from jaxreward.data import synthetic
from jaxreward.data.pipeline import GrainLoader
from jaxreward.errors import CorruptFileError, UserError
from jaxreward.models import ensemble
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import Decoder, LlamaConfig, positions_from_mask
from jaxreward.models.reward_io import load_reward_model
from jaxreward.objectives.reward import ENSEMBLE_MODES, ensemble_reward
from jaxreward.sampling.best_of_n import best_of_n
from jaxreward.sampling.sampler import SampleBatch
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop, pairwise
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib
from jaxreward.train.step import unbox

CFG = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=1000.0, max_position_embeddings=32)
E = 3


def _members(rm, n=E):
    dummy = jnp.zeros((1, 4), jnp.int32)
    return [unbox(rm.init(jax.random.PRNGKey(10 + e), dummy)["params"]) for e in range(n)]


def _sample_batch(R=7, P=4, M=5, seed=0):
    """A SampleBatch with left-padded prompts and ragged responses (only the
    fields reward functions read are meaningful)."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(1, P + 1, R)
    m_len = rng.integers(0, M + 1, R)
    prompt_mask = np.arange(P)[None] >= (P - p_len)[:, None]
    resp_mask = np.arange(M)[None] < m_len[:, None]
    prompt = np.where(prompt_mask, rng.integers(1, CFG.vocab_size, (R, P)), 0).astype(np.int32)
    resp = np.where(resp_mask, rng.integers(1, CFG.vocab_size, (R, M)), 0).astype(np.int32)
    tokens = np.concatenate([prompt, resp], 1)
    mask = np.concatenate([prompt_mask, resp_mask], 1)
    zeros = np.zeros(tokens.shape, np.float32)
    return SampleBatch(tokens_RL=jnp.asarray(tokens), attention_mask_RL=jnp.asarray(mask),
                       loss_mask_RL=jnp.asarray(np.concatenate([np.zeros_like(prompt_mask), resp_mask], 1)),
                       positions_RL=positions_from_mask(jnp.asarray(mask)),
                       sample_logps_RL=jnp.asarray(zeros), prompt_tokens_RP=jnp.asarray(prompt),
                       prompt_mask_RP=jnp.asarray(prompt_mask), response_tokens_RM=jnp.asarray(resp),
                       response_mask_RM=jnp.asarray(resp_mask), prompt_length=P)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    rm = RewardModel(CFG, num_objectives=2)
    members = _members(rm)
    directory = str(tmp_path_factory.mktemp("ens") / "reward_ensemble")
    ensemble.export_ensemble(directory, rm, ensemble.stack(members), "random", extra={"seeds": [10, 11, 12]})
    return rm, members, directory


def test_ensemble_scores_equal_the_objectives_library_on_member_rewards(exported):
    rm, members, directory = exported
    batch = _sample_batch()
    with open(os.path.join(directory, "ensemble.json")) as f:
        meta = json.load(f)
    assert meta["members"] == E and meta["member_dirs"] == ["member_0", "member_1", "member_2"]
    assert meta["seeds"] == [10, 11, 12]
    # Each member folder is an ordinary reward-model export; score each alone.
    alone = []
    for e in range(E):
        rm_e, p_e, _ = load_reward_model(os.path.join(directory, f"member_{e}"))
        out = rm_e.apply({"params": p_e}, batch.tokens_RL, batch.attention_mask_RL, batch.positions_RL)
        alone.append(np.asarray(out)[:, 1])
        jax.tree.map(np.testing.assert_array_equal, p_e, members[e])  # exported exactly
    alone_ER = np.stack(alone)
    assert alone_ER.std(axis=0).min() > 1e-4  # members really differ
    lam = 0.7
    hand = {"mean": alone_ER.mean(0), "min": alone_ER.min(0),
            "mean_minus_std": alone_ER.mean(0) - lam * alone_ER.std(0)}  # population std (ddof 0)
    for mode in ENSEMBLE_MODES:
        fn, rm2, meta = ensemble.load_reward_model_or_ensemble(directory, aggregate=mode, std_coef=lam,
                                                               objective=1)
        assert meta["members"] == E and rm2.num_objectives == 2
        got = np.asarray(fn(batch))
        assert got.shape == (7,) and got.dtype == np.float32
        want = np.asarray(ensemble_reward(jnp.asarray(alone_ER), mode, std_coef=lam))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(got, hand[mode], rtol=1e-5, atol=1e-6, err_msg=mode)
    # Scoring in fixed-size chunks (the last one padded) gives the same rewards.
    chunked, _, _ = ensemble.load_reward_model_or_ensemble(directory, aggregate=mode, std_coef=lam,
                                                           objective=1, chunk_size=3)
    np.testing.assert_allclose(np.asarray(chunked(batch)), got, rtol=1e-6, atol=1e-6)
    # A single-model folder goes through the same entry point.
    single, _, meta = ensemble.load_reward_model_or_ensemble(os.path.join(directory, "member_2"), objective=1)
    assert meta["members"] == 1
    np.testing.assert_allclose(np.asarray(single(batch)), alone_ER[2], rtol=1e-6, atol=1e-6)


def test_best_of_n_ranks_by_the_aggregate(exported):
    rm, members, directory = exported
    fn, _, _ = ensemble.load_reward_model_or_ensemble(directory, aggregate="mean_minus_std", std_coef=1.0)
    policy = Decoder(CFG)
    pp = unbox(policy.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))["params"])
    prompts = np.random.default_rng(1).integers(1, CFG.vocab_size, (2, 3)).astype(np.int32)
    out = best_of_n(policy, pp, prompts, np.ones_like(prompts, bool), fn, n=4,
                    rng=jax.random.PRNGKey(2), max_new_tokens=4, reward_chunk_size=3)
    members_ER = np.asarray(ensemble.member_rewards_fn(rm, ensemble.stack(members))(out.samples.sequences()))
    want = members_ER.mean(0) - members_ER.std(0)
    np.testing.assert_allclose(np.asarray(out.rewards_BN).ravel(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.best_index_B), want.reshape(2, 4).argmax(1))


def test_bad_ensemble_folders_and_options_are_named(exported, tmp_path):
    _, _, directory = exported
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy)
    with pytest.raises(UserError, match="aggregate 'median' is not one of mean, min, mean_minus_std"):
        ensemble.load_reward_model_or_ensemble(copy, aggregate="median")
    with pytest.raises(UserError, match="std_coef must be a finite number >= 0"):
        ensemble.load_reward_model_or_ensemble(copy, aggregate="mean_minus_std", std_coef=-1.0)
    with pytest.raises(FileNotFoundError, match="neither ensemble.json nor reward_model.json"):
        ensemble.load_reward_model_or_ensemble(str(tmp_path))
    shutil.rmtree(os.path.join(copy, "member_1"))
    with pytest.raises(CorruptFileError, match="member folder member_1 is missing"):
        ensemble.load_reward_model_or_ensemble(copy)
    with open(os.path.join(copy, "ensemble.json"), "w") as f:
        f.write('{"members": 3')
    with pytest.raises(CorruptFileError, match="ensemble.json is damaged"):
        ensemble.load_reward_model_or_ensemble(copy)


def _batch_size_mesh(mesh_shape):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    return parallel.make_mesh(*mesh_shape, devices=devices)


def test_one_vmapped_step_equals_separate_member_steps_and_resumes_exactly(tmp_path):
    """Two members (own head seed, own batch order, trainable top block only,
    a clip small enough to act): one ensemble step on a 2x2x2 mesh equals each
    member's own `make_train_step` on one device, for 3 steps; restoring the
    step-2 checkpoint (stacked state + every member's batch position) and
    stepping again gives step 3 bit for bit."""
    rm = RewardModel(CFG, num_objectives=1, frozen_blocks=1)
    task = synthetic.CountingTask(CFG.vocab_size, 4, 6, seed=0)
    pairs, _ = synthetic.random_pairs(task, 64, seed=1)
    opt = defaults.optimizer(learning_rate=3e-3, warmup_steps=1)
    opt.max_grad_norm = 0.05
    opt.weight_decay = 0.01
    tx, schedule = state_lib.make_optimizer(opt, 10, state_lib.block_trainable(2, 1))
    boxed = rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    loss_fn, metrics_fn = pairwise.make_loss_fns(rm, "bradley_terry")
    members = _members(rm, 2)
    seeds = [5, 6]

    one = _batch_size_mesh((1, 1, 1))
    sh1 = step_lib.state_shardings(one, boxed, tx)
    single_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, one, sh1)
    singles = []
    for e in range(2):
        state = jax.jit(lambda p: state_lib.init_state(p, tx, seeds[e]), out_shardings=sh1)(members[e])
        loader = GrainLoader(pairs, 8, seed=seeds[e])
        mets = []
        for _ in range(3):
            state, m = single_step(state, parallel.shard_batch(next(loader), one))
            mets.append(jax.device_get(m))
        singles.append((state, mets))

    mesh = _batch_size_mesh((2, 2, 2))
    sh = step_lib.state_shardings(mesh, boxed, tx)
    ens_step = ensemble.make_ensemble_train_step(loss_fn, metrics_fn, tx, schedule, mesh, sh)
    make = jax.jit(lambda p: ensemble.init_ensemble_state(p, tx, seeds),
                   out_shardings=ensemble.stacked_shardings(sh))
    state = make(ensemble.stack(members))
    batches = ensemble.MemberBatches([GrainLoader(pairs, 8, seed=s) for s in seeds])
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    for i in range(3):
        if i == 2:
            checkpointer.save(2, state, batches.state())
            checkpointer.wait()
        state, m = ens_step(state, parallel.shard_batch(next(batches), mesh))
        m = jax.device_get(m)
        for e in range(2):
            for k, v in singles[e][1][i].items():
                want = v if k == "learning_rate" else m[k][e]
                np.testing.assert_allclose(want, v, rtol=2e-5, atol=1e-6, err_msg=f"{k} step {i} member {e}")
        assert m["grad_norm"].min() > opt.max_grad_norm  # the clip acted, per member
    assert int(state.step) == 3
    assert batches.state() == {"members": [{"epoch": 0, "index": 3}] * 2}
    for e in range(2):
        got, want = ensemble.member(state.params, e), singles[e][0].params
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    fresh = ensemble.MemberBatches([GrainLoader(pairs, 8, seed=s) for s in seeds])
    restored, resumed = loop.restore_or_init(checkpointer, make, (ensemble.stack(members),),
                                             ensemble.stacked_shardings(sh), fresh)
    assert resumed and int(restored.step) == 2 and fresh.state() == {"members": [{"epoch": 0, "index": 2}] * 2}
    restored, _ = ens_step(restored, parallel.shard_batch(next(fresh), mesh))
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
    checkpointer.close()
    # The frozen bottom block did not move in either member.
    jax.tree.map(np.testing.assert_array_equal, state.params["backbone"]["layers_0"],
                 ensemble.stack(members)["backbone"]["layers_0"])


def test_best_of_n_job_takes_an_ensemble_dir_like_a_single_model(tmp_path):
    """experiments/best_of_n.py with a tiny HF policy: `reward_model_dir` = an
    ensemble export ranks by `ensemble.aggregate` of exactly the rewards each
    member folder gives when passed alone."""
    import jaxreward
    from configs import best_of_n as bon_config
    from experiments import best_of_n as bon_driver
    from jaxreward.data.tokenizer import Tokenizer
    from tests.data.conftest import CHATML, build_hf_bpe

    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=4, pad_id=0, add_bos=True, chat_template=CHATML,
                    stop_ids=(4,))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, rope_theta=1000.0, max_position_embeddings=128)
    policy = unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    ckpt = str(jaxreward.save_pretrained(tmp_path / "policy", cfg, policy, tok))
    rm = RewardModel(cfg)
    ens_dir = str(tmp_path / "reward_ensemble")
    ensemble.export_ensemble(ens_dir, rm, ensemble.stack(_members(rm, 2)), ckpt)
    (tmp_path / "prompts.txt").write_text("hi there\nsay the cat\n")

    def run(reward_dir, name, **ens):
        c = bon_config.get_config("smollm2")
        c.model.pretrained = ckpt
        c.update(reward_model_dir=reward_dir, prompts_path=str(tmp_path / "prompts.txt"), n=3,
                 prompt_batch_size=2)
        c.sampling.update(max_new_tokens=4, temperature=1.0, top_p=1.0)
        if ens:
            c.ensemble = dict(ens)  # the config block best_of_n reads (see the driver)
        bon_driver.check_config(c)
        os.makedirs(tmp_path / name)
        return bon_driver.run(c, str(tmp_path / name))

    members = [run(os.path.join(ens_dir, f"member_{e}"), f"m{e}") for e in range(2)]
    both = run(ens_dir, "ens", aggregate="mean_minus_std", std_coef=0.5)
    for i, row in enumerate(both):
        assert row["completions"] == members[0][i]["completions"] == members[1][i]["completions"]
        r_ER = np.asarray([m[i]["rewards"] for m in members])
        want = np.asarray(ensemble_reward(jnp.asarray(r_ER), "mean_minus_std", std_coef=0.5))
        np.testing.assert_allclose(row["rewards"], want, rtol=1e-5, atol=1e-6)
        assert row["best_index"] == int(np.argmax(want))

    # A policy checkpoint without a tokenizer cannot render the chat prompts: one line, not a traceback.
    import shutil
    from jaxreward.errors import UserError
    shutil.copytree(ckpt, tmp_path / "no_tok")
    os.remove(tmp_path / "no_tok" / "tokenizer.json")
    ckpt = str(tmp_path / "no_tok")
    with pytest.raises(UserError, match="model.pretrained=.*no_tok' has no tokenizer; best-of-N renders"):
        run(ens_dir, "wd_no_tok")


# ---------------------------------------------------------------------------
# Jobs that take a reward-model directory: the config's `ensemble` block


def test_reward_fn_for_combines_members_by_the_config_and_checks_the_vocabulary(exported):
    import ml_collections
    rm, members, directory = exported
    batch = _sample_batch(seed=3)
    alone_ER = np.stack([np.asarray(rm.apply({"params": p}, batch.tokens_RL, batch.attention_mask_RL,
                                             batch.positions_RL))[:, 0] for p in members])
    config = ml_collections.ConfigDict(dict(ensemble=defaults.ensemble()))
    config.ensemble.update(aggregate="mean_minus_std", std_coef=0.5)
    fn, name = ensemble.reward_fn_for(config, directory, CFG.vocab_size)
    # mean − 0.5·std over the 3 members (population std), row by row.
    np.testing.assert_allclose(np.asarray(fn(batch)), alone_ER.mean(0) - 0.5 * alone_ER.std(0),
                               rtol=1e-5, atol=1e-6)
    assert name == f"reward-model ensemble {directory} (3 members, mean - 0.5*std)"
    config.ensemble.aggregate = "min"
    fn, name = ensemble.reward_fn_for(config, directory, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(fn(batch)), alone_ER.min(0), rtol=1e-5, atol=1e-6)
    assert name.endswith("(3 members, min)")
    # A config without the block averages; a single export is named as one model.
    fn, _ = ensemble.reward_fn_for(ml_collections.ConfigDict(), directory, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(fn(batch)), alone_ER.mean(0), rtol=1e-5, atol=1e-6)
    member = os.path.join(directory, "member_1")
    fn, name = ensemble.reward_fn_for(config, member, CFG.vocab_size, objective=1)
    assert name == f"reward model {member}"
    with pytest.raises(UserError, match=f"has vocabulary {CFG.vocab_size}, the policy 64: they must share"):
        ensemble.reward_fn_for(config, directory, 64)
    config.ensemble.std_coef = -1.0
    with pytest.raises(UserError, match="std_coef must be a finite number >= 0"):
        ensemble.reward_fn_for(config, directory, CFG.vocab_size)


def test_config_checks_name_the_field(exported, tmp_path):
    import ml_collections
    _, _, directory = exported
    c = ml_collections.ConfigDict(dict(reward=dict(reward_model_dir=str(tmp_path)), ensemble=defaults.ensemble()))
    with pytest.raises(defaults.ConfigError, match=r"config field reward\.reward_model_dir: .* has neither "
                                                    r"reward_model\.json nor ensemble\.json"):
        ensemble.check_export_dir(c, "reward.reward_model_dir")
    for ok in (directory, os.path.join(directory, "member_0")):
        c.reward.reward_model_dir = ok
        ensemble.check_export_dir(c, "reward.reward_model_dir")
    ensemble.check_config_block(c)
    c.ensemble.aggregate = "median"
    with pytest.raises(defaults.ConfigError, match=r"ensemble\.aggregate"):
        ensemble.check_config_block(c)
    c.ensemble.update(aggregate="min", std_coef=float("nan"))
    with pytest.raises(defaults.ConfigError, match=r"ensemble\.std_coef"):
        ensemble.check_config_block(c)


def test_export_digest_changes_with_a_member(exported, tmp_path):
    _, _, directory = exported
    copy = str(tmp_path / "copy")
    shutil.copytree(directory, copy)
    assert ensemble.export_digest(copy) == ensemble.export_digest(directory)
    path = os.path.join(copy, "member_2", "reward_model.json")
    meta = json.load(open(path))
    meta["params_sha256"] = "of other weights"   # as if that member were re-trained
    json.dump(meta, open(path, "w"))
    assert ensemble.export_digest(copy) != ensemble.export_digest(directory)
    single = os.path.join(directory, "member_0")
    import hashlib
    with open(os.path.join(single, "reward_model.json"), "rb") as f:   # a single export: its JSON's sha256
        assert ensemble.export_digest(single) == hashlib.sha256(f.read()).hexdigest()[:16]


def test_members_of_another_head_or_backbone_are_refused(exported, tmp_path):
    from jaxreward.models.reward_io import export_reward_model
    rm, members, directory = exported
    other_head = str(tmp_path / "head")
    shutil.copytree(directory, other_head)
    one = RewardModel(CFG, num_objectives=1)
    shutil.rmtree(os.path.join(other_head, "member_2"))
    export_reward_model(os.path.join(other_head, "member_2"), one, _members(one, 1)[0], "random")
    with pytest.raises(CorruptFileError, match="member member_2 has a different architecture, head size"):
        ensemble.load_ensemble(other_head)
    # Same shapes, another backbone (its tokenizer): loaded silently before.
    other_backbone = str(tmp_path / "backbone")
    shutil.copytree(directory, other_backbone)
    shutil.rmtree(os.path.join(other_backbone, "member_1"))
    export_reward_model(os.path.join(other_backbone, "member_1"), rm, members[1], "smollm2-135m-instruct")
    with pytest.raises(CorruptFileError, match="member member_1 was exported from backbone "
                                               "'smollm2-135m-instruct', member_0 from 'random'"):
        ensemble.load_reward_model_or_ensemble(other_backbone)


def test_export_to_a_file_path_is_one_user_error(exported, tmp_path):
    """A file where a reward-model or ensemble export goes: one UserError naming it
    (was a NotADirectoryError from orbax's save thread, with its thread traceback)."""
    from jaxreward.models.reward_io import export_reward_model
    rm, members, _ = exported
    (tmp_path / "reward_model").write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot export to .*reward_model: File exists \(a file, not a folder\)"):
        export_reward_model(str(tmp_path / "reward_model"), rm, members[0], "random")
    (tmp_path / "reward_ensemble").write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot export to .*reward_ensemble/member_0: Not a directory"):
        ensemble.export_ensemble(str(tmp_path / "reward_ensemble"), rm, ensemble.stack(members), "random")
