"""The objectives registry: each entry says what it owns, truthfully.

`reads` must name real model.* fields, `pretrain_only_prefixes` must be exactly what the objective's
model holds beyond timm's ViT encoder (what `export` drops), and a run's MLflow params carry only
the model.* settings its objective reads. A fourth objective added to OBJECTIVES is checked by the
same tests.
"""

import dataclasses
import typing

import pytest
import timm
import torch

from mae_scale.config import ModelConfig, load_config
from mae_scale.config_checks import objective_fields
from mae_scale.models.mim import build_mim
from mae_scale.objectives import OBJECTIVES
from mae_scale.train.pretrain import PretrainTask

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_declares_what_it_owns(name):
    objective = OBJECTIVES[name]
    assert objective.name == name
    assert set(objective.reads) <= MODEL_FIELDS, set(objective.reads) - MODEL_FIELDS
    for method in ("encoder_arch", "check", "build_model", "flops_per_image", "loss", "picture", "heldout_loss",
                   "features"):
        assert callable(getattr(objective, method, None)), method
    assert name in typing.get_args(typing.get_type_hints(ModelConfig)["objective"])  # the config accepts it


def _model(name):
    """The objective's tiny model, built as its objective builds it (BEiT: a 16-word vocabulary
    stands in for the tokenizer's)."""
    torch.manual_seed(0)
    if name == "mae":
        cfg = load_config(None, ["model.name=mae_vit_tiny_patch16", "data.input_size=32"], scope="plan")
        return OBJECTIVES[name](cfg).build_model()
    return build_mim("vit_tiny_patch16", name, img_size=32, vocab_size=16)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_pretrain_only_prefixes_are_exactly_what_is_not_the_encoder(name):
    layer_scale = None if name == "mae" else 0.1  # the masked-ViT encoder's blocks carry layer scale
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, pretrained=False,
                                init_values=layer_scale)
    keys = set(_model(name).state_dict())
    beyond = {k for k in keys if k not in encoder.state_dict()}
    prefixes = OBJECTIVES[name].pretrain_only_prefixes
    assert beyond and all(k.startswith(prefixes) for k in beyond), beyond
    assert all(any(k.startswith(p) for k in beyond) for p in prefixes), "a prefix that matches nothing"
    assert not any(k.startswith(prefixes) for k in keys - beyond)  # no encoder weight is dropped


def test_tracked_params_drop_the_settings_of_other_objectives():
    flat = {f"model.{name}": 1 for name in objective_fields()} | {"model.name": "x", "optim.blr": 1e-4}
    for name, objective in OBJECTIVES.items():
        kept = PretrainTask(objective(None)).tracked_params(flat)
        model_keys = {k.removeprefix("model.") for k in kept if k.startswith("model.")}
        assert model_keys == set(objective.reads) | {"name"}, name
        assert kept["optim.blr"] == 1e-4
    assert "model.norm_pix_loss" not in PretrainTask(OBJECTIVES["beit"](None)).tracked_params(flat)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_heldout_loss_and_features_of_every_objective(name, tmp_path):
    """What the monitor asks of an objective: a loss whose masks follow the per-image seeds, and the
    encoder's tokens of unmasked images [B, 1+L, D]."""
    from mae_scale.tokenizers import PatchKMeansTokenizer

    tokenizer = tmp_path / "tok.safetensors"
    PatchKMeansTokenizer(torch.randn(16, 16 * 16 * 3, generator=torch.Generator().manual_seed(0))).save(tokenizer)
    extra = {"mae": ["model.name=mae_vit_tiny_patch16"],
             "simmim": ["model.name=vit_tiny_patch16", "model.mask_ratio=0.5"],
             "beit": ["model.name=vit_tiny_patch16", f"model.tokenizer={tokenizer}", "model.num_masking_patches=6",
                      "model.min_block_patches=2"]}[name]
    cfg = load_config(None, [f"model.objective={name}", "data.input_size=64", *extra], scope="plan")
    objective = OBJECTIVES[name](cfg)
    torch.manual_seed(0)
    model = objective.build_model().eval()
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = objective.features(model, imgs)
        loss = objective.heldout_loss(model, imgs, [11, 12, 13])
        same = objective.heldout_loss(model, imgs, [11, 12, 13])
        other = objective.heldout_loss(model, imgs, [21, 22, 23])
    assert tokens.shape == (3, 1 + 16, 192) and torch.isfinite(tokens).all()
    assert torch.isfinite(loss) and torch.equal(loss, same) and not torch.equal(loss, other)
