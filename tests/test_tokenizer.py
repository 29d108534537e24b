"""Patch k-means tokenizer (mae_scale.tokenizers): fit on real photos, determinism, files, refusals."""

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from untrusted_files import WritesFileOnLoad, tokenizer_refusal
import mae_scale.tokenizers.kmeans as tokmod
from data_pipeline import make_loader
from mae_scale.cli.tokenizer import add_tokenizer_parser
from mae_scale.tokenizers import PatchKMeansTokenizer, codebook_stats, fit_tokenizer, load_tokenizer
from mae_scale.tokenizers.kmeans import nearest_codeword, normalized_patches
from mae_scale.visualize import normalize_on_device

SIZE, VOCAB, BATCH = 64, 32, 32  # 4x4 patches per crop: a fit over 128 photos takes about a second


@pytest.fixture(scope="module")
def fitted(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    summary = fit_tokenizer(small_shards, VOCAB, out, input_size=SIZE, batch_size=BATCH, seed=0,
                            progress=False, device="cpu")
    return out, summary


@pytest.fixture(scope="module")
def held_out(small_shards):
    """Crops the fit never saw (another loader epoch and seed), ImageNet-normalized."""
    batch = next(iter(make_loader(small_shards, 64, epoch=5, seed=123, input_size=SIZE)))
    return normalize_on_device(batch["image"], "cpu")


def test_fit_summary_encode_shape_and_quality(fitted, held_out):
    path, summary = fitted
    assert summary["images"] == 128 and summary["patches"] == 128 * 16 and summary["vocab"] == VOCAB
    tok = load_tokenizer(path)
    assert tok.vocab_size == VOCAB and tok.patch_size == 16
    ids = tok.encode(held_out)
    assert ids.shape == (64, 4, 4) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < VOCAB
    stats = codebook_stats(tok, held_out)
    # The codebook must describe unseen patches clearly better than the best single codeword.
    assert stats["mse"] < 0.75 * stats["baseline_mse"], stats
    assert stats["usage"] > 0.5 and stats["perplexity"] > 8, stats


def test_same_seed_same_codebook_via_cli_and_other_seed_differs(fitted, small_shards, tmp_path):
    path, _ = fitted
    parser = argparse.ArgumentParser()
    add_tokenizer_parser(parser.add_subparsers(dest="verb", required=True))
    again = tmp_path / "again.safetensors"
    args = parser.parse_args(["tokenizer", "fit", str(small_shards), "--vocab", str(VOCAB), "--out", str(again),
                              "--input-size", str(SIZE), "--batch-size", str(BATCH), "--seed", "0"])
    assert args.run(args) == 0
    assert torch.equal(load_tokenizer(again).codebook, load_tokenizer(path).codebook)
    other = tmp_path / "other.safetensors"
    fit_tokenizer(small_shards, VOCAB, other, input_size=SIZE, batch_size=BATCH, seed=1, progress=False,
                  device="cpu")
    assert not torch.equal(load_tokenizer(other).codebook, load_tokenizer(path).codebook)


def test_max_images_caps_the_fit(small_shards, tmp_path):
    summary = fit_tokenizer(small_shards, 16, tmp_path / "t.safetensors", input_size=SIZE, batch_size=BATCH,
                            max_images=40, progress=False, device="cpu")
    assert summary["images"] == 40 and summary["patches"] == 40 * 16


def test_save_load_round_trip_gives_identical_tokens(fitted, held_out, tmp_path):
    tok = load_tokenizer(fitted[0])
    tok.save(tmp_path / "copy.safetensors")
    copy = PatchKMeansTokenizer.load(tmp_path / "copy.safetensors")
    assert torch.equal(copy.codebook, tok.codebook)
    assert torch.equal(copy.encode(held_out), tok.encode(held_out))


def test_nearest_codeword_in_chunks_matches_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    patches, codebook = torch.randn(300, 768, generator=g), torch.randn(50, 768, generator=g)
    expected = torch.cdist(patches, codebook).argmin(dim=1)
    monkeypatch.setattr(tokmod, "_CHUNK_ELEMENTS", 50 * 7)  # 7 patches per chunk
    assert torch.equal(nearest_codeword(patches, codebook), expected)


def test_patch_normalisation_and_flat_patches():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32, generator=g) * 3 + 1
    imgs[1, :, :16, :16] = 0.7  # one constant patch
    patches = normalized_patches(imgs, 16)
    assert patches.shape == (2, 4, 768)
    torch.testing.assert_close(patches[0].mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches[0].var(-1), torch.ones(4), atol=1e-4, rtol=0)
    assert torch.equal(patches[1, 0], torch.zeros(768))  # flat patch -> zero vector, not NaN
    # A uniform colour is not flat after ImageNet normalization: its channel pattern survives.
    gray = normalize_on_device(torch.full((1, 3, 16, 16), 128, dtype=torch.uint8), "cpu")
    colour = normalized_patches(gray, 16)[0, 0].reshape(16, 16, 3)
    assert colour.abs().max() > 0.5 and torch.equal(colour[3, 5], colour[0, 0])
    codebook = torch.randn(8, 768, generator=g)
    tok = PatchKMeansTokenizer(codebook)
    nearest_origin = codebook.norm(dim=1).argmin()
    assert tok.encode(imgs)[1, 0, 0] == nearest_origin


# ---------------------------------------------------------------- refusals
def test_refuses_pickles_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    pkl = tmp_path / "encoder.pkl"
    pkl.write_bytes(pickle.dumps(WritesFileOnLoad(marker)))
    message = tokenizer_refusal(pkl)
    assert "encoder.pkl" in message and "state dict" in message
    assert not marker.exists()
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    assert "state dict" in tokenizer_refusal(pt)


def test_refuses_other_files_and_urls(tmp_path):
    text = tmp_path / "codebook.txt"
    text.write_text("not a tokenizer\n")
    message = tokenizer_refusal(text)
    assert "codebook.txt" in message and "safetensors" in message
    foreign = tmp_path / "dvae.safetensors"
    save_file({"encoder.blocks.input.w": torch.zeros(2, 2)}, str(foreign))
    assert "not implemented" in tokenizer_refusal(foreign)
    assert "URL" in tokenizer_refusal("https://example.com/tok.safetensors")
    assert "not found" in tokenizer_refusal(tmp_path / "missing.safetensors")
