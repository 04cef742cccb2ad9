"""Publishing without the head: a run's final weights and a registered model go from storage
straight into MLflow's artifact store (moto S3 behind a SQLite tracking store; a real `mlflow server`
proxying its artifacts), byte for byte, and load back; the driver stages no weight file locally
(helpers.LocalWeightsWatch) and reads only safetensors headers (the fit check)."""
from __future__ import annotations

import tempfile

import pytest
import torch
from helpers import LocalWeightsWatch, free_port, start_mlflow_server, stop_process_group

import models

VARIANT, IMG, CLASSES = "coatnet_pico", 32, 10
SHARD = 100_000                  # bytes: several shards + index, as large models are written


def _state_dicts():
    torch.manual_seed(0)
    sd = {k: v.float() if v.is_floating_point() else v
          for k, v in models.create_model(VARIANT, num_classes=CLASSES, img_size=IMG).state_dict().items()}
    return sd, {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}


def _spec():
    from pipeline.spec import ModelSpec

    return ModelSpec(variant=VARIANT, num_classes=CLASSES, img_size=IMG)


def _final_checkpoint(root: str, name: str, step: int = 4) -> str:
    """A final checkpoint as the workers leave it: train state, weights/ and weights_ema/ (sharded)."""
    import fsspec

    from pipeline.checkpoint import STATE_FILE, TrainState
    from pipeline.weights import write_weights

    raw, ema = _state_dicts()
    ck = f"{root}/{name}/checkpoint_{step:08d}"
    write_weights(f"{ck}/weights", raw.items(), max_shard_bytes=SHARD)
    write_weights(f"{ck}/weights_ema", ema.items(), max_shard_bytes=SHARD)
    with fsspec.open(f"{ck}/{STATE_FILE}", "w") as f:
        f.write(TrainState(step=step, samples_seen=64, total_steps=step, loader={}, config={}).to_json())
    return ck


def _publish(ck: str, storage: str, name: str, uri: str, experiment: str):
    """launch's publishing of a finished run, on the checkpoint Ray Train hands back."""
    from ray.train import Checkpoint

    from pipeline import launch, tracking
    from pipeline.cluster import storage_filesystem
    from pipeline.config import load_config, resolve_paths

    cfg = resolve_paths(load_config("configs/demo.yaml", [f"storage.storage_path={storage}", f"storage.name={name}",
                                                          f"tracking.tracking_uri={uri}",
                                                          f"tracking.experiment={experiment}"]))
    run_id, _ = tracking.get_or_create_run(uri, experiment, f"{storage}/{name}", name, {}, {})
    fs, path = storage_filesystem(ck)
    step, weights = launch._publish_weights(cfg, Checkpoint(path, filesystem=fs), run_id, ck)
    return run_id, step, weights


