"""jaxreward/models/reward_io.py: `reward_model.json` fields of the wrong type
are refused by `load_reward_model` as a `CorruptFileError` naming the file and
the field (digest and architecture checks are in tests/train/test_checkpoint.py)."""
import json

import jax
import jax.numpy as jnp
import pytest

from jaxreward.errors import CorruptFileError
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import LlamaConfig
from jaxreward.models.reward_io import export_reward_model, load_reward_model
from jaxreward.train.step import unbox

TINY = dict(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
            max_position_embeddings=32)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    rm = RewardModel(LlamaConfig(**TINY), num_objectives=2)
    params = unbox(rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    directory = tmp_path_factory.mktemp("rm") / "reward_model"
    export_reward_model(str(directory), rm, params, pretrained="random")
    return directory


def test_the_export_loads(export):
    rm, _, meta = load_reward_model(str(export))
    assert rm.num_objectives == 2 and meta["pretrained"] == "random"


@pytest.mark.parametrize("change, message", [
    ({"num_objectives": "2"}, "field 'num_objectives' must be a positive integer, got '2'"),
    ({"num_objectives": True}, "field 'num_objectives' must be a positive integer, got True"),
    ({"num_objectives": 0}, "field 'num_objectives' must be a positive integer, got 0"),
    ({"pooling": "max"}, "field 'pooling' must be \"last\" or \"mean\", got 'max'"),
    ({"pretrained": 5}, "field 'pretrained' must be a string"),
    ({"params_sha256": ["x"]}, "field 'params_sha256' must be an object"),
    ({"llama_config": [1]}, "field 'llama_config' must be an object of LlamaConfig fields"),
    ({"llama_config.hidden_size": 16.0}, "field 'llama_config.hidden_size' must be a positive integer, got 16.0"),
    ({"llama_config.num_layers": "1"}, "field 'llama_config.num_layers' must be a positive integer, got '1'"),
    ({"llama_config.head_dim": 0}, "field 'llama_config.head_dim' must be a positive integer or null"),
    ({"llama_config.rms_norm_eps": "1e-5"}, "field 'llama_config.rms_norm_eps' must be a positive number"),
    ({"llama_config.tie_embeddings": 1}, "field 'llama_config.tie_embeddings' must be true or false"),
    ({"llama_config.dtype": None}, "field 'llama_config.dtype' must be a string"),
    ({"llama_config.layers": 2}, "field 'llama_config.layers' is not a LlamaConfig field"),
    ({"llama_config.attention_query_chunk": -1}, "field 'llama_config.attention_query_chunk' must be an integer >= 0"),
])
def test_reward_model_json_with_wrong_field_type_is_corrupt_file_error(export, tmp_path, change, message):
    """reward_model.json with "num_objectives": "2" was not caught by
    load_reward_model (RewardModel is built lazily): a jax TypeError ("Shapes
    must be 1D sequences of concrete values of integer type, got (16, '2')")
    escaped from params_mismatch, so evaluate_rm exited with a traceback,
    although the docstring promises CorruptFileError. Every field read is typed now."""
    import shutil
    directory = tmp_path / "reward_model"
    shutil.copytree(export, directory)
    meta = json.loads((directory / "reward_model.json").read_text())
    for key, value in change.items():
        node, _, field = key.rpartition(".")
        (meta[node] if node else meta)[field] = value
    (directory / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError) as info:
        load_reward_model(str(directory))
    assert str(info.value).startswith(f"{directory / 'reward_model.json'} is damaged or not a reward-model export")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_reward_model_exported_with_one_attention_chunk_loads_back(tmp_path):
    """attention_query_chunk = 0 ("one chunk") is a setting, not a size: the
    loader once refused it as "must be a positive integer, got 0"."""
    rm = RewardModel(LlamaConfig(**TINY, attention_query_chunk=0), num_objectives=1)
    params = unbox(rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    export_reward_model(str(tmp_path / "rm"), rm, params, pretrained="random")
    loaded, _, _ = load_reward_model(str(tmp_path / "rm"))
    assert loaded.config.attention_query_chunk == 0
