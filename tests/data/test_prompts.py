"""jaxreward/data/prompts.py: the RL prompt sampler (once per epoch, no repeat in a
step, exact resume), group expansion, the whole-groups sharding check, DAPO's filter."""
import json

import numpy as np
import pytest

from jaxreward.data.prompts import PromptSampler, expand_groups, filter_degenerate_groups, group_shard_check

COMBOS = [(n, b) for n in [*range(1, 14), 50] for b in range(1, 8) if b <= n]


def stream(sampler, steps):
    return [sampler.next() for _ in range(steps)]


@pytest.mark.parametrize("num_prompts, B", COMBOS)
def test_each_prompt_once_per_epoch_and_never_twice_in_a_step(num_prompts, B):
    epochs = 4
    sampler = PromptSampler(num_prompts, B, seed=11)
    steps = stream(sampler, epochs * num_prompts // B)  # whole steps within 4 epochs
    for step in steps:
        assert step.dtype == np.int64 and step.shape == (B,)
        assert len(set(step.tolist())) == B  # no duplicate within a step
    flat = np.concatenate(steps)
    for e in range(len(flat) // num_prompts):  # every complete epoch of the stream is a permutation
        assert sorted(flat[e * num_prompts:(e + 1) * num_prompts].tolist()) == list(range(num_prompts))
    tail = flat[len(flat) // num_prompts * num_prompts:]
    assert len(set(tail.tolist())) == len(tail)  # the unfinished epoch repeats nothing either
    assert sampler.epoch == len(flat) // num_prompts


@pytest.mark.parametrize("num_prompts, B", [(7, 3), (10, 4), (50, 7), (5, 5), (13, 6)])
def test_consecutive_steps_share_no_prompt_within_an_epoch(num_prompts, B):
    sampler = PromptSampler(num_prompts, B, seed=2)
    labelled = []  # per step: {(epoch, prompt)}, epoch from the stream position
    for s in range(6 * num_prompts // B):
        labelled.append({((s * B + j) // num_prompts, int(i)) for j, i in enumerate(sampler.next())})
    for previous, step in zip(labelled, labelled[1:]):
        assert not previous & step


def test_stream_is_seeded_permutations_reordered_only_at_a_straddle():
    # 7 prompts, B=3: steps 0,1 lie in epoch 0; step 2 takes epoch 0's last
    # prompt, then epoch 1's first two (which must not include that prompt).
    N, B, seed = 7, 3, 5
    perm = [np.random.default_rng([seed, e]).permutation(N).tolist() for e in range(2)]
    s0, s1, s2 = stream(PromptSampler(N, B, seed), 3)
    assert s0.tolist() + s1.tolist() == perm[0][:6]
    last = perm[0][6]
    epoch1 = [i for i in perm[1] if i != last] + [last]  # the deferred prompt moves to epoch 1's end
    assert s2.tolist() == [last] + epoch1[:2]
    assert PromptSampler(N, B, seed=6).next().tolist() != s0.tolist()
    # B dividing N: no reordering, the stream is the plain permutations.
    flat = np.concatenate(stream(PromptSampler(6, 3, seed), 4)).tolist()
    assert flat == (np.random.default_rng([seed, 0]).permutation(6).tolist()
                    + np.random.default_rng([seed, 1]).permutation(6).tolist())


@pytest.mark.parametrize("num_prompts, B", [(7, 3), (10, 4), (5, 5), (13, 6), (1, 1)])
def test_restore_continues_identically(num_prompts, B):
    straight = stream(PromptSampler(num_prompts, B, seed=9), 5)
    first = PromptSampler(num_prompts, B, seed=9)
    head = stream(first, 2)
    saved = json.loads(json.dumps(first.state()))  # JSON round trip
    fresh = PromptSampler(num_prompts, B, seed=9)
    fresh.restore(saved)
    assert fresh.epoch == first.epoch
    rest = stream(fresh, 3)
    np.testing.assert_array_equal(np.stack(head + rest), np.stack(straight))


def test_state_fields_and_restore_checks():
    sampler = PromptSampler(7, 3, seed=4)
    assert sampler.state() == {"seed": 4, "num_prompts": 7, "epoch": 0, "position": 0, "deferred": []}
    stream(sampler, 3)  # 9 prompts: epoch 0's 7, then 2 of epoch 1 (epoch 0's last one deferred)
    state = sampler.state()
    assert (state["epoch"], state["position"], len(state["deferred"])) == (1, 2, 1) and sampler.epoch == 1
    with pytest.raises(ValueError, match="saved with seed=4, this sampler has seed=5"):
        PromptSampler(7, 3, seed=5).restore(state)
    with pytest.raises(ValueError, match="saved with num_prompts=7, this sampler has num_prompts=8"):
        PromptSampler(8, 3, seed=4).restore(state)
    with pytest.raises(ValueError, match="lacks deferred"):
        PromptSampler(7, 3, seed=4).restore({k: v for k, v in state.items() if k != "deferred"})
    with pytest.raises(ValueError, match="inconsistent for 7 prompts"):
        PromptSampler(7, 3, seed=4).restore({**state, "deferred": [7]})
    with pytest.raises(ValueError, match="inconsistent for 7 prompts"):
        PromptSampler(7, 3, seed=4).restore({**state, "position": 7})
    # Resuming with another B keeps each prompt once per epoch.
    other = PromptSampler(7, 5, seed=4)
    other.restore(state)
    flat = np.concatenate([np.concatenate(stream(PromptSampler(7, 3, seed=4), 3))[7:]]
                          + stream(other, 4)).tolist()  # epoch 1 = 2 + 5 prompts
    assert sorted(flat[:7]) == list(range(7))


@pytest.mark.parametrize("args, message", [
    ((3, 4, 0), "prompts_per_step=4 is more than the 3 prompts: a step cannot hold that many distinct prompts"),
    ((0, 1, 0), "num_prompts must be an integer >= 1, got 0"),
    ((5, 0, 0), "prompts_per_step must be an integer >= 1, got 0"),
    ((5, 2, -1), "seed must be an integer >= 0, got -1"),
    ((5, 2.0, 0), "prompts_per_step must be an integer >= 1, got 2.0"),
])
def test_bad_sampler_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        PromptSampler(*args)


def test_expand_groups_keeps_each_prompts_completions_contiguous():
    rows = expand_groups(np.array([4, 0, 2]), 2)
    assert rows.dtype == np.int64 and rows.tolist() == [4, 4, 0, 0, 2, 2]  # row b·G + j -> prompt b
    assert expand_groups([7], 1).tolist() == [7]
    with pytest.raises(ValueError, match="group_size must be an integer >= 1, got 0"):
        expand_groups([1], 0)
    with pytest.raises(ValueError, match=r"must be 1-D \[B\], got shape \(1, 2\)"):
        expand_groups([[1, 2]], 2)


def test_group_shard_check():
    group_shard_check(R=32, G=4, num_shards=4, micro_batches=2)  # 4 rows per piece = 1 group
    group_shard_check(R=8, G=8, num_shards=1, micro_batches=1)
    with pytest.raises(ValueError, match=r"R=32 rows split over 4 shard\(s\) × 4 micro-batch\(es\) gives 2 rows "
                                         r"per piece, which is not whole groups of G=4: R must be a multiple "
                                         r"of 4×4×4 = 64"):
        group_shard_check(R=32, G=4, num_shards=4, micro_batches=4)
    with pytest.raises(ValueError, match="gives 2.5 rows per piece"):
        group_shard_check(R=10, G=5, num_shards=4, micro_batches=1)
    with pytest.raises(ValueError, match="G=3: R must be a multiple of 1×1×3 = 3"):
        group_shard_check(R=8, G=3, num_shards=1, micro_batches=1)
    with pytest.raises(ValueError, match="num_shards must be an integer >= 1"):
        group_shard_check(R=8, G=2, num_shards=0, micro_batches=1)


def test_filter_degenerate_groups_by_hand():
    # G = 3, four groups: [1,1,1] all right -> drop; [0,0,0] all wrong -> drop;
    # [1,0,1] mixed -> keep; [0.5, 0.5, 0.5000001] differs in float32 -> keep (exact test).
    rewards_R = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0.5, 0.5, 0.5000001], np.float32)
    keep, dropped = filter_degenerate_groups(rewards_R, 3)
    assert keep.dtype == bool and keep.tolist() == [False, False, True, True] and dropped == 2
    keep, dropped = filter_degenerate_groups(np.array([3.0, 3.0]), 1)  # G = 1: no group has a spread
    assert keep.tolist() == [False, False] and dropped == 2
    with pytest.raises(ValueError, match=r"R a multiple of G=3; got shape \(4,\)"):
        filter_degenerate_groups(np.zeros(4), 3)
    with pytest.raises(ValueError, match=r"NaN/inf at rows \[1\]"):
        filter_degenerate_groups(np.array([0.0, np.nan]), 2)
