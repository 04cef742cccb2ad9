"""Config system: every recipe loads and validates; bad configs fail before any worker starts,
with a message naming the field (no traceback)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, Config, config_from_dict, deep_merge, flat_params, load_config, read_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every training recipe (workflow_*.yaml chain stages with their own schema, tested with the workflow;
# configs/_base/*.yaml are the recipes' shared bases, not recipes: the glob does not descend into it)
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
                 if not os.path.basename(p).startswith("workflow_"))
# recipes run by a job without --config: their description names the job instead of the file
JOB_DEFAULTS = {"demo.yaml": "jobs/pretrain.py", "finetune_demo.yaml": "jobs/finetune.py"}
PRETRAIN = re.compile(r"coatnet_\d_(\w+)\.yaml")


def test_there_is_a_recipe_for_every_variant():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "demo.yaml" in names
    for v in range(8):        # the paper's pretraining settings for every variant
        assert any(n.startswith(f"coatnet_{v}_") for n in names), v
    assert not any(n.startswith("_") for n in names)     # bases are not recipes
    storage_names = [load_config(p).storage.name for p in CONFIGS]     # the same name resumes a run
    assert len(set(storage_names)) == len(storage_names), sorted(storage_names)


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(d, dotted):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return KeyError
        d = d[part]
    return d


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_each_recipe_validates(path):
    """Per recipe: a known variant, the batch invariant, a description that says how to run this
    file and what to expect; a pretraining recipe is its family's base plus only what it changes."""
    from models import list_models

    name = os.path.basename(path)
    cfg = load_config(path)
    t = cfg.train
    assert cfg.model.variant in list_models()
    assert t.micro_batch * t.grad_accum * cfg.scaling.num_workers == t.global_batch

    assert "Run:" in cfg.description and "Expect:" in cfg.description
    run = cfg.description.split("Run:", 1)[1].split("Expect:", 1)[0]
    if name in JOB_DEFAULTS:          # the job's default: its source names this file
        job = JOB_DEFAULTS[name]
        assert job in run or "make pretrain" in run
        assert f'"configs", "{name}"' in open(os.path.join(ROOT, job)).read()
    else:
        assert f"configs/{name}" in run, run

    raw = yaml.safe_load(open(path))
    own = {k: v for k, v in raw.items() if k != "base"}
    m = PRETRAIN.fullmatch(name)
    if m:
        assert t.global_batch == 4096 and t.clip_grad == 1.0 and cfg.model.img_size == 224
        assert raw.get("base") == f"_base/pretrain_{m.group(1)}.yaml"
        assert {"description", "model", "storage"} <= own.keys()
        assert {"variant", "drop_path_rate"} <= own["model"].keys() and "name" in own["storage"]
    if "base" in raw:
        base = read_recipe(os.path.join(os.path.dirname(path), raw["base"]))
        merged = config_from_dict(deep_merge(base, own))
        assert cfg.model_dump(mode="json") == merged.model_dump(mode="json")
        # a recipe shows only what it changes: nothing it sets repeats its base
        same = [k for k, v in _leaves(own) if _get(base, k) == v]
        assert not same, f"{name} repeats its base: {same}"


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"model": {"variant": "coatnet_0", "img_size": 224}, "data": {"augment": {"crop_scale": [0.08, 1.0],
            "hflip": 0.5}}, "train": {"callbacks": [{"target": "a:B"}], "lr": 1e-3}}
    over = {"model": {"img_size": 384}, "data": {"augment": {"crop_scale": [0.5]}},
            "train": {"callbacks": [], "lr": None}, "description": "x"}
    merged = deep_merge(base, over)
    assert merged == {"model": {"variant": "coatnet_0", "img_size": 384},
                      "data": {"augment": {"crop_scale": [0.5], "hflip": 0.5}},
                      "train": {"callbacks": [], "lr": None}, "description": "x"}
    assert base["model"]["img_size"] == 224 and base["data"]["augment"]["crop_scale"] == [0.08, 1.0]  # untouched
    merged["data"]["augment"]["crop_scale"].append(1.0)
    assert over["data"]["augment"]["crop_scale"] == [0.5]
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2} and deep_merge({"a": 2}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_recipe_base_chain_of_two_levels(tmp_path):
    _write(tmp_path / "bases" / "root.yaml", """
model: {variant: coatnet_0, img_size: 64, drop_path_rate: 0.1}
data: {root: /data/x, augment: {randaug_n: 2, crop_scale: [0.08, 1.0]}}
train: {global_batch: 64, micro_batch: 32, steps: 10, lr: 0.001}
""")
    _write(tmp_path / "bases" / "family.yaml", """
base: root.yaml
data: {augment: {crop_scale: [0.5, 1.0], mixup_alpha: 0.2}}
train: {lr: 0.002}
""")
    recipe = _write(tmp_path / "recipes" / "r.yaml", """
base: ../bases/family.yaml
description: mine
model: {drop_path_rate: 0.3}
train: {micro_batch: 16, grad_accum: 2}
""")
    data = read_recipe(recipe)
    assert data == {"model": {"variant": "coatnet_0", "img_size": 64, "drop_path_rate": 0.3},
                    "data": {"root": "/data/x", "augment": {"randaug_n": 2, "crop_scale": [0.5, 1.0],
                                                            "mixup_alpha": 0.2}},
                    "train": {"global_batch": 64, "micro_batch": 16, "grad_accum": 2, "steps": 10, "lr": 0.002},
                    "description": "mine"}
    cfg = load_config(recipe, ["train.lr=0.004"])         # overrides apply after the bases
    assert (cfg.model.drop_path_rate, cfg.train.lr, cfg.data.augment.crop_scale) == (0.3, 0.004, (0.5, 1.0))


def test_recipe_base_errors_are_one_line_and_name_the_path(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\nmodel: {img_size: 64}\n")
    _write(tmp_path / "b.yaml", "base: sub/c.yaml\n")
    _write(tmp_path / "sub" / "c.yaml", "base: ../a.yaml\n")
    with pytest.raises(ConfigError, match="base cycle") as e:
        load_config(a)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ("a.yaml", "b.yaml", "c.yaml")), msg
    selfish = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"base cycle .*self\.yaml -> .*self\.yaml"):
        read_recipe(selfish)

    orphan = _write(tmp_path / "orphan.yaml", "base: _base/nope.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(orphan)
    msg = str(e.value)
    assert "\n" not in msg and str(orphan) in msg and "_base/nope.yaml does not exist" in msg, msg

    for text, what in [("model: [unclosed\n", "is not valid YAML"), ("- a list\n", "must hold a mapping"),
                       ("base: [x]\n", "base must be a file path")]:
        bad = _write(tmp_path / "bad.yaml", text)
        with pytest.raises(ConfigError, match=what) as e:
            load_config(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
        parent = _write(tmp_path / "parent.yaml", "base: bad.yaml\n")    # also when it is a base
        with pytest.raises(ConfigError, match=what):
            read_recipe(parent)


def test_workflow_stage_config_resolves_the_base(tmp_path):
    from pipeline.workflow import StageSpec, WorkflowConfig, stage_config

    _write(tmp_path / "_base" / "stage.yaml", """
model: {variant: coatnet_pico, img_size: 32}
train: {global_batch: 64, micro_batch: 32, steps: 20, lr: 0.003}
data: {root: data/demo, augment: {crop_scale: [0.5, 1.0]}}
""")
    _write(tmp_path / "ft.yaml", "base: _base/stage.yaml\nmodel: {img_size: 64}\ntrain: {steps: 5}\n")
    wf = WorkflowConfig(storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    cfg, keyed = stage_config(StageSpec(config="ft.yaml", overrides=["train.lr=0.001"]), wf, tmp_path)
    assert (cfg.model.variant, cfg.model.img_size, cfg.train.steps, cfg.train.lr) == ("coatnet_pico", 64, 5, 0.001)
    assert cfg.data.augment.crop_scale == (0.5, 1.0) and cfg.storage.storage_path == str(tmp_path / "runs")
    assert keyed["model"]["img_size"] == 64 and keyed["train"]["global_batch"] == 64


def test_paper_numbers():
    c = load_config(os.path.join(ROOT, "configs", "coatnet_3_imagenet1k.yaml"))
    assert (c.model.drop_path_rate, c.train.lr, c.train.min_lr, c.train.warmup_steps, c.train.schedule,
            c.train.weight_decay, c.train.epochs, c.train.loss, c.data.augment.label_smoothing,
            c.data.augment.mixup_alpha, c.data.augment.randaug_n, c.data.augment.randaug_m) == \
        (0.7, 1e-3, 1e-5, 10000, "cosine", 0.05, 300, "softmax", 0.1, 0.8, 2, 15)
    c = load_config(os.path.join(ROOT, "configs", "coatnet_4_imagenet21k.yaml"))
    assert (c.train.loss, c.train.warmup_epochs, c.train.schedule, c.train.epochs, c.train.weight_decay,
            c.data.augment.mixup_alpha, c.model.drop_path_rate) == ("sigmoid", 5, "linear", 90, 0.01, 0.0, 0.7)
    c = load_config(os.path.join(ROOT, "configs", "coatnet_4_jft.yaml"))
    assert (c.train.lr, c.train.warmup_steps, c.train.epochs, c.model.drop_path_rate) == (5e-4, 20000, 14, 0.1)


def test_overrides_are_typed():
    c = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                    ["train.lr=0.01", "train.bf16=false", "deepspeed.extra={zero_optimization: {stage3_max_live_parameters: 5}}",
                     "scaling.num_workers=4", "train.global_batch=128"])
    assert c.train.lr == 0.01 and c.train.bf16 is False and c.scaling.num_workers == 4
    assert c.deepspeed.extra == {"zero_optimization": {"stage3_max_live_parameters": 5}}


def test_gradient_accumulation_follows_the_worker_count():
    """Changing the worker count is one knob: accumulation is derived from the global batch, the
    micro batch and the workers (demo: 64 = 32 x accumulation x workers); set by hand, it must agree."""
    demo = os.path.join(ROOT, "configs", "demo.yaml")
    assert [load_config(demo, [f"scaling.num_workers={w}"]).train.grad_accum for w in (1, 2)] == [2, 1]
    assert load_config(demo, ["scaling.num_workers=1", "train.grad_accum=2"]).train.grad_accum == 2
    with pytest.raises(ConfigError, match=r"train.grad_accum \(1\).*must equal train.global_batch.*unset"):
        load_config(demo, ["scaling.num_workers=1", "train.grad_accum=1"])
    with pytest.raises(ConfigError, match=r"train.global_batch \(64\) is not a multiple of.*= 96"):
        load_config(demo, ["scaling.num_workers=3"])


@pytest.mark.parametrize("overrides, field", [
    (["train.micro_batch=30"], "train.global_batch"),
    (["train.lr=-1"], "train.lr"),
    (["model.img_size=33"], "model.img_size"),
    (["model.colour=red"], "model.colour"),
    (["train.epochs=3"], "exactly one of train.steps and train.epochs"),
    (["train.loss=hinge"], "train.loss"),
    (["deepspeed.offload=nvme"], "deepspeed.nvme_path"),
    (["train.lr"], "section.key=value"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)
    assert field in str(e.value)


def test_secrets_are_scrubbed_from_params():
    c = Config.model_validate({"deepspeed": {"extra": {"aws_secret_access_key": "hunter2",
                                                       "url": "s3://user:pw@host/x"}},
                               "data": {"root": "https://alice:s3cret@example.com/data"}})
    params = flat_params(c)
    joined = " ".join(f"{k}={v}" for k, v in params.items())
    assert "hunter2" not in joined and "s3cret" not in joined and ":pw@" not in joined
    assert params["deepspeed.extra.aws_secret_access_key"] == "***"
    assert params["train.lr"] == str(c.train.lr)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "pretrain.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_cli_invalid_config_exits_cleanly():
    r = _cli("train.micro_batch=30")
    assert r.returncode == 2
    assert "train.micro_batch (30)" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and "--config" in r.stdout


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from pipeline.data import write_demo_shards

    root = str(tmp_path_factory.mktemp("cfgdata") / "demo")
    write_demo_shards(root, num_train=64, num_val=16, image_size=32, samples_per_shard=32)
    return root


def _prepare(root, tmp_path, *overrides):
    from pipeline import launch

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"data.root={root}", "data.write_demo=false",
                       f"storage.storage_path={tmp_path}/runs", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
                       *overrides])
    return launch.prepare(cfg)


def test_preflight_accepts_good_config_and_derives_numbers(demo_data, tmp_path):
    cfg, task = _prepare(demo_data, tmp_path, "train.steps=null", "train.epochs=2", "train.warmup_steps=null",
                         "train.warmup_epochs=1")
    assert cfg.model.num_classes == 10           # from the shard index
    assert task.total_steps == 2 and task.warmup_steps == 1    # 64 samples / 64 per step
    assert os.path.isabs(cfg.storage.storage_path)


@pytest.mark.parametrize("overrides, message", [
    (["model.variant=coatnet_99"], "model.variant: unknown variant 'coatnet_99'"),
    (["data.root=/nonexistent/shards"], "data.root: cannot read the shard index"),
    (["storage.storage_path=/proc/forbidden/runs"], "storage.storage_path /proc/forbidden/runs is not writable"),
    (["model.num_classes=7"], "model.num_classes (7) differs from the data"),
])
def test_preflight_rejects_bad_configs(demo_data, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        _prepare(demo_data, tmp_path, *overrides)
    assert message in str(e.value)


def test_unreachable_s3_storage_is_rejected(demo_data, tmp_path, s3_endpoint):
    with pytest.raises(ConfigError) as e:
        _prepare(demo_data, tmp_path, "storage.storage_path=s3://no-such-bucket-xyz/runs")
    assert "storage.storage_path s3://no-such-bucket-xyz/runs is not writable" in str(e.value)
    cfg, _ = _prepare(demo_data, tmp_path, f"storage.storage_path=s3://{s3_endpoint['bucket']}/runs")
    assert cfg.storage.storage_path == f"s3://{s3_endpoint['bucket']}/runs"


def test_every_recipe_says_how_to_run_it_and_what_to_expect():
    import glob

    import yaml

    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        desc = yaml.safe_load(open(path))["description"]
        assert "Run: " in desc and "Expect: " in desc, path
        assert os.path.basename(path) in desc or "make pretrain" in desc or "jobs/" in desc, path


def test_preflight_refuses_bf16_compile_on_cpu(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="model.compile with train.bf16 on CPU"):
        _prepare(demo_data, tmp_path, "model.compile=true", "train.bf16=true")
    with pytest.raises(ConfigError, match=r"scaling.min_workers \(3\) exceeds scaling.num_workers \(2\)"):
        _prepare(demo_data, tmp_path, "scaling.min_workers=3")
    with pytest.raises(ConfigError, match=r"no count in 3..3 divides train.global_batch 64"):
        _prepare(demo_data, tmp_path, "scaling.num_workers=4", "scaling.min_workers=3", "train.global_batch=64",
                 "train.micro_batch=16")


def test_mixture_config_errors(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="weights sum to 0"):
        load_config(os.path.join(ROOT, "configs", "demo.yaml"), ["data.sources=[{root: /a, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"data.sources.0.weight"):
        load_config(os.path.join(ROOT, "configs", "demo.yaml"), ["data.sources=[{root: /a, weight: -1}]"])
    with pytest.raises(ConfigError, match=r"data.sources.1 \(nowhere\): cannot read the shard index"):
        _prepare(demo_data, tmp_path, f"data.sources=[{{root: {demo_data}, weight: 1}}, "
                                      f"{{root: {tmp_path}/nowhere, weight: 1}}]")
    cfg, task = _prepare(demo_data, tmp_path, f"data.sources=[{{root: {demo_data}, weight: 1, name: x}}]")
    assert cfg.data.train_sources() == [("x", f"{demo_data}/train", 1.0)]


def test_preflight_says_when_training_shards_are_not_pre_shuffled(demo_data, tmp_path, capsys):
    """An index written from a streamed Parquet manifest (rows permuted within parts only) says so
    in pre_shuffled; the job tells the user once, before training; a globally shuffled one is quiet."""
    import dataclasses
    import shutil

    from pipeline.data import ShardIndex

    _prepare(demo_data, tmp_path)
    assert "not pre-shuffled" not in capsys.readouterr().out
    root = tmp_path / "streamed"
    shutil.copytree(demo_data, root)
    index = ShardIndex.load(f"{root}/train")
    assert index.pre_shuffled                               # the demo writer shuffles globally
    meta = {**index.meta, "samples_per_shard": 32, "shards_per_part": 16}
    dataclasses.replace(index, pre_shuffled=False, meta=meta, stored_fingerprint=None).save()
    _prepare(str(root), tmp_path)
    out = capsys.readouterr().out
    assert f"{root}/train is not pre-shuffled (rows mixed within parts of 512 only)" in out, out
