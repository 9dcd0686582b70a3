"""The digits merging experiment on a tiny configuration (seconds): tasks, training, Orbax
checkpoints, search on validation / scores on test, results, table, plot, and the CLI."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import breadcrumbs_jax as bj
from breadcrumbs_jax.cli import main
from breadcrumbs_jax.experiment import model
from breadcrumbs_jax.experiment.run import Config, _restore, format_table, run
from breadcrumbs_jax.experiment.tasks import TRANSFORMS, digits, task_inputs

METHODS = ("linear", "task_arithmetic", "breadcrumbs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = Config.quick(methods=METHODS)
    out = tmp_path_factory.mktemp("demo")
    return cfg, out, run(cfg, out)


def test_tasks_are_distinct_transformations_of_the_same_digits():
    data = digits(0)
    x = task_inputs(list(TRANSFORMS), data.val.x)
    assert x.shape == (len(TRANSFORMS), len(data.val.y), 64) and x.dtype == np.float32
    for i in range(len(x)):
        assert 0.0 <= x[i].min() and x[i].max() <= 1.0
        for j in range(i):
            assert not np.allclose(x[i], x[j]), (list(TRANSFORMS)[i], list(TRANSFORMS)[j])
    # splits are disjoint and cover the data set
    sizes = [len(s.y) for s in (data.train, data.val, data.test)]
    assert sum(sizes) == 1797 and min(sizes) > 300


def test_unknown_or_repeated_tasks_are_rejected():
    with pytest.raises(bj.MergeError, match="unknown task"):
        Config(tasks=("rot90", "spin"))
    with pytest.raises(bj.MergeError, match="repeat"):
        Config(tasks=("rot90", "rot90"))
    with pytest.raises(bj.MergeError, match="search_tasks"):
        Config(tasks=("rot90", "invert"), search_tasks=3)


def test_finetuned_beats_zero_shot_on_its_task(tiny):
    cfg, _, res = tiny
    (r,) = res["runs"]
    for t in cfg.tasks:
        assert r["finetuned"][t] > r["zero_shot"][t] + 0.05, t


def test_results_structure_search_on_val_and_scores_on_test(tiny):
    cfg, out, res = tiny
    (r,) = res["runs"]
    assert sorted(r["order"]) == sorted(cfg.tasks)
    assert r["search_tasks"] == r["order"][: cfg.search_tasks]
    for m in METHODS:
        chosen = r["search"][m]
        assert set(chosen["params"]) == ({"alpha"} if m != "linear" else set()) | set(cfg.grids[m])
        assert chosen["trials"] == max(1, len(cfg.alphas) * (m != "linear"))
        assert set(r["merged"][m]) == {str(n) for n in cfg.counts}
        for n in cfg.counts:
            accs = r["merged"][m][str(n)]
            assert list(accs) == r["order"][:n]
            assert all(0.0 <= a <= 1.0 for a in accs.values())
    summary = res["summary"]
    assert set(summary["curves"]) == {"zero_shot", *METHODS}
    T = len(cfg.tasks)
    for row in ("zero_shot", "finetuned", *METHODS):
        v = summary["table_T"][row]
        mean_norm = np.mean([v["per_task"][t] / r["finetuned"][t] for t in cfg.tasks])
        assert v["norm"]["mean"] == pytest.approx(mean_norm)
    assert summary["table_T"]["finetuned"]["norm"]["mean"] == pytest.approx(1.0)
    assert summary["curves"]["task_arithmetic"][str(T)]["abs"]["mean"] == pytest.approx(
        np.mean(list(r["merged"]["task_arithmetic"][str(T)].values())))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(summary))
    table = (out / "results.md").read_text()
    assert table.strip() == format_table(cfg, summary)
    assert "| breadcrumbs |" in table and "n=2" in table


def test_checkpoints_restore_and_merge_reproduces_the_recorded_accuracy(tiny):
    cfg, out, res = tiny
    (r,) = res["runs"]
    graphdef, like = model.init(cfg.hidden, 0)
    ckpts = out / "checkpoints" / "seed0"
    pre = _restore(ckpts / "pretrained", like)
    states = {t: _restore(ckpts / t, like) for t in cfg.tasks}
    tasks = r["order"]
    merged = bj.merge(pre["body"], [states[t]["body"] for t in tasks],
                      bj.get_method("task_arithmetic", **r["search"]["task_arithmetic"]["params"])).params
    assert bj.paths.flatten(merged)[0] == ["fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"]
    data = digits(0)
    x = task_inputs(tasks, data.test.x)
    for i, t in enumerate(tasks):
        logits = model.logits(graphdef, merged, states[t]["head"], x[i])
        acc = float(np.mean(np.argmax(logits, -1) == data.test.y))
        assert acc == pytest.approx(r["merged"]["task_arithmetic"][str(len(tasks))][t], abs=1.5 / len(data.test.y))


def test_plot_is_a_png(tiny):
    _, out, _ = tiny
    png = (out / "normalized_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_demo_quick(tmp_path, capsys, tiny):
    out = tmp_path / "cli"
    code = main(["demo", "--quick", "--methods", ",".join(METHODS), "--out", str(out), "--no-plot"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| task_arithmetic |" in printed and "avg norm acc" in printed
    assert (out / "results.json").is_file() and not (out / "normalized_accuracy.png").exists()
    assert {p.name for p in (out / "checkpoints" / "seed0").iterdir()} == {"pretrained", *tiny[0].tasks}
    assert main(["demo", "--quick", "--tasks", "rot90,spin", "--out", str(out)]) == 2


def test_nnx_state_paths_match_the_pure_dict():
    state = nnx.split(model.Classifier(8, rngs=nnx.Rngs(0)))[1]
    paths = bj.paths.flatten(state)[0]
    assert paths == bj.paths.flatten(nnx.to_pure_dict(state))[0]
    assert "body/fc1/kernel" in paths and not any(p.endswith("/value") for p in paths)
    plan = bj.plan_for(state, bj.breadcrumbs(), rules=[bj.LeafRule("head/*", action="base")])
    assert {p.path: p.action for p in plan}["head/kernel"] == "base"
    merged = bj.merge(state, [state, state], bj.task_arithmetic(0.5)).params
    assert isinstance(merged, nnx.State)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), merged, state))
