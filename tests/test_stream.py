import dataclasses
import importlib
import json
import threading

import jax
import numpy as np
import pytest

import breadcrumbs_jax as bj
from breadcrumbs_jax import MergeError, io, kernel_store
from breadcrumbs_jax.merge import merge_leaves
from breadcrumbs_jax.stream import dry_run_checkpoints, merge_checkpoints

from tests.ckpt_factory import HF_SHAPES, models, pretrained, same_bits

FORMATS = {"orbax": "", "safetensors": ".safetensors", "msgpack": ".msgpack"}
BC = bj.breadcrumbs(0.7, beta=0.6, gamma=0.95)  # one method for most tests: its kernels compile once


def write_models(tmp_path, base, fts, formats=("orbax", "safetensors", "msgpack", "orbax")):
    """Save the base and each fine-tuned model in the given formats (cycled); return their paths."""
    paths = []
    for i, (tree, fmt) in enumerate(zip([base, *fts], formats * 4)):
        path = tmp_path / f"m{i}{FORMATS[fmt]}"
        io.save(tree, path, format=fmt)
        paths.append(path)
    return paths[0], paths[1:]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The standard models (T = 3) on disk in mixed formats: (base, fine-tuned, base path, paths)."""
    base, fts = models()
    b, ms = write_models(tmp_path_factory.mktemp("models"), base, fts)
    return base, fts, b, ms


CASES = {  # method, output format
    "breadcrumbs": (BC, "orbax"),
    "per_model_bands_row": (
        bj.breadcrumbs(1.0, density=(0.1, 0.3, 0.5), gamma_top=(0.0, 0.05, 0.1), weights=(1, 0.5, 2), granularity="row"),
        "safetensors",
    ),
    "global": (bj.breadcrumbs(0.7, beta=0.6, gamma=0.95, granularity="global"), "msgpack"),
}


@pytest.mark.filterwarnings("ignore:.*keep no entries")  # row groups of 8 at density 0.1 keep none: reported
@pytest.mark.parametrize("name", list(CASES))
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, written, name):
    base, fts, b, ms = written
    method, out_format = CASES[name]
    target = tmp_path / f"out{FORMATS[out_format]}"
    report = merge_checkpoints(b, ms, target, method)
    expected = bj.merge(base, fts, method)
    assert same_bits(io.load(target), expected.params)
    assert report == bj.MergeReport(tuple(str(m) for m in ms), expected.report.leaves)


def test_rules_and_output_dtype_match_in_memory(tmp_path, written):
    base, fts, b, ms = written
    rules = [bj.LeafRule("*embed*", action="base"), bj.LeafRule("*bias", method=bj.task_arithmetic(0.3))]
    merge_checkpoints(b, ms, tmp_path / "out", BC, rules=rules, out_dtype="bfloat16")
    expected = bj.merge(base, fts, BC, rules=rules, out_dtype="bfloat16").params
    out = io.load(tmp_path / "out")
    assert same_bits(out, expected)
    assert out["params"]["embed"]["embedding"].dtype == np.dtype("bfloat16")
    assert out["step"].dtype == np.int64


class Recorder:
    """Wraps a source and logs every read into a shared event list."""

    def __init__(self, source, events):
        self.source, self.events = source, events
        self.name, self.format, self.layout = source.name, source.format, source.layout

    def leaves(self):
        return self.source.leaves()

    def read(self, path, index=None):
        self.events.append(("read", path))
        return self.source.read(path, index)

    def close(self):
        self.source.close()


def test_the_next_leaf_is_read_while_this_one_merges_and_no_further(tmp_path, written, monkeypatch):
    _, _, b, ms = written
    events = []
    original = io.safetensors.SafetensorsSink.write
    monkeypatch.setattr(io.safetensors.SafetensorsSink, "write",
                        lambda self, path, array: (events.append(("write", path)), original(self, path, array)))
    sources = [Recorder(io.open_source(p), events) for p in (b, *ms)]
    merge_checkpoints(sources[0], sources[1:], tmp_path / "out.safetensors", BC)
    writes = [p for e, p in events if e == "write"]
    assert sorted(writes) == sorted(io.open_source(b).leaves()) and len(events) == 5 * len(writes)
    at = {e: i for i, e in enumerate(events)}
    for i, leaf in enumerate(writes):
        reads = [j for j, e in enumerate(events) if e == ("read", leaf)]
        assert len(reads) == 4 and max(reads) < at[("write", leaf)]  # one read per model, then the write
        if i >= 1:  # leaf i is read (and its kernel started) before leaf i - 1 is written ...
            assert max(reads) < at[("write", writes[i - 1])]
        if i >= 2:  # ... and only once leaf i - 2 is written: at most one leaf ahead
            assert min(reads) > at[("write", writes[i - 2])]


@pytest.mark.parametrize("kind", ["host", "device"])
def test_kernels_compile_ahead_in_a_background_thread_once_each(monkeypatch, caplog, kind):
    """Each distinct kernel is lowered once, in order of first use, in one thread and compiled in
    another, both off the merging thread, which then finds it compiled; the bits are those of
    `bj.merge` either way. Host leaves go in as their kernel view, device arrays as they are."""
    rng = np.random.default_rng(7)
    tree = {"a": rng.standard_normal((37, 5), dtype=np.float32), "b": rng.standard_normal((11, 40), dtype=np.float32),
            "c": rng.standard_normal((37, 5), dtype=np.float32), "d": rng.standard_normal((37, 5)).astype(np.int32)}
    fts = [{k: v + rng.standard_normal(v.shape).astype(v.dtype) for k, v in tree.items()} for _ in range(2)]
    put = np.asarray if kind == "host" else jax.device_put

    def load(plan):
        return put(tree[plan.path]), put(np.stack([f[plan.path] for f in fts]))

    # names no other test's method has: kernels no other test compiled (settings share them)
    methods = {ahead: dataclasses.replace(bj.breadcrumbs(0.9, density=0.4, gamma_top=0.1, weights=weights),
                                          name=f"ahead-{kind}-{ahead}")
               for ahead, weights in [(None, (1.0, 0.3)), (kind, (1.0, 0.4))]}
    want = {ahead: bj.merge(tree, fts, method).params for ahead, method in methods.items()}
    kernel_store.clear()
    lowered, compiled = [], []
    lower_kernel, finish_kernel = kernel_store.lower_kernel, kernel_store.finish_kernel
    monkeypatch.setattr(kernel_store, "lower_kernel", lambda kernel, args, options: (
        lowered.append((args[0].shape, threading.current_thread().name)), lower_kernel(kernel, args, options))[1])
    monkeypatch.setattr(kernel_store, "finish_kernel", lambda staged: (
        compiled.append(threading.current_thread().name), finish_kernel(staged))[1])
    here = {}  # compilations of _merge_kernel in the merging thread
    for ahead, method in methods.items():
        caplog.clear()
        with jax.log_compiles(True):  # logs what this thread compiles
            merged = {p.path: m for p, m, _ in merge_leaves(
                bj.plan_for(tree, method), load, names=("x", "y"), compile_ahead=ahead)}
        here[ahead] = sum("Finished XLA compilation of jit(_merge_kernel)" in r.getMessage() for r in caplog.records)
        assert same_bits(merged, want[ahead])
    assert here == {None: 2, kind: 0}  # the merging thread compiled both kernels, then neither
    b = (40, 11) if kind == "host" else (11, 40)
    assert lowered == [((37, 5), "breadcrumbs-lower_0"), (b, "breadcrumbs-lower_0")]  # 'd' is copied
    assert compiled == ["breadcrumbs-compile_0"] * 2


def test_ready_first_merges_leaves_of_compiled_kernels_before_one_that_compiles(monkeypatch):
    """With `ready_first`, a leaf whose kernel is still compiling waits while later leaves of a
    compiled kernel merge (here 'b''s kernel is lowered only once 'c' has started); the bits are
    those of `bj.merge`. Without it, leaves start in order."""
    merge_module = importlib.import_module("breadcrumbs_jax.merge")
    rng = np.random.default_rng(9)
    tree = {"a": rng.standard_normal((37, 5), dtype=np.float32), "b": rng.standard_normal((11, 40), dtype=np.float32),
            "c": rng.standard_normal((37, 5), dtype=np.float32)}
    fts = [{k: v + rng.standard_normal(v.shape, dtype=np.float32) for k, v in tree.items()} for _ in range(2)]
    method = dataclasses.replace(BC, name="ready-first")  # kernels no other test compiled

    def load(plan):
        return tree[plan.path], np.stack([f[plan.path] for f in fts])

    started, c_started = [], threading.Event()
    start, lower_kernel = merge_module._start, kernel_store.lower_kernel

    def record(plan, *args):
        started.append(plan.path)
        if plan.path == "c":
            c_started.set()
        return start(plan, *args)

    def lower_after_c(kernel, args, options):
        if args[0].shape == (40, 11):  # b's kernel
            assert c_started.wait(timeout=120)
        return lower_kernel(kernel, args, options)

    monkeypatch.setattr(merge_module, "_start", record)
    monkeypatch.setattr(kernel_store, "lower_kernel", lower_after_c)
    plans = bj.plan_for(tree, method)
    merged = {p.path: m for p, m, _ in merge_leaves(plans, load, names=("x", "y"), compile_ahead="host", ready_first=True)}
    assert started == ["a", "c", "b"]
    assert same_bits(merged, bj.merge(tree, fts, method).params)
    monkeypatch.setattr(kernel_store, "lower_kernel", lower_kernel)
    started.clear()
    list(merge_leaves(plans, load, names=("x", "y"), compile_ahead="host"))
    assert started == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_sinks_take_leaves_in_any_order_unless_in_order(tmp_path, fmt):
    """Safetensors and Orbax sinks write leaves in any order (a merge writes them as their kernels
    are ready); the msgpack sink, which streams one encoding, takes them in its `order` only."""
    tree = pretrained(HF_SHAPES)
    infos = list(io.TreeSource(tree).leaves().values())
    with io.staged_output(tmp_path / f"out{FORMATS[fmt]}") as staging:
        sink = io.open_sink(fmt, staging, infos)
        if sink.in_order:
            with pytest.raises(ValueError, match="must be written in tree order"):
                sink.write(sink.order[-1], tree[sink.order[-1]])
            for path in sink.order:
                sink.write(path, tree[path])
        else:
            for path in reversed(sink.order):
                sink.write(path, tree[path])
        sink.commit()
    assert sink.in_order == (fmt == "msgpack")
    assert same_bits(io.load(tmp_path / f"out{FORMATS[fmt]}"), tree)


def test_a_leaf_merged_in_another_view_comes_back_without_a_copy(caplog):
    """A leaf whose kernel takes it in another view ([3, 41] as [41, 3]) comes back in its own
    shape as a view of the kernel's output (on CPU): no reshape computation runs, and the bits
    are those of merging the leaf in that view."""
    rng = np.random.default_rng(10)
    tree = {"w": rng.standard_normal((3, 41), dtype=np.float32)}
    fts = [{"w": tree["w"] + rng.standard_normal((3, 41), dtype=np.float32)} for _ in range(2)]
    with jax.log_compiles(True):
        merged = bj.merge(tree, fts, BC).params["w"]
    assert not [r for r in caplog.records if "jit(reshape)" in r.getMessage()]
    in_view = bj.merge({"w": tree["w"].reshape(41, 3)}, [{"w": f["w"].reshape(41, 3)} for f in fts], BC).params["w"]
    assert merged.shape == (3, 41) and same_bits(np.asarray(merged), np.asarray(in_view).reshape(3, 41))


def test_loads_other_than_announced_merge_with_their_own_kernel():
    """Device arrays where host leaves were announced do not fit the kernels compiled ahead (their
    view's shape): the merge compiles theirs instead, and the bits stay those of `bj.merge`."""
    rng = np.random.default_rng(8)
    tree = {"a": rng.standard_normal((37, 5), dtype=np.float32), "b": rng.standard_normal((11, 40), dtype=np.float32)}
    fts = [{k: v + rng.standard_normal(v.shape, dtype=np.float32) for k, v in tree.items()} for _ in range(2)]

    def load(plan):
        return jax.device_put(tree[plan.path]), jax.device_put(np.stack([f[plan.path] for f in fts]))

    merged = {p.path: m for p, m, _ in merge_leaves(bj.plan_for(tree, BC), load, names=("x", "y"), compile_ahead="host")}
    assert same_bits(merged, bj.merge(tree, fts, BC).params)


def test_report_json_and_no_overwrite_without_permission(tmp_path, written):
    base, fts, b, ms = written
    target, report = tmp_path / "out", tmp_path / "out.report.json"
    merge_checkpoints(b, ms, target, BC, report_path=report)
    data = json.loads(report.read_text())
    assert data["task_names"] == [str(m) for m in ms] and len(data["leaves"]) == 4
    before = io.load(target)
    with pytest.raises(MergeError, match="output exists; pass --overwrite"):
        merge_checkpoints(b, ms, target, bj.task_arithmetic(0.9))
    assert same_bits(io.load(target), before)
    merge_checkpoints(b, ms, target, bj.task_arithmetic(0.9), overwrite=True)
    assert same_bits(io.load(target), bj.merge(base, fts, bj.task_arithmetic(0.9)).params)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def _no_output(tmp_path, target):
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}")]


def test_missing_and_extra_leaves_name_leaf_and_model(tmp_path):
    base, fts = models(n=2)
    del fts[1]["params"]["embed"]
    b, ms = write_models(tmp_path, base, fts, formats=("msgpack",))
    with pytest.raises(MergeError, match="missing from this model") as e:
        merge_checkpoints(b, ms, tmp_path / "out", BC)
    assert "params/embed/embedding" in str(e.value) and str(ms[1]) in str(e.value)
    _no_output(tmp_path, tmp_path / "out")
    with pytest.raises(MergeError, match="not in the pre-trained model") as e:
        merge_checkpoints(ms[1], [b], tmp_path / "out", BC)
    assert "params/embed/embedding" in str(e.value)


def test_shape_and_dtype_mismatches_name_leaf_and_model(tmp_path):
    base, fts = models(n=2)
    fts[0]["params"]["Dense_0"]["kernel"] = np.zeros((12, 8), np.float32)
    fts[1]["params"]["embed"]["embedding"] = fts[1]["params"]["embed"]["embedding"].astype(np.float16)
    b, ms = write_models(tmp_path, base, fts, formats=("msgpack",))
    with pytest.raises(MergeError, match=r"shape \(12, 8\) differs from the pre-trained \(8, 12\)") as e:
        merge_checkpoints(b, ms, tmp_path / "out", BC)
    assert "params/Dense_0/kernel" in str(e.value) and str(ms[0]) in str(e.value)
    with pytest.raises(MergeError, match="dtype float16 differs") as e:
        merge_checkpoints(b, ms[1:], tmp_path / "out", BC)
    assert "params/embed/embedding" in str(e.value) and str(ms[1]) in str(e.value)
    _no_output(tmp_path, tmp_path / "out")


def _vocab_models():
    base, fts = models(HF_SHAPES)
    for ft, extra in zip(fts, (3, 5, 4)):  # fine-tuning added tokens: larger embedding and head
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            ft[name] = np.concatenate([ft[name], np.ones((extra, 8), np.float32)])
    return base, fts


def test_vocabulary_mismatch_is_an_error_with_the_sizes(tmp_path):
    base, fts = _vocab_models()
    b, ms = write_models(tmp_path, base, fts, formats=("safetensors",))
    with pytest.raises(MergeError, match="43 vs 40 entries along axis 0") as e:
        merge_checkpoints(b, ms, tmp_path / "out", bj.breadcrumbs())
    assert "vocab: shared" in str(e.value)
    _no_output(tmp_path, tmp_path / "out")


def test_vocabulary_mismatch_merges_shared_rows(tmp_path):
    base, fts = _vocab_models()
    base["lm_head.weight"] = base["lm_head.weight"][:38]  # base smaller than both: only 38 rows are shared
    b, ms = write_models(tmp_path, base, fts, formats=("safetensors",))
    method = BC
    merge_checkpoints(b, ms, tmp_path / "out", method, vocab="shared")
    out = io.load(tmp_path / "out")
    cut = lambda t: {k: v[:38] if k == "lm_head.weight" else v[:40] if k == "model.embed_tokens.weight" else v for k, v in t.items()}  # noqa: E731
    expected = bj.merge(base, [cut(f) for f in fts], method, layout="torch").params
    assert same_bits(out, expected)
    assert out["model.embed_tokens.weight"].shape == (40, 8)


def test_failure_mid_merge_leaves_nothing(tmp_path, written):
    _, _, b, ms = written
    src = io.open_source(ms[2])
    last = sorted(src.leaves())[-1]

    class Failing(Recorder):
        def read(self, path, index=None):
            if path == last:
                raise KeyboardInterrupt
            return super().read(path, index)

    for fmt in FORMATS.values():
        target = tmp_path / f"out{fmt}"
        with pytest.raises(KeyboardInterrupt):
            merge_checkpoints(b, [ms[0], ms[1], Failing(src, [])], target, BC)
        _no_output(tmp_path, target)


def test_include_restricts_merge_and_output(tmp_path, written):
    _, _, b, ms = written
    merge_checkpoints(b, ms, tmp_path / "out", BC, include=["params/Dense_*"])
    out = io.load(tmp_path / "out")
    assert set(out) == {"params"} and set(out["params"]) == {"Dense_0"}


def test_dry_run_describes_every_leaf_without_writing(tmp_path, written):
    _, _, b, ms = written
    text = dry_run_checkpoints(b, ms, bj.breadcrumbs(granularity="row"), out_dtype="bfloat16")
    for path in ("params/embed/embedding", "params/Dense_0/kernel", "params/Dense_0/bias", "step"):
        assert path in text
    assert "4 leaves (3 merged, 0 kept from the pre-trained model, 1 copied), 3 fine-tuned models" in text
    assert "output dtype: bfloat16" in text
