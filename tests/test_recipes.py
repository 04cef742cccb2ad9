"""The paper recipes as the paper ran them (issue 19): every pretraining recipe points at fine-tune
recipes that load and build its variant in its form; Table 10's fine-tuning values; the form
(model.preset) reaches the spec, fine-tuning's check and the capacity planner."""
from __future__ import annotations

import glob
import os
import re

import pytest

from pipeline.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "coatnet_*_*.yaml")))
FINETUNE = sorted(glob.glob(os.path.join(ROOT, "configs", "finetune_coatnet_*.yaml")))
POINTER = re.compile(r"configs/finetune_[\w*]+\.yaml")
DATASET_OF = {"imagenet1k": "imagenet1k", "imagenet21k": "imagenet21k_to_1k", "jft": "jft_to_1k"}

# Table 10 (COATNET.md): fine-tune stochastic depth and RandAugment (N, M) per (variant, source)
TABLE10 = {("imagenet1k", 0): (0.2, 2, 15), ("imagenet1k", 1): (0.3, 2, 15), ("imagenet1k", 2): (0.5, 2, 15),
           ("imagenet1k", 3): (0.7, 2, 20), ("imagenet21k", 2): (0.3, 0, None), ("imagenet21k", 3): (0.5, 0, None),
           ("imagenet21k", 4): (0.7, 0, None), ("jft", 3): (0.1, 2, 5), ("jft", 4): (0.3, 2, 5), ("jft", 5): (0.2, 2, 5),
           ("jft", 6): (0.2, 2, 5), ("jft", 7): (0.2, 2, 5)}    # C-6/7: C-5's (Table 10 has none)


@pytest.mark.parametrize("path", PRETRAIN, ids=os.path.basename)
def test_every_pretraining_recipe_points_at_fine_tunes_of_its_variant_and_form(path):
    pre = load_config(path)
    variant, dataset = re.fullmatch(r"coatnet_(\d)_(\w+)\.yaml", os.path.basename(path)).groups()
    pointers = POINTER.findall(pre.description)
    assert pointers, f"{path} names no fine-tune recipe"
    targets = sorted({t for p in pointers for t in glob.glob(os.path.join(ROOT, p))})
    assert targets, pointers
    for target in targets:
        name = os.path.basename(target)
        assert name.startswith(f"finetune_coatnet_{variant}_{DATASET_OF[dataset]}_"), (path, name)
        ft = load_config(target)                   # loads and validates
        assert ft.model.variant == pre.model.variant, (path, name)
        # fine-tuning refuses a source of another form; the stride placement must agree too
        assert ft.model.architecture().get("preset") == pre.model.architecture().get("preset") == "paper"
        assert ft.model.stride_mode == pre.model.stride_mode, name
        assert (ft.model.bn_eps, ft.model.bn_momentum) == (pre.model.bn_eps, pre.model.bn_momentum) == (1e-3, 0.01)


@pytest.mark.parametrize("path", FINETUNE, ids=os.path.basename)
def test_fine_tunes_follow_table_10(path):
    cfg = load_config(path)
    variant, dataset, size = re.fullmatch(r"finetune_coatnet_(\d)_(imagenet1k|imagenet21k|jft)\w*_(\d+)\.yaml",
                                          os.path.basename(path)).groups()
    rate, n, m = TABLE10[(dataset, int(variant))]
    a, t = cfg.data.augment, cfg.train
    assert cfg.model.drop_path_rate == rate and cfg.model.img_size == int(size)
    assert a.randaug_n == n and (m is None or a.randaug_m == m)
    assert a.eval_crop_pct == 1.0                      # Table 10: no centre crop when fine-tuning
    assert a.randaug_device and cfg.scaling.use_gpu    # the faster path on GPUs
    assert (t.lr, t.min_lr, t.schedule, t.weight_decay, t.ema_decay, t.epochs) == (5e-5, 5e-5, "constant", 1e-8,
                                                                                 0.9999, 30)
    assert t.global_batch == (1024 if dataset == "imagenet21k" else 512)
    assert a.mixup_alpha == (0.8 if dataset == "imagenet1k" else 0.0)
    assert cfg.init.reset_head == (dataset != "imagenet1k") and t.loss == "softmax"
    assert "Form:" in cfg.description and "centre crop" in cfg.description


def test_every_gpu_recipe_runs_randaugment_on_the_device_and_says_its_form():
    for path in PRETRAIN + FINETUNE:
        cfg = load_config(path)
        assert cfg.scaling.use_gpu and cfg.data.augment.randaug_device, path
        assert cfg.model.preset == "paper" and "Form:" in cfg.description, path
        assert cfg.data.augment.eval_crop_pct == (1.0 if "finetune_" in path else 0.875), path
    assert load_config(os.path.join(ROOT, "configs", "coatnet_3_jft.yaml")).model.stride_mode == "dw"   # C-3 dagger


def test_the_demo_recipes_keep_timm_form_and_no_randaugment():
    """The demo's accuracy (README: ~84%) is unaffected by the RandAugment change: it trains
    without RandAugment, in the default form."""
    for name in ("demo.yaml", "finetune_demo.yaml"):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert cfg.data.augment.randaug_n == 0 and cfg.model.preset == "timm" and cfg.model.architecture() == {}


def test_the_form_reaches_the_spec_and_the_planner():
    import models
    from pipeline.capacity import count_macs, model_facts
    from pipeline.spec import ModelSpec
    from pipeline.workflow import spec_for

    class Index:
        num_classes, class_names, label_type = 10, [str(i) for i in range(10)], "single"

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      ["model.preset=paper", "model.bn_eps=0.001", "model.bn_momentum=0.01", "model.num_classes=10"])
    spec = ModelSpec.from_dict(spec_for(cfg, Index()).to_dict())     # as stored next to the weights
    model = spec.build()
    assert (model.config.pool, model.config.stride_mode, model.config.bn_eps) == ("max", "expand", 1e-3)
    assert model.config.drop_path_schedule == "reference"
    paper = tuple(sorted(load_config(os.path.join(ROOT, "configs", "coatnet_0_imagenet1k.yaml")).model
                         .architecture().items()))
    assert dict(paper) == {"preset": "paper", "bn_eps": 1e-3, "bn_momentum": 0.01}
    # Eq. 5 (paper form) vs Table 9's strided DConv (timm form): 4.14 vs 4.55 GMACs for C-0
    assert count_macs("coatnet_0", 224, architecture=paper) == models.count_flops(
        models.create_model("coatnet_0", device="meta", preset="paper"))
    assert count_macs("coatnet_0", 224, architecture=paper) < 0.93 * count_macs("coatnet_0", 224)
    assert model_facts("coatnet_0", 224, architecture=paper).macs_per_image == count_macs("coatnet_0", 224,
                                                                                          architecture=paper)


def test_fine_tuning_refuses_a_source_of_another_form(tmp_path):
    from pipeline.finetune import FinetuneError, SourceModel, adapt
    from pipeline.weights import write_weights

    import models

    write_weights(str(tmp_path / "w"), models.create_model("coatnet_pico", num_classes=10, img_size=32)
                  .state_dict().items())
    timm_form = SourceModel(kind="weights", ref="src", weights=str(tmp_path / "w"), variant="coatnet_pico",
                            preset="timm")
    with pytest.raises(FinetuneError, match="model.preset=timm"):
        adapt(timm_form, "coatnet_pico", 64, 10, architecture={"preset": "paper"})
    sd, dropped = adapt(timm_form, "coatnet_pico", 64, 10, architecture={})
    assert not dropped and sd
