"""Bad samples in a real pretraining run: skipped and counted (terminal, metrics, MLflow), and a
one-line error once their share passes data.max_bad_fraction."""

import json

import pytest
from PIL import Image

from run_helpers import base_overrides, run_pretrain


@pytest.fixture(scope="module")
def shards_with_bad_samples(tmp_path_factory):
    from data_pipeline import make_sample_folder, write_shards

    root = tmp_path_factory.mktemp("bad_shards")
    images = make_sample_folder(root / "images", n_images=128, seed=1)
    cls_dir = next(p for p in (images / "train").iterdir() if p.is_dir())
    (cls_dir / "garbage.JPEG").write_bytes(b"this is not an image at all")
    (cls_dir / "empty.JPEG").write_bytes(b"")
    (cls_dir / "truncated.JPEG").write_bytes(next(cls_dir.glob("*.JPEG")).read_bytes()[:300])
    Image.new("L", (1, 1), 128).save(cls_dir / "tiny_gray.JPEG", format="JPEG")  # odd but usable
    write_shards(images, root / "shards", samples_per_shard=40, seed=0, progress=False)
    return root / "shards"


def test_bad_samples_are_skipped_and_counted(shards_with_bad_samples, tmp_path):
    out = tmp_path / "runs" / "bad"
    proc = run_pretrain(base_overrides(shards_with_bad_samples, out, **{
        "train.max_steps": 8, "data.max_bad_fraction": 0.2, "tracking.enabled": "true"}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and rows[-1]["bad_samples"] >= 1
    assert "bad samples skipped" in proc.stdout
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "result.json").read_text())["mlflow_run_id"]
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["bad_samples"] >= 1


def test_too_many_bad_samples_stop_with_one_line(shards_with_bad_samples, tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(base_overrides(shards_with_bad_samples, out, **{"data.max_bad_fraction": 0.001}), check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "max_bad_fraction" in errors[0]


def test_damaged_shard_is_skipped_and_the_run_finishes(tmp_path):
    """One of four shards cut short in the middle of a sample (what a copy interrupted by a full
    disk leaves): the run finishes, and the samples lost with it are counted by their kind."""
    import tarfile

    from data_pipeline import make_sample_folder, write_shards

    images = make_sample_folder(tmp_path / "images", n_images=128, seed=2)
    manifest = write_shards(images, tmp_path / "shards", samples_per_shard=32, seed=0, progress=False)
    victim = tmp_path / "shards" / manifest["shards"][1]["name"]
    with tarfile.open(victim) as tf:
        jpg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][3]
    victim.write_bytes(victim.read_bytes()[:jpg.offset_data + jpg.size // 2])  # 3 samples survive

    out = tmp_path / "runs" / "damaged"
    # 29 of 128 samples lost (23 %): above the default 1 %, so the run says how much it accepts
    proc = run_pretrain(base_overrides(tmp_path / "shards", out, **{
        "train.max_steps": 10, "data.max_bad_fraction": 0.3}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10
    assert rows[-1]["bad_samples_truncated_shard"] >= 29  # the whole first epoch's loss, and on
    assert "bad samples skipped" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "skipping shard" in line]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "truncated_shard" in warnings[0]
    assert "Traceback" not in proc.stderr
