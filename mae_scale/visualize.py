"""Pictures people would rather look at than read: MAE (and SimMIM / BEiT) reconstructions and the
loss curve.

The reconstruction grid has one row per image and four columns, as in the MAE paper's figures:
original | masked input | reconstruction | reconstruction with the visible patches pasted back.
With norm_pix_loss the model predicts per-patch normalized pixels; to show them, each predicted
patch is mapped back with its original patch's mean and std (the usual way to view such models).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mae_scale.models.patches import patchify, token_mask_to_pixels, unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std in uint8 units, made once per device (not a host copy every step)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def normalize_on_device(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 normalized on `device` (normalization belongs on the device)."""
    mean, std = _mean_std_255(torch.device(device))
    return (images_uint8.to(device, non_blocking=True).float() - mean) / std


def _to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """Normalized float [N,3,H,W] -> uint8 [N,H,W,3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (imgs.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruction_images(model, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """Run the model and return the four panels as normalized float tensors [N,3,H,W]."""
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.norm_pix_loss:  # undo the per-patch normalization with the true patch statistics
        target = model.patchify(imgs.float())
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    p = model.patch_embed.patch_size[0]
    mask_img = model.unpatchify(mask.float().unsqueeze(-1).repeat(1, 1, p * p * 3))  # 1 = masked
    imgs = imgs.float()
    masked = imgs * (1 - mask_img)
    pasted = imgs * (1 - mask_img) + recon * mask_img
    return imgs, masked, recon, pasted


def reconstruction_grid(model, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> Image.Image:
    panels = [_to_uint8(x) for x in reconstruction_images(model, imgs, mask_ratio, noise)]
    rows = [np.concatenate([panel[i] for panel in panels], axis=1) for i in range(panels[0].shape[0])]
    grid = np.concatenate(rows, axis=0)
    return Image.fromarray(grid)


def _mim_grid(imgs: torch.Tensor, pix_mask: torch.Tensor, third: torch.Tensor, pred: torch.Tensor) -> Image.Image:
    """original | masked input | `third` | `pred` pasted into the masked patches, one row per image."""
    panels = [imgs, imgs * (1 - pix_mask), third, imgs * (1 - pix_mask) + pred.float() * pix_mask]
    panels = [_to_uint8(x) for x in panels]
    rows = [np.concatenate([panel[i] for panel in panels], axis=1) for i in range(panels[0].shape[0])]
    return Image.fromarray(np.concatenate(rows, axis=0))


@torch.no_grad()
def _in_eval(model, run):
    """`run()` with the model in eval mode (no drop path), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        return run()
    finally:
        model.train(was_training)


def simmim_grid(model, imgs: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """SimMIM pictures: original | masked input | predicted pixels | prediction pasted into the
    masked patches."""
    imgs = imgs.float()
    pix_mask = token_mask_to_pixels(mask, model.patch_size, tuple(model.patch_embed.grid_size))
    pred = _in_eval(model, lambda: model(imgs, mask)[1].float())
    return _mim_grid(imgs, pix_mask, pred, pred)


def beit_grid(model, imgs: torch.Tensor, mask: torch.Tensor, tokenizer) -> Image.Image:
    """BEiT-style pictures: the model predicts token ids, shown as their codewords mapped back with
    each true patch's mean and std (the third panel is then the tokenizer's own rendering of the
    target, the fourth the model's guesses). A tokenizer without ``decode_patches`` (the DALL-E
    encoder: no decoder here) gets the true image as third panel and, in the fourth, the masked
    patches whose id was guessed right (the rest black)."""
    imgs = imgs.float()
    p = model.patch_size
    h, w = model.patch_embed.grid_size
    pix_mask = token_mask_to_pixels(mask, p, (h, w))
    target = tokenizer.encode(imgs)  # [B, h, w]
    logits = _in_eval(model, lambda: model(imgs, mask, target)[1])  # logits on the masked positions only
    guessed = target.reshape(target.shape[0], -1).clone()
    guessed[mask] = logits.argmax(-1)
    if not hasattr(tokenizer, "decode_patches"):  # no decoder (DALL-E encoder): right guesses only
        right = token_mask_to_pixels(guessed == target.reshape(target.shape[0], -1), p, (h, w))
        return _mim_grid(imgs, pix_mask, imgs, imgs * right - 10.0 * (1 - right))  # wrong: black (clamped)
    patches = patchify(imgs, p)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5

    def render(ids: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokenizer.decode_patches(ids) * std + mean, p, (h, w))

    return _mim_grid(imgs, pix_mask, render(target.reshape(target.shape[0], -1)), render(guessed))


def _rows_with(rows: list[dict], key: str) -> list[dict]:
    """The rows of metrics.jsonl that carry `key` (logged steps carry loss; monitor rows their figures)."""
    return [row for row in rows if row.get(key) is not None]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_loss_curve(metrics: list[dict], out_png: Path) -> bool:
    """Plot loss and lr from the run's metrics.jsonl rows (`RunDir.rows`)."""
    rows = _rows_with(metrics, "loss")
    if not rows:
        return False
    steps, losses, lrs = [r["step"] for r in rows], [r["loss"] for r in rows], [r["lr"] for r in rows]
    plt = _pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_loss.plot(steps, losses, lw=1)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, lrs, lw=1, color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


MONITOR_CURVES = (("heldout_loss", "held-out loss"), ("knn_top1_cls", "k-NN top-1 % (cls)"),
                  ("knn_top1_mean", "k-NN top-1 % (mean-pooled)"))


def save_monitor_curves(metrics: list[dict], out_png: Path) -> bool:
    """Plot the monitor's figures (held-out loss, k-NN top-1) against the step, one panel each."""
    curves = [(label, _rows_with(metrics, key), key) for key, label in MONITOR_CURVES]
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(curves), 1, figsize=(7, 2.5 * len(curves)), sharex=True, squeeze=False)
    for ax, (label, rows, key) in zip(axes[:, 0], curves):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True
