"""Registry, promotion and prediction on a real MLflow (SQLite) store, real shards, a real tiny CoAtNet.

A candidate is trained for a few hundred steps in plain PyTorch (no Ray); a 1-step model is the
worse candidate. Everything MLflow writes lives under the test's tmp_path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import train_tiny

ROOT = Path(__file__).resolve().parents[1]
NAME = "coatnet-test"
VARIANT = "coatnet_pico"
IMG = 32


def _env(uri: str) -> dict:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=path, OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.pop("RAY_ADDRESS", None)
    return env


def _run_job(script: str, args: list[str], uri: str, cwd) -> subprocess.CompletedProcess:
    """The job's CLI in this process (its main(argv), as `python jobs/<script>` runs it): an
    uncaught error would surface here as an exception, so rc 2 + 'error:' proves a clean message."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"job_{script[:-3]}", ROOT / "jobs" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = mod.main(list(args) + ["--tracking-uri", uri])
    return subprocess.CompletedProcess(script, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.data import write_demo_shards

    root = tmp_path_factory.mktemp("shards")
    write_demo_shards(str(root), num_train=640, num_val=160, image_size=IMG)
    return root


@pytest.fixture(scope="module")
def trained(shards):
    return train_tiny(shards, 180, 0, one_cycle_max_lr=4e-3)


@pytest.fixture(scope="module")
def untrained(shards):
    return train_tiny(shards, 1, 1)


@pytest.fixture
def tracking(mlflow_uri, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(mlflow_uri)
    exp = mlflow.create_experiment("registry-test", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    yield mlflow_uri
    mlflow.set_tracking_uri(None)


def _log(model, spec, shards, **tags):
    import mlflow

    from pipeline.registry import TAG_VAL_DATA, log_model

    with mlflow.start_run() as run:
        info, mv = log_model(model, spec, registered_model_name=NAME,
                             version_tags={TAG_VAL_DATA: str(shards / "val"), **tags})
    return run.info.run_id, mv


def test_log_load_roundtrip_and_pyfunc_in_fresh_process(trained, shards, tracking, tmp_path):
    from pipeline.evaluate import evaluate_model as evaluate
    from pipeline.registry import load_model

    model, spec = trained
    run_id, mv = _log(model, spec, shards)
    assert str(mv.version) == "1"
    loaded, meta = load_model(f"models:/{NAME}/1")
    assert meta["variant"] == VARIANT and meta["num_classes"] == spec.num_classes
    assert meta["img_size"] == [IMG, IMG] and meta["class_names"] == spec.class_names
    assert meta["run_id"] == run_id and meta["version"] == "1"
    x = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    # the weights are a plain state dict; no pickled module of ours
    acc = evaluate(loaded, meta["spec"], str(shards / "val"))
    assert acc["num_samples"] == 160 and acc["top1"] > 0.6, acc

    # someone else, in a fresh interpreter with no training config, scores PNG bytes via pyfunc
    from pipeline.predict import iter_samples

    samples = list(iter_samples(str(shards / "val")))[:32]
    imgdir = tmp_path / "imgs"
    imgdir.mkdir()
    for key, img, label in samples:
        (imgdir / f"{Path(key).name}.png").write_bytes(img)
    code = (
        "import json, sys, glob, pandas as pd, mlflow\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}/1')\n"
        f"files = sorted(glob.glob('{imgdir}/*.png'))\n"
        "out = m.predict(pd.DataFrame({'image': [open(f, 'rb').read() for f in files]}), params={'top_k': 3})\n"
        "print(json.dumps({'n': len(out), 'labels': list(out['label']), 'k': len(out['top_k_labels'][0])}))\n"
    )
    env = _env(tracking)
    env.pop("PYTHONPATH")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 32 and res["k"] == 3
    names = sorted(f"{Path(k).name}.png" for k, _, _ in samples)
    truth = {f"{Path(k).name}.png": spec.class_names[lab] for k, _, lab in samples}
    agree = sum(truth[n] == lab for n, lab in zip(names, res["labels"]))
    assert agree >= 0.6 * 32, (agree, res["labels"])


def test_promotion(trained, untrained, shards, tracking, tmp_path):
    import mlflow

    from pipeline.promote import promote

    c = mlflow.MlflowClient()
    _log(*trained, shards)          # v1
    _log(*untrained, shards)        # v2: one step, worse

    # no champion yet: the first candidate becomes champion (CLI, JSON out)
    r = _run_job("promote.py", ["--name", NAME, "--version", "1"], tracking, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["action"] == "initial" and d["champion_after"] == "1"
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"

    # the worse candidate is evaluated on the same data and rejected
    d = promote(NAME, "2", margin=0.01)
    print(f"promotion: v2 (1 step) {d.candidate_score:.4f} vs champion v1 {d.champion_score:.4f} -> {d.action}")
    assert d.action == "rejected" and d.champion_after == "1"
    assert d.candidate_score < d.champion_score
    v2 = c.get_model_version(NAME, "2").tags
    assert v2["promotion.decision"] == "rejected" and v2["promotion.against_version"] == "1"
    assert float(v2["promotion.champion_score"]) > float(v2["promotion.candidate_score"])
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"

    # idempotent: re-running evaluates nothing and changes no tag
    before = {str(v.version): dict(v.tags) for v in c.search_model_versions(f"name='{NAME}'")}
    d2 = promote(NAME, "2", margin=0.01, evaluator=lambda uri: pytest.fail("re-evaluated"))
    assert d2.action == "unchanged" and not d2.changed
    after = {str(v.version): dict(v.tags) for v in c.search_model_versions(f"name='{NAME}'")}
    assert after == before

    # --force moves the alias and says so, with who and why
    r = _run_job("promote.py", ["--name", NAME, "--version", "2", "--margin", "0.01", "--force",
                                "--reason", "rollback drill"], tracking, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["action"] == "forced"
    v2 = c.get_model_version(NAME, "2").tags
    assert v2["promotion.decision"] == "forced" and v2["promotion.force_reason"] == "rollback drill"
    assert v2["promotion.forced_by"]
    assert c.get_model_version(NAME, "1").tags["promotion.replaced_by"] == "2"
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"
    r = _run_job("promote.py", ["--name", NAME, "--version", "2"], tracking, tmp_path)
    assert json.loads(r.stdout.strip().splitlines()[-1])["action"] == "already_champion"

    # the better model takes it back, by margin and significantly; no version was ever deleted
    d = promote(NAME, "1", margin=0.01)
    assert d.action == "promoted" and d.champion_after == "1"
    assert d.test == "mcnemar-exact" and d.p_value < 1e-6, d
    b, c_ = (int(x.split("=")[1]) for x in d.statistic.split(","))
    assert b > c_ and b + c_ <= 160
    v1 = c.get_model_version(NAME, "1").tags
    assert v1["promotion.test"] == "mcnemar-exact" and float(v1["promotion.p_value"]) == pytest.approx(d.p_value, rel=1e-2)
    assert sorted(str(v.version) for v in c.search_model_versions(f"name='{NAME}'")) == ["1", "2"]
    # MLflow keeps no alias history; we do: initial v1, forced v2, promoted v1 - who, when, why
    tags = c.get_registered_model(NAME).tags
    history = [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith("alias.champion.history."))]
    assert [(h["from"], h["to"], h["action"]) for h in history] == [(None, "1", "initial"), ("1", "2", "forced"),
                                                                   ("2", "1", "promoted")]
    assert history[1]["reason"] == "rollback drill" and "mcnemar-exact" in history[2]["reason"]
    assert all(h["by"] and h["time"] for h in history)


def test_significance_gate_rejects_a_better_score_that_could_be_chance(trained, untrained, shards, tracking):
    """A candidate 2 points better on 160 samples, from 5 samples only it gets right against 2 only
    the champion gets right: above the margin, not significant (p = 0.23) - rejected; with the test
    off it would pass on the margin alone."""
    from pipeline.promote import mcnemar_exact, promote

    _log(*trained, shards)          # v1
    _log(*untrained, shards)        # v2
    keys = [f"{i:09d}" for i in range(160)]
    champ = {k: i < 100 for i, k in enumerate(keys)}                     # 100 right
    cand = dict(champ, **{keys[i]: True for i in range(100, 105)},        # +5 only it gets right
                **{keys[i]: False for i in range(0, 2)})                  # -2 only the champion does

    def fake(uri):
        right = cand if uri.endswith("/2") else champ
        return {"top1": sum(right.values()) / 160, "num_samples": 160, "correct": right}

    assert promote(NAME, "1", evaluator=fake).action == "initial"
    d = promote(NAME, "2", margin=0.01, evaluator=fake)
    assert d.candidate_score - d.champion_score == pytest.approx(3 / 160, abs=1e-6)
    assert d.action == "rejected" and d.statistic == "b=5,c=2"
    assert d.p_value == pytest.approx(mcnemar_exact(5, 2)) == pytest.approx(29 / 128)
    # per-sample results are cached with the version: no evaluation on a changed-level re-run
    d = promote(NAME, "2", margin=0.01, significance=0.5, evaluator=lambda uri: pytest.fail("re-evaluated"))
    assert d.action == "promoted" and d.test == "mcnemar-exact"


@pytest.mark.slow   # Ray Data
def test_predict_files_and_shards_through_ray(trained, shards, tracking, tmp_path, ray_local):
    from pipeline.predict import iter_samples, predict
    from pipeline.promote import promote

    model, spec = trained
    _log(model, spec, shards)
    promote(NAME, "1")
    samples = list(iter_samples(str(shards / "val")))
    truth = {Path(k).name: spec.class_names[lab] for k, _, lab in samples}

    # a folder of image files, through the CLI, in-process inference
    imgdir = tmp_path / "imgs"
    imgdir.mkdir()
    for key, img, _ in samples[:40]:
        (imgdir / f"{Path(key).name}.png").write_bytes(img)
    r = _run_job("predict.py", [str(imgdir), "--model", f"models:/{NAME}@champion", "--top-k", "2", "--no-ray", "--output", str(tmp_path / "p.jsonl")],
                 tracking, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(len(x["top_k_labels"]) == 2 for x in rows)
    right = sum(truth[Path(x["input"]).stem] == x["label"] for x in rows)
    assert right >= 0.6 * 40, right

    # shards: Ray Data (read_webdataset + map_batches with actors), same answers as in-process
    ray_rows = predict(f"models:/{NAME}@champion", [str(shards / "val")], top_k_=3, use_ray=True)
    local_rows = predict(f"models:/{NAME}@champion", [str(shards / "val")], top_k_=3, use_ray=False)
    assert len(ray_rows) == len(local_rows) == len(samples)
    by_key = {Path(x["input"]).name: x["label"] for x in local_rows}
    assert all(by_key[Path(x["input"]).name] == x["label"] for x in ray_rows)
    right = sum(truth[Path(x["input"]).name] == x["label"] for x in ray_rows)
    assert right >= 0.6 * len(samples), right


def test_clear_errors(trained, shards, tracking, tmp_path):
    import models

    from pipeline.weights import IncompatibleWeights, check_compatible
    from pipeline.registry import RegistryError, load_model

    model, spec = trained
    _log(model, spec, shards)
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        load_model(f"models:/{NAME}@champion")
    with pytest.raises(RegistryError, match="no version 9"):
        load_model(f"models:/{NAME}/9")
    with pytest.raises(RegistryError, match="no registered model"):
        load_model("models:/does-not-exist@champion")
    with pytest.raises(RegistryError, match="no MLflow run"):
        load_model("runs:/0123456789abcdef0123456789abcdef/model")
    # incompatible weights: another variant, another class count
    other = models.create_model("coatnet_nano", num_classes=spec.num_classes, img_size=IMG)
    with pytest.raises(IncompatibleWeights, match="incompatible"):
        check_compatible(model.state_dict(), other)
    with pytest.raises(IncompatibleWeights, match="other shapes"):
        check_compatible(model.state_dict(), models.create_model(VARIANT, num_classes=3, img_size=IMG))

    # the CLIs print one line, no traceback, exit 2
    for script, args in [("predict.py", ["--model", f"models:/{NAME}@champion", str(tmp_path)]),
                         ("promote.py", ["--name", NAME, "--version", "5"])]:
        r = _run_job(script, args, tracking, tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr[-2000:]


def test_multi_label_model_is_evaluated_and_promoted_by_precision_at_1(tmp_path, tracking):
    """A JFT / ImageNet-21K style model (sigmoid, multi-hot labels): evaluation gives precision@1,
    recall@5 and mAP, and the promotion gate judges by precision@1 and names it in its record."""
    import mlflow

    import models
    from pipeline.data import AugmentConfig, ShardIndex, StreamingLoader, write_demo_shards
    from pipeline.evaluate import evaluate_model
    from pipeline.promote import promote
    from pipeline.spec import ModelSpec

    root = tmp_path / "multi"
    write_demo_shards(str(root), num_train=640, num_val=160, image_size=IMG, multi_label=True)
    idx = ShardIndex.load(str(root / "train"))
    assert idx.label_type == "multi"
    augment = AugmentConfig.off()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    versions = []
    for steps in (0, 120):                         # v1: untrained; v2: trained with sigmoid BCE
        model = models.create_model(VARIANT, num_classes=idx.num_classes, img_size=IMG)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        loader = StreamingLoader(idx, batch_size=32, img_size=IMG, train=True, num_workers=0, augment=augment)
        done = 0
        while done < steps:
            for batch in loader:
                loss = F.binary_cross_entropy_with_logits(model(batch.images), batch.labels.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done >= steps:
                    break
        spec = ModelSpec.for_data(model, VARIANT, idx, augment)
        assert spec.label_type == "multi"
        scores = evaluate_model(model.eval(), spec, str(root / "val"))
        assert set(scores) == {"precision_at_1", "recall_at_5", "loss", "mAP", "num_samples"}
        assert scores["num_samples"] == 160 and 0 <= scores["precision_at_1"] <= scores["recall_at_5"] <= 1
        with mlflow.start_run():
            from pipeline.registry import TAG_VAL_DATA, log_model

            _, mv = log_model(model, spec, registered_model_name="coatnet-multi",
                              version_tags={TAG_VAL_DATA: str(root / "val")})
        versions.append((str(mv.version), scores))
    torch.set_num_threads(threads)
    (v1, s1), (v2, s2) = versions
    print(f"multi-label: untrained P@1 {s1['precision_at_1']:.3f} mAP {s1['mAP']:.3f}; "
          f"trained P@1 {s2['precision_at_1']:.3f} mAP {s2['mAP']:.3f}")
    assert s2["precision_at_1"] > s1["precision_at_1"] and s2["mAP"] > s1["mAP"]
    assert promote("coatnet-multi", v1).action == "initial"
    d = promote("coatnet-multi", v2, significance=None)      # the paired test has its own test above
    assert d.action == "promoted" and d.metric == "precision_at_1", d
    assert d.candidate_score == pytest.approx(s2["precision_at_1"], abs=1e-6)
    tags = mlflow.MlflowClient().get_model_version("coatnet-multi", v2).tags
    assert tags["promotion.metric"] == "precision_at_1"
