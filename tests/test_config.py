"""The typed config: presets load, overrides apply, bad configs are refused with one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mae_scale.config import ConfigError, check_batch_layout, load_config, peak_lr, read_preset

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml"
HUGE = ROOT / "configs/pretrain/mae_vit_huge_patch14_800ep.yaml"


def sized_manifest(folder: Path, total: int = 1_281_167, classes: int = 1000, shards: int = 4) -> Path:
    """A shard folder whose manifest says ImageNet's size: what config checks read (they never open a
    tar), so a preset's batch can be checked against an epoch without ImageNet on disk. The tars are
    empty files: no test that uses this reads data."""
    folder.mkdir(parents=True, exist_ok=True)
    per = [total // shards + (i < total % shards) for i in range(shards)]
    entries = [{"name": f"train-{i:06d}.tar", "samples": n, "bytes": 0, "sha256": ""} for i, n in enumerate(per)]
    for e in entries:
        (folder / e["name"]).touch()
    (folder / "manifest.json").write_text(json.dumps({
        "format": "mae-scale-shards/1", "prefix": "train", "shards": entries, "total": total,
        "num_classes": classes, "classes": [f"n{i:08d}" for i in range(classes)]}))
    return folder


def test_huge_preset_is_the_paper_recipe(tmp_path):
    cfg = load_config(HUGE, [f"data.train_shards={sized_manifest(tmp_path)}"])
    assert cfg.model.name == "mae_vit_huge_patch14"
    assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
    assert cfg.train.global_batch_size == 4096 and cfg.train.epochs == 800 and cfg.train.warmup_epochs == 40
    assert cfg.optim.blr == 1.5e-4 and cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05
    assert cfg.optim.min_lr == 0.0 and cfg.optim.clip_grad is None
    assert cfg.optim.no_weight_decay == []  # the official script decays cls_token and mask_token too
    assert cfg.data.input_size == 224 and cfg.data.crop_scale_min == 0.2
    assert peak_lr(cfg) == pytest.approx(1.5e-4 * 4096 / 256)


def test_inherited_presets_change_only_what_they_say(tmp_path):
    shards = sized_manifest(tmp_path)
    large = load_config(ROOT / "configs/pretrain/mae_vit_large_patch16_800ep.yaml", [f"data.train_shards={shards}"])
    base = load_config(ROOT / "configs/pretrain/mae_vit_base_patch16_1600ep.yaml", [f"data.train_shards={shards}"])
    assert large.model.name == "mae_vit_large_patch16" and large.train.epochs == 800
    assert base.model.name == "mae_vit_base_patch16" and base.train.epochs == 1600
    assert base.optim.blr == large.optim.blr == 1.5e-4 and base.train.global_batch_size == 4096


@pytest.mark.parametrize("preset", ["simmim_vit_base_patch16_800ep", "beit_vit_base_patch16_800ep",
                                    "fashion_mnist_simmim", "fashion_mnist_beit"])
def test_simmim_and_beit_presets_spare_what_their_official_scripts_spare(preset):
    """Their models' no_weight_decay() lists: {pos_embed, cls_token}; mask_token is decayed."""
    data = read_preset(ROOT / f"configs/pretrain/{preset}.yaml")
    assert data["optim"]["no_weight_decay"] == ["cls_token", "pos_embed"]


def test_no_weight_decay_takes_token_names_only():
    cfg = load_config(SMOKE, ["optim.no_weight_decay=[cls_token,mask_token]"])
    assert cfg.optim.no_weight_decay == ["cls_token", "mask_token"]
    with pytest.raises(ConfigError, match=r"optim.no_weight_decay\[1\]='blocks.0.attn' is not allowed; use one of"):
        load_config(SMOKE, ["optim.no_weight_decay=[cls_token,blocks.0.attn]"])
    with pytest.raises(ConfigError, match="optim.no_weight_decay='cls_token' has the wrong type; expected list"):
        load_config(SMOKE, ["optim.no_weight_decay=cls_token"])


def test_overrides_apply_with_types():
    cfg = load_config(SMOKE, ["train.max_steps=7", "optim.lr=0.001", "tracking.run_name=123", "optim.clip_grad=null"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 0.001 and cfg.tracking.run_name == "123"
    assert cfg.optim.clip_grad is None and peak_lr(cfg) == 0.001
    assert load_config(SMOKE, ["optim.blr=1e-4"]).optim.blr == 1e-4  # YAML 1.1 reads 1e-4 as text


@pytest.mark.parametrize("override, words", [
    ("model.mask_ratio=1.0", "model.mask_ratio"),
    ("model.mask_ratio=0", "model.mask_ratio"),
    ("model.name=vit_gigantic", "mae_vit_huge_patch14"),
    ("train.bogus=1", "unknown key train.bogus"),
    ("train.micro_batch_size=many", "train.micro_batch_size"),
    ("train.precision=fp16", "'bf16', 'fp32'"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("data.train_shards=/does/not/exist", "data.train_shards"),
    ("train.global_batch_size=33", "not divisible"),
])
def test_bad_config_refused(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, [override])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_batch_layout_checks_world_size():
    cfg = load_config(SMOKE, ["train.global_batch_size=48", "train.micro_batch_size=8"])
    assert check_batch_layout(cfg, 2) == 3
    with pytest.raises(ConfigError, match="world size 4"):
        check_batch_layout(cfg, 4)
    cfg = load_config(SMOKE, ["train.grad_accum_steps=1"])  # 32 = 16 x 1 x world 2: fits a world of 2, not of 1
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        check_batch_layout(cfg, 1)


def test_cli_refuses_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mae_scale", "pretrain", "--config", str(SMOKE),
                           "model.mask_ratio=1.5", f"output_dir={out}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model.mask_ratio=1.5")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was started


def test_cli_missing_preset_file():
    proc = subprocess.run([sys.executable, "-m", "mae_scale", "pretrain", "--config", "nope.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.yaml does not exist" in proc.stderr
