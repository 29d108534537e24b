"""A resume never silently changes the run: the saved config.yaml of a run directory against the new
config, key by key (safe / needs --accept-config-change / impossible), on real saved configs."""

from pathlib import Path

import pytest
import yaml
from test_config import sized_manifest

from mae_scale.config import ConfigError, PretrainConfig, load_config, save_config, to_dict
from mae_scale.config_resume import check_resume, resume_changes
from mae_scale.config_load import leaf_fields
from mae_scale.config_resume import ACCEPT, REFUSE, SAFE, resume_class
from mae_scale.finetune_config import FinetuneConfig, load_finetune_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml"
FT = ROOT / "configs/finetune/vit_base_patch16_100ep.yaml"


def saved(cfg, tmp_path) -> dict:
    """What the trainer wrote into the run directory, read back as the trainer will."""
    save_config(cfg, tmp_path / "config.yaml")
    return yaml.safe_load((tmp_path / "config.yaml").read_text())


def test_saved_config_loads_back_as_the_same_config(tmp_path):
    cfg = load_config(SMOKE, ["train.max_steps=7", "optim.clip_grad=1.5", "tracking.run_name=123"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert resume_changes(saved(cfg, tmp_path), again) == ([], [], [])


def test_every_key_of_both_trees_has_exactly_one_resume_class():
    keys = {k for tree in (PretrainConfig, FinetuneConfig) for k, _, _ in leaf_fields(tree)}
    assert not (SAFE & ACCEPT) and not (SAFE & REFUSE) and not (ACCEPT & REFUSE)
    listed = {k for k in SAFE | ACCEPT | REFUSE if not k.endswith(".*")}
    assert listed <= keys, listed - keys  # no stale names
    unlisted = [k for k in keys if k not in listed and not any(k.startswith(p[:-1]) for p in SAFE if p.endswith(".*"))]
    assert not unlisted, f"classify these for resume: {unlisted}"


def test_safe_changes_are_taken_and_listed(tmp_path):
    old = load_config(SMOKE)
    new = load_config(SMOKE, ["train.max_steps=5", "tracking.enabled=false", "data.num_workers=0",
                              "checkpoint.keep_last=3", "train.compile=false", "data.decode_device=cpu-batched"])
    taken = check_resume(saved(old, tmp_path), new)
    assert "train.max_steps: None -> 5" in taken and "tracking.enabled: True -> False" in taken
    assert "data.decode_device: 'cpu' -> 'cpu-batched'" in taken and len(taken) == 6


def test_run_changes_need_the_switch(tmp_path):
    old = saved(load_config(SMOKE), tmp_path)
    new = load_config(SMOKE, ["optim.blr=2e-3", "train.epochs=6"])
    with pytest.raises(ConfigError) as err:
        check_resume(old, new)
    message = str(err.value)
    assert "optim.blr: 0.001 -> 0.002" in message and "train.epochs: 3 -> 6" in message
    assert "--accept-config-change" in message and "\n" not in message
    assert check_resume(old, new, accept=True) == ["optim.blr: 0.001 -> 0.002", "train.epochs: 3 -> 6"]


@pytest.mark.parametrize("override,key", [
    ("data.input_size=64", "data.input_size: 112 -> 64"),
    ("model.name=mae_vit_tiny_patch4", "model.name: 'mae_vit_tiny_patch16' -> 'mae_vit_tiny_patch4'"),
    ("train.precision=fp32", "train.precision"),
    ("train.zero_stage=2", "train.zero_stage: 1 -> 2"),
    ("train.global_batch_size=16", "train.global_batch_size: 32 -> 16"),
    ("optim.betas=[0.9,0.999]", "optim.betas"),
    ("optim.no_weight_decay=[cls_token]", "optim.no_weight_decay: [] -> ['cls_token']"),
])
def test_what_the_checkpoint_cannot_take_is_refused_even_with_the_switch(tmp_path, override, key):
    old = saved(load_config(SMOKE), tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume(old, load_config(SMOKE, [override]), accept=True)
    assert key in str(err.value) and "another output_dir" in str(err.value) and "\n" not in str(err.value)


def test_refusal_comes_before_the_switchable_changes(tmp_path):
    old = saved(load_config(SMOKE), tmp_path)
    changes = resume_changes(old, load_config(SMOKE, ["optim.blr=2e-3", "data.input_size=64", "train.max_steps=4"]))
    assert changes.safe == ["train.max_steps: None -> 4"]
    assert changes.accept == ["optim.blr: 0.001 -> 0.002"] and changes.refuse == ["data.input_size: 112 -> 64"]
    with pytest.raises(ConfigError, match="cannot take"):
        check_resume(old, load_config(SMOKE, ["optim.blr=2e-3", "data.input_size=64"]), accept=True)


def test_keys_the_saved_config_predates_count_as_their_default(tmp_path):
    """A run saved before train.compile existed resumes unchanged while the new config keeps the default."""
    old = saved(load_config(SMOKE), tmp_path)
    del old["train"]["compile"], old["optim"]["min_lr"]
    old["train"]["removed_since"] = 1  # a key the tree no longer has cannot act on the run
    assert resume_changes(old, load_config(SMOKE)) == ([], [], [])
    assert resume_changes(old, load_config(SMOKE, ["optim.min_lr=1e-5"])).accept == ["optim.min_lr: 0.0 -> 1e-05"]


def test_a_run_from_before_no_weight_decay_resumes_only_with_its_rule(tmp_path):
    """Runs saved before optim.no_weight_decay spared every token: a resume under today's preset value
    (the official rule, [] for MAE) would move cls_token and mask_token into the other param group, so
    it is refused naming the key; the earlier list, given back, resumes with no change."""
    old = saved(load_config(SMOKE), tmp_path)
    del old["optim"]["no_weight_decay"]
    with pytest.raises(ConfigError, match=r"optim.no_weight_decay: \['cls_token', 'mask_token', .*\] -> \[\]"):
        check_resume(old, load_config(SMOKE), accept=True)
    earlier = "optim.no_weight_decay=[cls_token,mask_token,pos_embed,decoder_pos_embed,dist_token,reg_token]"
    assert resume_changes(old, load_config(SMOKE, [earlier])) == ([], [], [])


def test_finetune_resume(tmp_path):
    shards = [f"data.train_shards={sized_manifest(tmp_path / 'train')}",
              f"data.val_shards={sized_manifest(tmp_path / 'val', total=50_000)}"]
    old = saved(load_finetune_config(FT, shards, mode="finetune"), tmp_path)
    same = load_finetune_config(FT, [*shards, "train.eval_every_epochs=5"], mode="finetune")
    assert check_resume(old, same, kind="finetune") == ["train.eval_every_epochs: 1 -> 5"]
    with pytest.raises(ConfigError, match="model.arch: 'vit_base_patch16' -> 'vit_large_patch16'"):
        check_resume(old, load_finetune_config(FT, [*shards, "model.arch=vit_large_patch16"]), kind="finetune",
                     accept=True)
    with pytest.raises(ConfigError, match=r"data.mixup: 0.8 -> 0.5.*--accept-config-change"):
        check_resume(old, load_finetune_config(FT, [*shards, "data.mixup=0.5"]), kind="finetune")
    assert resume_class("tracking.experiment") == "safe" and resume_class("optim.layer_decay") == "refuse"