def _same_files(fs, src: str, dest: str) -> list[str]:
    from pipeline.weights import weight_files

    names = [f.rsplit("/", 1)[1] for f in weight_files(src)]
    assert names == [f.rsplit("/", 1)[1] for f in weight_files(dest)] and len(names) > 2
    for n in ["model.safetensors.index.json", *names]:
        assert fs.cat(f"{src}/{n}") == fs.cat(f"{dest}/{n}"), n
    return names


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """This process as the driver: its own temp dir; the tracking URI it sets is unset afterwards."""
    import mlflow

    (tmp_path / "driver-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "driver-tmp"))

    def use(uri: str) -> None:
        mlflow.set_tracking_uri(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield use
    mlflow.set_tracking_uri(None)


def test_final_weights_and_registered_model_go_storage_to_storage(s3_endpoint, tmp_path, driver):
    import mlflow

    from pipeline import finetune, registry
    from pipeline.weights import IncompatibleWeights

    bucket, fs = s3_endpoint["bucket"], s3_endpoint["fs"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver(uri)
    exp = mlflow.create_experiment("publish", artifact_location=f"s3://{bucket}/mlflow")
    storage = f"s3://{bucket}/runs"
    ck = _final_checkpoint(storage, "pub")

    with LocalWeightsWatch() as watch:
        run_id, step, published = _publish(ck, storage, "pub", uri, "publish")
    assert watch.opened == []                                   # no weight file on the driver
    # the run's artifacts are the checkpoint's export, byte for byte, in the bucket
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["coatnet.checkpoint"] == ck
    art = run.info.artifact_uri
    assert art.startswith(f"s3://{bucket}/mlflow/") and published == f"runs:/{run_id}/weights" and step == 4
    for name in ("weights", "weights_ema"):
        _same_files(fs, f"{ck}/{name}", f"{art}/{name}")

    # the workflow's registration: the run's EMA files where they lie, headers read, copied across
    with LocalWeightsWatch() as watch:
        source = finetune.resolve_source(run_id)
        with mlflow.start_run(experiment_id=exp):
            info, mv = registry.log_model(source.weights, _spec(), registered_model_name="pub")
        again = finetune.resolve_source("models:/pub/1")          # a registered source: read in place too
    assert watch.opened == []
    assert source.weights == f"{art}/weights_ema" and source.scratch is None
    location = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
    assert location.startswith(f"s3://{bucket}/mlflow/") and str(mv.version) == "1"
    _same_files(fs, f"{ck}/weights_ema", f"{location}/artifacts/weights")
    assert again.weights == f"{location}/artifacts/weights" and again.scratch is None
    assert again.num_classes == CLASSES and again.model_version == "pub/1"

    # weights that do not fit the spec are refused from their headers, before anything is logged
    from pipeline.spec import ModelSpec

    with pytest.raises(IncompatibleWeights, match="other shapes"):
        registry.log_model(source.weights, ModelSpec(variant=VARIANT, num_classes=5, img_size=IMG))

    # loads back (the pyfunc in a fresh process: test_registry.py); its signature made without a forward
    loaded, meta = registry.load_model("models:/pub/1")
    _, ema = _state_dicts()
    assert meta["version"] == "1" and all(torch.equal(loaded.state_dict()[k], ema[k]) for k in ema)
    signature = mlflow.models.get_model_info("models:/pub/1").signature
    assert signature.inputs.input_names() == ["image"]
    assert signature.outputs.input_names() == ["label", "class_id", "score", "top_k_labels", "top_k_scores"]


def test_publishing_through_the_tracking_servers_proxy(tmp_path, monkeypatch, driver):
    """A real `mlflow server` serving artifacts (mlflow-artifacts:): without knowing its destination
    the files go through the proxy one at a time (one shard spooled, removed once sent); with
    COATNET_MLFLOW_ARTIFACTS_DESTINATION naming it, straight into the destination. Both load back."""
    import mlflow

    from pipeline import registry
    from pipeline.weights import ARTIFACTS_DESTINATION_ENV, weight_files

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port = free_port()
    server = start_mlflow_server(server_dir, port)
    try:
        uri = f"http://127.0.0.1:{port}"
        driver(uri)
        storage = str(tmp_path / "runs")
        ck = _final_checkpoint(storage, "prox")
        shards = len(weight_files(f"{ck}/weights"))

        with LocalWeightsWatch() as watch:
            run_id, _, published = _publish(ck, storage, "prox", uri, "proxied")
        art = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
        assert art.startswith("mlflow-artifacts:") and published == f"{storage}/prox/weights"
        stored = server_dir / "artifacts" / art.split(":", 1)[1].lstrip("/")
        for name in ("weights", "weights_ema"):
            _same_files(_local_fs(), f"{ck}/{name}", str(stored / name))
            _same_files(_local_fs(), f"{ck}/{name}", f"{storage}/prox/{name}")    # beside the run too
        spooled = [p for p, mode in watch.opened if "w" in str(mode)]
        assert spooled and all(p.startswith(str(tmp_path / "driver-tmp")) for p in spooled)
        assert len(spooled) == 2 * shards and not list((tmp_path / "driver-tmp").rglob("*.safetensors"))

        # the server's destination named: the registered model's files go there directly
        monkeypatch.setenv(ARTIFACTS_DESTINATION_ENV, str(server_dir / "artifacts"))
        with LocalWeightsWatch() as watch, mlflow.start_run():
            info, mv = registry.log_model(f"{ck}/weights", _spec(), registered_model_name="prox")
        assert not [p for p, mode in watch.opened if str(p).startswith(str(tmp_path / "driver-tmp"))]
        location = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
        _same_files(_local_fs(), f"{ck}/weights",
                    str(server_dir / "artifacts" / location.split(":", 1)[1].lstrip("/") / "artifacts" / "weights"))
        monkeypatch.delenv(ARTIFACTS_DESTINATION_ENV)
        loaded, _ = registry.load_model("models:/prox/1")           # downloaded through the proxy
        raw, _ = _state_dicts()
        assert all(torch.equal(loaded.state_dict()[k], raw[k]) for k in raw)
    finally:
        stop_process_group(server)


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")
