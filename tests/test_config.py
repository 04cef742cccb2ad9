"""Config system: every recipe loads and validates; bad configs fail before any worker starts,
with a message naming the field (no traceback)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, Config, flat_params, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every training recipe (workflow_*.yaml chain stages with their own schema, tested with the workflow)
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
                 if not os.path.basename(p).startswith("workflow_"))


def test_all_recipes_load_and_validate():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "demo.yaml" in names
    for v in range(8):        # the paper's pretraining settings for every variant
        assert any(n.startswith(f"coatnet_{v}_") for n in names), v
    for path in CONFIGS:
        cfg = load_config(path)
        t = cfg.train
        assert t.micro_batch * t.grad_accum * cfg.scaling.num_workers == t.global_batch, path
        if not re.fullmatch(r"coatnet_\d_\w+\.yaml", os.path.basename(path)):
            continue                 # demo and the fine-tuning/workflow recipes: validated above
        assert t.global_batch == 4096 and t.clip_grad == 1.0 and cfg.model.img_size == 224, path


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
    with pytest.raises(ConfigError, match="scaling.min_workers"):
        _prepare(demo_data, tmp_path, "scaling.min_workers=3")


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
