"""The config contract: every field of both config trees is checked through the real loaders
(wrong type, NaN, infinities, out of its declared range), each cross-field rule and each malformed
YAML is refused in one line naming what to fix, and the CLI exits 2 before creating anything."""

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from test_config import sized_manifest

from mae_scale.config import ConfigError, PretrainConfig, load_config
from mae_scale.config_load import default_of, leaf_fields
from mae_scale.finetune_config import FinetuneConfig, load_finetune_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/pretrain/mae_vit_tiny_smoke.yaml"
FT = ROOT / "configs/finetune/vit_base_patch16_100ep.yaml"


@pytest.fixture(scope="module")
def ft_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_shards")
    return [f"data.train_shards={sized_manifest(root / 'train')}",
            f"data.val_shards={sized_manifest(root / 'val', total=50_000)}"]


def _numeric(tp) -> tuple[bool, bool]:
    """(is numeric, is a list of numbers) for a field type."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    inner = args[0]
    if typing.get_origin(inner) is list:  # a list of numbers (betas), not of names (no_weight_decay)
        return typing.get_args(inner)[0] in (int, float), True
    return inner in (int, float), False


def _out_of_range(rng, is_int: bool) -> list:
    step = 1 if is_int else 0.5
    values = []
    if math.isfinite(rng.lo):
        values.append(rng.lo if rng.lo_open else rng.lo - step)
    if math.isfinite(rng.hi):
        values.append(rng.hi if rng.hi_open else rng.hi + step)
    return [int(v) for v in values] if is_int else values


def _cases():
    for kind, tree in (("pretrain", PretrainConfig), ("finetune", FinetuneConfig)):
        for key, f, tp in leaf_fields(tree):
            yield kind, key, "wrong type", None
            numeric, is_list = _numeric(tp)
            if not numeric:
                continue
            for bad in (".nan", ".inf", "-.inf"):
                yield kind, key, "override", f"[{bad}, 0.5]" if is_list else bad
            rng = f.metadata.get("range")
            inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
            for v in _out_of_range(rng, inner[0] is int) if rng else []:
                yield kind, key, "override", f"[{v}, 0.5]" if is_list else str(v)


def _wrong_type_value(tp):
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if typing.get_origin(tp) is typing.Union else tp
    if base is dict:
        return [1]
    if typing.get_origin(base) is list:
        return "x"
    return {"a": 1}


def _load(kind, overrides, preset=None, ft_shards=()):
    if kind == "pretrain":
        return load_config(preset or SMOKE, overrides)
    return load_finetune_config(preset or FT, [*ft_shards, *overrides])


@pytest.mark.parametrize("kind,key,how,value", list(_cases()), ids=lambda x: str(x))
def test_every_field_refuses_wrong_types_non_finite_and_out_of_range_values(kind, key, how, value, tmp_path,
                                                                             ft_shards):
    """One walk over both trees: each field, each generic kind, through the real loader."""
    import yaml

    preset, overrides = None, [f"{key}={value}"]
    if how == "wrong type":  # through a preset: an override of a str field is always text
        tp = dict((k, t) for k, _, t in leaf_fields(PretrainConfig if kind == "pretrain" else FinetuneConfig))[key]
        node = _wrong_type_value(tp)
        for part in reversed(key.split(".")):
            node = {part: node}
        preset = tmp_path / "bad.yaml"
        preset.write_text(yaml.safe_dump({"base": str(SMOKE if kind == "pretrain" else FT), **node}))
        overrides = []
    with pytest.raises(ConfigError) as err:
        shards = [s for s in ft_shards if not s.startswith(f"{key}=")]  # the bad value is this test's
        _load(kind, overrides, preset, shards if kind == "finetune" else ())
    assert key in str(err.value) and "\n" not in str(err.value)


def test_every_numeric_field_declares_a_range_its_default_satisfies():
    for tree in (PretrainConfig, FinetuneConfig):
        for key, f, tp in leaf_fields(tree):
            if not _numeric(tp)[0]:
                continue
            rng = f.metadata.get("range")
            assert rng is not None, f"{key} has no range"
            default = default_of(f)
            for v in default if isinstance(default, list) else [default]:
                assert v is None or rng.contains(v), key


def test_the_presets_load_as_they_are(ft_shards, tmp_path):
    """Every shipped preset passes the checks (given data where it names data not in the checkout)."""
    tok = tmp_path / "tok.safetensors"
    tok.touch()
    shards = sized_manifest(tmp_path / "imagenet")
    for preset in sorted((ROOT / "configs/pretrain").glob("*.yaml")):
        load_config(preset, [f"data.train_shards={shards}", f"model.tokenizer={tok}"]
                    if "beit" in preset.name else [f"data.train_shards={shards}"])
    for preset in sorted((ROOT / "configs").glob("*/vit_*.yaml")):
        load_finetune_config(preset, ft_shards)


# -- rules between fields ------------------------------------------------------------------------

def _refused(overrides, words, kind="pretrain", ft_shards=(), **kw):
    with pytest.raises(ConfigError) as err:
        if kind == "pretrain":
            load_config(SMOKE, overrides, **kw)
        else:
            load_finetune_config(FT, [*ft_shards, *overrides], **kw)
    message = str(err.value)
    assert words in message and "\n" not in message, message
    return message


@pytest.mark.parametrize("overrides,words", [
    (["data.input_size=100"], "multiple of the patch size 16 of model.name=mae_vit_tiny_patch16"),
    (["data.input_size=8"], "at least one patch"),
    (["model.objective=simmim", "model.name=vit_tiny_patch16", "data.input_size=100", "model.mask_patch_size=16"],
     "multiple of the patch size 16"),
    (["data.input_size=16", "model.mask_ratio=0.5"], "leaves no visible patch"),
    (["model.name=vit_tiny_patch16"], "not an MAE model"),
    (["train.warmup_epochs=4"], "train.warmup_epochs"),
    (["train.grad_accum_steps=3"], "train.grad_accum_steps=3 does not fit"),
    (["optim.min_lr=0.5"], "optim.min_lr=0.5 is above the peak learning rate"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["data.epoch_samples=64"], "needs data.resampled=true"),
    (["train.global_batch_size=2048", "train.micro_batch_size=16"], "larger than one epoch of data.train_shards (1024"),
    (["data.resampled=true", "data.epoch_samples=16"], "larger than one epoch"),
    (["data.decode_device=tpu"], "data.decode_device='tpu' is not allowed"),
    (["deepspeed={train_batch_size: 8}"], "deepspeed.train_batch_size is generated from train.global_batch_size"),
    (["deepspeed={zero_optimization: {stage: 3}}"], "set that instead"),
    (["deepspeed={bf16: true}"], "deepspeed.bf16=True must be a mapping"),
])
def test_rules_between_fields(overrides, words):
    _refused(overrides, words)


def test_objective_ignored_fields_refused_where_they_shape_masks_or_targets_else_warned(tmp_path, capsys):
    tok = tmp_path / "tok.safetensors"
    tok.touch()
    _refused([f"model.tokenizer={tok}"], "model.tokenizer")  # mae: a tokenizer means beit was meant
    _refused(["model.mask_patch_size=64"], "read only by objective simmim")
    beit = ["model.objective=beit", "model.name=vit_tiny_patch16", f"model.tokenizer={tok}",
            "model.num_masking_patches=20", "model.min_block_patches=4"]
    _refused([*beit, "model.mask_ratio=0.5"], "model.mask_ratio=0.5 is read only by objective mae / simmim")
    _refused([*beit[:3], "model.num_masking_patches=49"], "model.num_masking_patches=49 must be in [1, 49)")
    load_config(SMOKE, ["model.drop_path=0.2", "model.layer_scale=0.0"])  # mae: regularizers it lacks: warned
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("warning: model.") and "ignored" in line for line in err)
    load_config(SMOKE, [*beit, "model.norm_pix_loss=false"])
    assert "model.norm_pix_loss=False is read only by objective mae" in capsys.readouterr().err


def test_decode_device_must_exist_on_this_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(["data.decode_device=cuda"], "this machine has no CUDA device")
    assert load_config(SMOKE, ["data.decode_device=cuda"], scope="submit").data.decode_device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _refused(["data.decode_device=cuda:7"], "it has 2: cuda:0..cuda:1")
    assert load_config(SMOKE, ["data.decode_device=cuda:1"]).data.decode_device == "cuda:1"


def test_output_and_cache_dirs_must_be_writable_directories(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(["output_dir="], "output_dir is empty")
    _refused([f"output_dir={a_file}"], "is a file, not a directory")
    _refused([f"output_dir={a_file}/run"], "lies under")
    _refused([f"data.cache_dir={a_file}"], "data.cache_dir")
    run = tmp_path / "new" / "run"
    load_config(SMOKE, [f"output_dir={run}"])
    assert not (tmp_path / "new").exists()  # checked, not made
    # root may write anywhere, so a read-only parent is simulated: what the check asks the OS
    from mae_scale import config_checks
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: Path(path) != tmp_path)
    _refused([f"output_dir={run}"], f"({tmp_path} is not writable for this user)")


def test_shard_sets_the_loader_could_not_open(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused([f"data.train_shards={empty}"], "holds neither manifest.json nor .tar shards")
    tars = tmp_path / "tars"
    tars.mkdir()
    for i in range(3):
        (tars / f"part-{i:04d}.tar").touch()
    _refused([f"data.train_shards={tars}"], f"such as {tars}/part-{{0000..0002}}.tar")
    _refused([f"data.train_shards={tars}/x-{{0..3}}.tar"], "matches no file")
    _refused([f"data.train_shards={tars}/part-{{0000..0004}}.tar"], "2 of its 5 files are missing")
    good = sized_manifest(tmp_path / "good", total=100)
    _refused([f"data.train_shards={good}", "train.global_batch_size=128"], "(100 samples)")
    (good / "train-000003.tar").unlink()
    _refused([f"data.train_shards={good}/manifest.json"], "lists 1 shard(s) that are not there")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": "mae-scale-shards/1", "shards": [')
    _refused([f"data.train_shards={broken}"], "is not valid JSON")
    (broken / "manifest.json").write_text('{"format": "mae-scale-shards/1", "shards": []}')
    _refused([f"data.train_shards={broken}"], "lacks fields")


def test_finetune_rules(ft_shards, tmp_path, capsys):
    _refused(["data.input_size=100"], "patch size 16 of model.arch=vit_base_patch16", "finetune", ft_shards)
    small = sized_manifest(tmp_path / "small", total=500)
    _refused([f"data.train_shards={small}"], "larger than one epoch of data.train_shards (500", "finetune", ft_shards)
    # evaluation alone needs no train shards and no epoch of them, but the weights it evaluates
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")
    load_finetune_config(FT, [ft_shards[1], "data.train_shards=/nope", f"model.init={weights}"], eval_only=True)
    _refused(["data.train_shards=/nope"], "--eval-only needs model.init=", "finetune", ft_shards[1:], eval_only=True)
    load_finetune_config(FT, [*ft_shards, "optim.momentum=0.5"])
    assert "optim.momentum=0.5 is read only with optim.name=lars / sgd" in capsys.readouterr().err
    _refused(["deepspeed={optimizer: {type: Adam}}"], "deepspeed.optimizer", "finetune", ft_shards)


def test_unknown_deepspeed_keys_are_warned(capsys):
    load_config(SMOKE, ["deepspeed={zero_optimisation: {stage: 2}}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: deepspeed.zero_optimisation is not a DeepSpeed config key") and "\n" not in err


# -- YAML ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    (b"output_dir: runs/\xff\xfe\n", "is not UTF-8 text (byte 0xff"),
    (b"train:\n  epochs: 3\n  epochs: 4\n", "key 'epochs' appears twice (lines 2 and 3)"),
    (b"train: {}\noutput_dir: a\ntrain: {}\n", "key 'train' appears twice"),
    (b"base: [a.yaml]\n", "base: must name another preset file"),
    (b"base:\n", "base: must name another preset file"),
    (b"base: self.yaml\n", "the base: chain loops (self.yaml -> self.yaml)"),
    (b"", "is empty (or only comments)"),
    (b"# nothing here\n\n", "is empty (or only comments)"),
    (b"- a\n- b\n", "must hold a mapping"),
    (b"base: missing.yaml\n", "names base: "),
    (b"train: [1\n", "is not valid YAML"),
    (b"train: 5\n", "train must be a mapping"),
])
def test_malformed_presets(tmp_path, text, words):
    preset = tmp_path / "self.yaml"
    preset.write_bytes(text)
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_base_cycle_over_two_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"loops \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")


def test_overrides_that_are_not_key_value():
    _refused(["train..epochs=3"], "must look like key=value")
    _refused(["=3"], "must look like key=value")
    _refused(["deepspeed={a: 1, a: 2}"], "appears twice")


# -- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad,words", [
    ("optim.blr=nan", "error: optim.blr=nan is not a finite number"),
    ("train.global_batch_size=2048", "error: train.global_batch_size=2048 is larger than one epoch"),
])
def test_cli_refuses_in_one_line_with_status_2_and_creates_nothing(tmp_path, bad, words):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mae_scale", "pretrain", "--config", str(SMOKE), bad,
                           f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(words) and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()
