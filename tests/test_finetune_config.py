"""Fine-tuning / probing configs: every preset loads and holds the paper's numbers; bad values are
refused with one line naming the key, before any work."""

from pathlib import Path

import pytest

from mae_scale.config import ConfigError
from mae_scale.finetune_config import load_finetune_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def shards(tmp_path):
    """ImageNet-sized labelled shards as the config checks see them (a manifest; no tar is read): the
    presets' batches of 1024 and 16384 fit their epoch."""
    from test_config import sized_manifest

    return [f"data.train_shards={sized_manifest(tmp_path / 'train')}",
            f"data.val_shards={sized_manifest(tmp_path / 'val', total=50_000)}"]


@pytest.mark.parametrize("preset,mode,expected", [
    ("finetune/vit_base_patch16_100ep.yaml", "finetune",
     {"arch": "vit_base_patch16", "epochs": 100, "blr": 5e-4, "layer_decay": 0.65, "drop_path": 0.1}),
    ("finetune/vit_large_patch16_50ep.yaml", "finetune",
     {"arch": "vit_large_patch16", "epochs": 50, "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.2}),
    ("finetune/vit_huge_patch14_50ep.yaml", "finetune",
     {"arch": "vit_huge_patch14", "epochs": 50, "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.3}),
    ("linprobe/vit_huge_patch14_90ep.yaml", "linprobe",
     {"arch": "vit_huge_patch14", "epochs": 90, "blr": 0.1, "layer_decay": 1.0, "drop_path": 0.0}),
])
def test_presets_hold_the_recipe(preset, mode, expected, shards):
    cfg = load_finetune_config(ROOT / "configs" / preset, shards, mode=mode)
    got = {"arch": cfg.model.arch, "epochs": cfg.train.epochs, "blr": cfg.optim.blr,
           "layer_decay": cfg.optim.layer_decay, "drop_path": cfg.model.drop_path}
    assert got == expected
    if mode == "finetune":
        assert cfg.train.global_batch_size == 1024 and cfg.train.warmup_epochs == 5 and cfg.optim.min_lr == 1e-6
        assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.smoothing, cfg.data.reprob) == (0.8, 1.0, 0.1, 0.25)
        assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.model.global_pool == "avg"
        assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.weight_decay == 0.05
    else:
        assert cfg.train.global_batch_size == 16384 and cfg.optim.name == "lars" and cfg.optim.weight_decay == 0
        assert cfg.model.global_pool == "token" and cfg.train.warmup_epochs == 10


@pytest.mark.parametrize("override,named", [
    ("optim.layer_decay=1.5", "optim.layer_decay"),
    ("train.micro_batch_size=31", "train.micro_batch_size"),  # odd with mixup on
    ("model.arch=vit_gigantic", "model.arch"),
    ("data.reprob=1.0", "data.reprob"),
    ("model.num_classes=0", "model.num_classes"),
    ("optim.nesterov=true", "optim.nesterov"),
])
def test_bad_values_are_refused_naming_the_key(override, named, shards):
    with pytest.raises(ConfigError, match=named) as err:
        load_finetune_config(ROOT / "configs/finetune/vit_base_patch16_100ep.yaml", [*shards, override],
                             mode="finetune")
    assert "\n" not in str(err.value)


def test_missing_val_shards_say_how_to_make_them(small_shards):
    with pytest.raises(ConfigError, match="mae-scale data fashion-mnist"):
        load_finetune_config(ROOT / "configs/finetune/vit_base_patch16_100ep.yaml",
                             [f"data.train_shards={small_shards}"], mode="finetune")



def test_shards_with_more_classes_than_the_model_are_refused_before_any_work(digits_shards):
    """The manifest says 10 classes: a 5-class head would fail on the first batch holding a 7."""
    with pytest.raises(ConfigError, match=r"has 10 classes but model.num_classes=5; set model.num_classes=10") as err:
        load_finetune_config(ROOT / "configs/finetune/fashion_mnist_tiny.yaml",
                             [f"data.train_shards={digits_shards / 'train'}", f"data.val_shards={digits_shards / 'val'}",
                              "model.init=", "model.num_classes=5"], mode="finetune")
    assert "\n" not in str(err.value)


def test_brace_patterns_are_checked_against_the_manifest_only_when_it_lists_them(digits_shards):
    import json

    from mae_scale.finetune_config import _manifest_classes

    train = digits_shards / "train"
    names = [s["name"] for s in json.loads((train / "manifest.json").read_text())["shards"]]
    first, last = names[0].rsplit("-", 1)[1][:-4], names[-1].rsplit("-", 1)[1][:-4]
    listed = f"{train}/{names[0].rsplit('-', 1)[0]}-{{{first}..{last}}}.tar"
    assert _manifest_classes(listed) == 10
    assert _manifest_classes(f"{train}/other-{{000000..000001}}.tar") is None  # not this manifest's tars
    assert _manifest_classes("pipe:cat x-{0..1}.tar") is None and _manifest_classes("https://h/x.tar") is None


def test_unlabelled_shards_are_refused_for_finetuning(tmp_path, digits_shards):
    """Photos in one flat folder have no classes: fine-tuning on them is refused by name."""
    import shutil

    from data_pipeline import make_sample_folder, write_shards

    make_sample_folder(tmp_path / "images", n_images=8, seed=0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(sorted(p for p in (tmp_path / "images").rglob("*") if p.is_file())):
        shutil.copy(img, flat / f"{i}{img.suffix}")
    write_shards(flat, tmp_path / "shards", samples_per_shard=8, seed=0, progress=False)
    with pytest.raises(ConfigError, match="unlabelled shards"):
        load_finetune_config(ROOT / "configs/finetune/fashion_mnist_tiny.yaml",
                             [f"data.train_shards={tmp_path / 'shards'}", f"data.val_shards={digits_shards / 'val'}",
                              "model.init="], mode="finetune")


def test_eval_only_without_weights_is_refused_when_the_config_loads(digits_shards):
    """Before any process group or DeepSpeed engine starts (it used to be refused after both)."""
    with pytest.raises(ConfigError, match="--eval-only needs model.init"):
        load_finetune_config(None, [f"data.val_shards={digits_shards / 'val/manifest.json'}", "model.init=",
                                    "model.num_classes=10"], mode="finetune", eval_only=True)
