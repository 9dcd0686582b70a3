import pytest
import yaml

import breadcrumbs_jax as bj
from breadcrumbs_jax import MergeError
from breadcrumbs_jax.config import load_config, parse_config

BASE = {"base_model": "/m/base", "models": [{"path": "/m/a"}, {"path": "/m/b"}]}


def cfg(**kw):
    return parse_config({**BASE, **kw})


@pytest.mark.parametrize(
    "data, where",
    [
        ({**BASE, "methdo": "ties"}, "methdo: unknown key (allowed here: base_model, models, method"),
        ({**BASE, "models": [{"path": "/a"}, {"path": "/b", "params": {"densty": 0.1}}]},
         "models.1.params.densty: unknown key (allowed here: beta, gamma, density, gamma_top, p)"),
        ({**BASE, "rules": [{"pattern": "*", "acton": "base"}]}, "rules.0.acton: unknown key"),
        ({**BASE, "output": {"format": "orbax", "shards": 2}}, "output.shards: unknown key (allowed here: format, shard_size)"),
        ({**BASE, "params": {"alpha": 0.5, "lambda": 1}}, "params.lambda: unknown key"),
    ],
)
def test_unknown_keys_are_named_with_their_location(data, where):
    with pytest.raises(MergeError) as e:
        parse_config(data, "merge.yaml")
    assert str(e.value).startswith("merge.yaml: ")
    assert where in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"models": [{"path": "/a"}]}, "base_model: required key missing"),
        ({**BASE, "models": []}, "models: List should have at least 1 item"),
        ({**BASE, "models": [{"path": "/a", "weight": "heavy"}]}, "models.0.weight: Input should be a valid number"),
        ({**BASE, "output": {"format": "onnx"}}, "output.format: Input should be 'orbax', 'safetensors' or 'msgpack'"),
        ({**BASE, "output": {"shard_size": "5 parsecs"}}, "output.shard_size: Value error, not a size"),
        ({**BASE, "method": "soup"}, "method: unknown method 'soup'; known: linear"),
        ({**BASE, "params": {"p": 0.5}}, "params.p: method 'breadcrumbs' has no parameter 'p'"),
        ({**BASE, "models": [{"path": "/a", "params": {"p": 0.3}}]}, "models.0.params.p: method 'breadcrumbs' has no parameter 'p'"),
        ({**BASE, "params": {"density": 0.7, "gamma_top": 0.5}}, "params: density (0.7) + gamma_top (0.5) must not exceed 1"),
        ([1, 2], "the config must be a mapping"),
    ],
)
def test_bad_values_are_one_line_errors(data, message):
    with pytest.raises(MergeError, match="^merge.yaml: ") as e:
        parse_config(data, "merge.yaml")
    assert message in str(e.value)


def test_per_model_parameters_reach_the_method():
    c = cfg(
        models=[{"path": "/a", "weight": 0.5, "params": {"density": 0.2}}, {"path": "/b"}],
        params={"alpha": 0.3, "density": 0.1, "gamma_top": 0.01, "granularity": "row"},
    )
    expected = bj.breadcrumbs(0.3, density=(0.2, 0.1), gamma_top=0.01, granularity="row", weights=(0.5, 1.0))
    assert c.method_obj() == expected
    dare = cfg(method="dare", models=[{"path": "/a", "params": {"p": 0.3}}, {"path": "/b"}], params={"seed": 4})
    assert dare.method_obj() == bj.dare(p=(0.3, 0.9), seed=4)
    assert cfg(method="ties").method_obj() == bj.ties()


def test_mergekit_style_breadcrumbs_config():
    """mergekit's per-model density / gamma / weight map to density / gamma_top / weight."""
    c = cfg(models=[{"path": "/a", "weight": 0.6, "params": {"density": 0.9, "gamma_top": 0.02}},
                    {"path": "/b", "weight": 0.4, "params": {"density": 0.8, "gamma_top": 0.01}}])
    assert c.method_obj() == bj.breadcrumbs(density=(0.9, 0.8), gamma_top=(0.02, 0.01), weights=(0.6, 0.4))


def test_rules_inherit_the_run_parameters_for_the_same_method():
    c = cfg(params={"alpha": 0.3, "beta": 0.8, "gamma": 0.99},
            rules=[{"pattern": "*embed*", "action": "base"},
                   {"pattern": "*norm*", "params": {"alpha": 0.1}},
                   {"pattern": "*head*", "method": "task_arithmetic", "params": {"alpha": 0.2}, "out_axis": 0}])
    embed, norm, head = c.leaf_rules()
    assert embed == bj.LeafRule("*embed*", action="base")
    assert norm.method == bj.breadcrumbs(0.1, beta=0.8, gamma=0.99)
    assert head == bj.LeafRule("*head*", bj.task_arithmetic(0.2), out_axis=0)


def test_sizes_and_relative_paths(tmp_path):
    assert cfg(output={"shard_size": "5GB"}).output.shard_size == 5 * 10**9
    assert cfg(output={"shard_size": "500MiB"}).output.shard_size == 500 * 2**20
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base_model": "base", "models": [{"path": "/abs/ft"}]}))
    c = load_config(tmp_path / "c.yaml")
    assert c.base_model == str(tmp_path / "base") and c.models[0].path == "/abs/ft"


def test_yaml_syntax_error_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("base_model: a\nmodels: [\n")
    with pytest.raises(MergeError, match=r"bad.yaml: invalid YAML at line \d+"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(MergeError, match="cannot read the config"):
        load_config(tmp_path / "none.yaml")
