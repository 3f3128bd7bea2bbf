"""Image-text data: sources (tar, Parquet, digits), the image path, preparing, packing and the loader."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kiln.config import DataConfig, load_config
from kiln.data.multimodal.images import decode, patchify
from kiln.data.multimodal.loader import DOC, PATCH, TOKEN, ImageLayout, MultimodalSampler, SplitStream, pixels_of
from kiln.data.multimodal.packing import EpochPlans, efficiency, pack
from kiln.data.multimodal.prepare import prepare_multimodal
from kiln.data.multimodal.sources import read_parquet, read_tar, resolve_source
from kiln.errors import DataError


def png(value: int, size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- sources


def test_tar_pairs_and_interleaved_documents(tmp_path):
    doc = {"segments": [{"text": "before"}, {"image": "0.png"}, {"text": "between"}, {"image": "1.png"}]}
    path = write_tar(
        tmp_path / "a.tar",
        [
            ("s/000.png", png(10)),
            ("s/000.txt", b"a caption"),
            ("s/001.jpg", png(20)),
            ("s/001.txt", b"another"),
            ("s/002.json", json.dumps(doc).encode()),
            ("s/002.0.png", png(30)),
            ("s/002.1.png", png(40)),
        ],
    )
    samples = list(read_tar(path))
    assert samples[0] == [png(10), "a caption"]
    assert samples[1] == [png(20), "another"]
    assert samples[2] == ["before", png(30), "between", png(40)]


def test_tar_sample_without_caption_is_refused(tmp_path):
    path = write_tar(tmp_path / "b.tar", [("000.png", png(1)), ("001.png", png(2)), ("001.txt", b"x")])
    with pytest.raises(DataError, match="000.*no image and caption pair"):
        list(read_tar(path))


def test_parquet_pairs_struct_images_and_interleaved(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "image": [png(1), png(2)]}), pairs)
    assert list(read_parquet(pairs, "text", "image")) == [[png(1), "one"], [png(2), "two"]]
    hf = tmp_path / "hf.parquet"  # Hugging Face datasets' Image feature
    pq.write_table(pa.table({"text": ["x"], "image": [{"bytes": png(3), "path": "x.png"}]}), hf)
    assert list(read_parquet(hf, "text", "image")) == [[png(3), "x"]]
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"texts": [["a", None, "b"]], "images": [[None, png(4), None]]}), inter)
    assert list(read_parquet(inter, "texts", "images")) == [["a", png(4), "b"]]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"texts": [["a", "b"]], "images": [[png(4), None]]}), bad)
    with pytest.raises(DataError, match="a text or an image, not both"):
        list(read_parquet(bad, "texts", "images"))
    with pytest.raises(DataError, match="no column 'caption'"):
        list(read_parquet(pairs, "caption", "image"))


def test_unknown_source_is_one_line(tmp_path):
    with pytest.raises(DataError, match="neither a registered image-text source"):
        resolve_source(DataConfig(corpus=str(tmp_path / "missing.tar")))


# ---------------------------------------------------------------- the image path


def test_decode_resizes_the_short_side_and_crops_the_centre():
    buf = io.BytesIO()
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # a white centre third
    Image.fromarray(wide).save(buf, format="PNG")
    out = decode(buf.getvalue(), 10, 3)
    assert out.shape == (10, 10, 3)
    assert out.min() > 200  # only the centre survives the crop
    grey = decode(png(77, size=(16, 12)), 4, 1)
    assert grey.shape == (4, 4, 1) and (grey == 77).all()
    with pytest.raises(DataError, match="cannot be decoded"):
        decode(b"not an image", 4, 1, where="image 3")


def test_patchify_is_row_major_and_invertible():
    pixels = np.arange(4 * 4 * 2, dtype=np.uint8).reshape(4, 4, 2)
    patches = patchify(pixels, 2)
    assert patches.shape == (4, 8)
    assert (patches[1].reshape(2, 2, 2) == pixels[0:2, 2:4]).all()  # second patch: top right
    back = patches.reshape(2, 2, 2, 2, 2).transpose(0, 2, 1, 3, 4).reshape(4, 4, 2)
    assert (back == pixels).all()


# ---------------------------------------------------------------- packing


def test_packing_places_every_sample_once_and_fills_windows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 40, size=2000)  # image-caption pairs of 16-36 patches and a short caption
    order = rng.permutation(2000)
    samples, offsets = pack(lengths, order, 257)
    assert sorted(samples.tolist()) == list(range(2000))
    assert all(lengths[samples[a:b]].sum() <= 257 for a, b in zip(offsets[:-1], offsets[1:]))
    assert efficiency(lengths[samples], offsets, 257) >= 0.95
    # a window of only 3-6 samples wastes what no packing can fill (<= 4 of 25-32 in 129: 88% at best)
    docs = rng.integers(10, 200, size=2000)
    s2, o2 = pack(docs, order, 513)
    assert efficiency(docs[s2], o2, 513) >= 0.98
    again = pack(lengths, order, 257)
    assert (again[0] == samples).all() and (again[1] == offsets).all()


def test_epoch_plans_form_one_stream():
    lengths = np.full(50, 30)
    plans = EpochPlans(np.arange(50), lengths, 129, seed=1)
    per_epoch = plans.windows_in(0)
    assert per_epoch == 13  # 4 samples a window, 50 samples
    assert plans.locate(per_epoch) == (1, 0)
    e0 = np.concatenate([plans.window_samples(i)[1] for i in range(per_epoch)])
    e1 = np.concatenate([plans.window_samples(per_epoch + i)[1] for i in range(plans.windows_in(1))])
    assert sorted(e0) == sorted(e1) == list(range(50)) and (e0 != e1).any()  # reshuffled


# ---------------------------------------------------------------- prepared data and the loader


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mm-cache")
    cfg = load_config(
        preset="vlm-tiny",
        overrides=[f"data.cache_dir={cache}", "data.max_docs=400", "data.loader_workers=0", "train.batch_size=8"],
    )
    return cfg, prepare_multimodal(cfg.data, log=lambda s: None)


def test_prepare_is_cached_split_and_checked(digits, tmp_path):
    cfg, data = digits
    train, val = data.split_ids("train"), data.split_ids("val")
    assert len(train) + len(val) == 400 and not set(train) & set(val) and len(val) > 10
    again = prepare_multimodal(cfg.data, log=lambda s: pytest.fail("prepared twice"))
    assert again.path == data.path and again.manifest["content_key"] == data.manifest["content_key"]
    assert not [p for p in data.path.parent.iterdir() if ".tmp-" in p.name]
    lengths = data.positions(train[:5], 16)
    assert (lengths > 16 + 2).all()


def test_a_corrupt_cache_is_refused(digits, tmp_path):
    import shutil

    from kiln.data.multimodal.prepare import open_multimodal

    _, data = digits
    copy = tmp_path / "copy"
    shutil.copytree(data.path, copy)
    (copy / "text.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="checksum"):
        open_multimodal(copy)


def test_opening_checks_ends_and_verify_hashes_every_byte(digits, tmp_path, monkeypatch):
    """Each start checks each file's size and ends (constant time); a flipped byte in the middle
    is found by the full check (`kiln prepare --verify`), and the quick one never reads it all."""
    import shutil

    from kiln import fileio
    from kiln.data.multimodal import prepare as mm

    _, data = digits
    copy = tmp_path / "copy"
    shutil.copytree(data.path, copy)
    monkeypatch.setattr(fileio, "QUICK_BYTES", 64)  # small files: a "middle" exists
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["quick"] = {name: fileio.quick_digest(copy / name) for name in mm.FILES}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    images = copy / "images.bin"
    raw = bytearray(images.read_bytes())
    assert len(raw) > 4 * 64
    raw[len(raw) // 2] ^= 0x01
    images.write_bytes(bytes(raw))
    monkeypatch.setattr(mm, "sha256_files", lambda *_: pytest.fail("a quick open hashed whole files"))
    mm.open_multimodal(copy)  # sizes and ends unchanged: opens
    monkeypatch.setattr(mm, "sha256_files", fileio.sha256_files)
    with pytest.raises(DataError, match="checksum"):
        mm.open_multimodal(copy, verify="full")


def test_window_records_hold_whole_samples(digits):
    cfg, data = digits
    stream = SplitStream(data, "train", ImageLayout.from_config(cfg), cfg.model.seq_len, seed=0)
    rec = stream.windows([0])[0]
    assert rec.shape == (257, 3 + 1)  # 2x2 grey patches: four pixel values, one packed column
    slots = sorted(set(rec[:, DOC].tolist()) - {-1})
    for slot in slots:
        rows = rec[rec[:, DOC] == slot]
        assert rows[0, TOKEN] == data.tokenizer.bos_id and rows[-1, TOKEN] == data.tokenizer.eos_id
        assert (rows[1:17, PATCH] == np.arange(16)).all()  # the image first (prefix placement), 16 patches
        assert (rows[17:, PATCH] == -1).all()
    assert stream.packing_efficiency() >= 0.95


def test_loader_workers_give_the_same_batches(digits):
    cfg, data = digits
    stream = SplitStream(data, "train", ImageLayout.from_config(cfg), cfg.model.seq_len, seed=0)
    plain = MultimodalSampler(stream, 8)
    workers = MultimodalSampler(stream, 8, workers=2)
    try:
        for step in [0, 1, 2, 7, 8, 3]:  # out of order restarts the workers
            assert torch.equal(workers.batch(step), plain.batch(step))
    finally:
        workers.close()


def test_resume_is_exact_at_random_cut_points(digits):
    """A sampler built fresh at step k (a resumed run) gives the batches of one never stopped."""
    cfg, data = digits
    layout = ImageLayout.from_config(cfg)
    reference = MultimodalSampler(SplitStream(data, "train", layout, cfg.model.seq_len, seed=3), 8)
    steps = 60  # several epochs of 400 samples
    full = [reference.batch(s) for s in range(steps)]
    for cut in np.random.default_rng(0).choice(np.arange(1, steps), size=20, replace=False):
        resumed = MultimodalSampler(SplitStream(data, "train", layout, cfg.model.seq_len, seed=3), 8)
        assert all(torch.equal(resumed.batch(s), full[s]) for s in range(int(cut), min(steps, int(cut) + 3)))


def test_two_ranks_then_one_see_every_sample_once_per_epoch(digits):
    cfg, data = digits
    layout = ImageLayout.from_config(cfg)

    def stream():
        return SplitStream(data, "train", layout, cfg.model.seq_len, seed=5)

    one = MultimodalSampler(stream(), 8)
    ranks = [MultimodalSampler(stream(), 8, rank=r, world_size=2) for r in range(2)]
    seen = []
    windows = one.stream.epoch_windows(0)
    steps = -(-windows // 8)
    for step in range(steps):
        batches = [s.batch(step) for s in ranks] if step < steps // 2 else [one.batch(step)]
        if step < steps // 2:
            assert torch.equal(torch.cat(batches), one.batch(step))  # the world size does not change the stream
        idx = np.concatenate([s.sample_indices(step) for s in (ranks if step < steps // 2 else [one])])
        seen += [s for i in idx if i < windows for s in one.stream.plans.window_samples(int(i))[1].tolist()]
    assert sorted(seen) == sorted(data.split_ids("train").tolist())


def test_a_non_image_is_refused_when_preparing(tmp_path):
    path = write_tar(
        tmp_path / "c.tar", [("000.png", b"garbage"), ("000.txt", b"x"), ("001.png", png(3)), ("001.txt", b"y")]
    )
    with pytest.raises(DataError, match="an image Pillow cannot decode"):
        prepare_multimodal(
            DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), vocab_size=300), log=lambda s: None
        )
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written is left


def test_inline_placement_keeps_the_document_order(tmp_path):
    doc = {"segments": [{"text": "before the picture"}, {"image": "0.png"}, {"text": "after it"}]}
    path = write_tar(
        tmp_path / "d.tar",
        [("000.json", json.dumps(doc).encode()), ("000.0.png", png(9)), ("001.png", png(5)), ("001.txt", b"a pair")],
    )
    data = prepare_multimodal(
        DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), vocab_size=300, val_fraction=0.5),
        log=lambda s: None,
    )
    tok = data.tokenizer
    for placement, first_patch in (("inline", 1 + len(tok.encode("before the picture"))), ("prefix", 1)):
        layout = ImageLayout(4, 2, 1, placement)
        stream = SplitStream(data, "train", layout, 64, seed=0, shuffle=False, ids=np.array([0]))  # the document
        rec = stream.windows([0])[0]
        assert rec[first_patch, PATCH] == 0 and rec[first_patch - 1, PATCH] == -1
        assert (pixels_of(torch.from_numpy(rec[first_patch : first_patch + 4])) == 9).all()
        text = tok.decode(rec[(rec[:, DOC] == 0) & (rec[:, PATCH] < 0), TOKEN].tolist())
        assert "before the picture" in text and "after it" in text


def test_truncated_images_are_refused_when_preparing_and_metadata_json_is_not_a_document(tmp_path):
    whole = png(7, size=(32, 32))
    path = write_tar(
        tmp_path / "t.tar",
        [("000.png", whole[: len(whole) // 2]), ("000.txt", b"cut short"), ("001.png", whole), ("001.txt", b"fine")],
    )
    with pytest.raises(DataError, match="sample 0 holds an image Pillow cannot decode"):
        prepare_multimodal(
            DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), vocab_size=300), log=lambda s: None
        )
    # img2dataset writes key.jpg + key.txt + key.json (metadata): still a pair
    meta = write_tar(
        tmp_path / "m.tar",
        [("000.png", whole), ("000.txt", b"a caption"), ("000.json", b'{"url": "http://x", "width": 32}')],
    )
    assert list(read_tar(meta)) == [[whole, "a caption"]]
    bad = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2], "image": [whole, whole]}), bad)
    with pytest.raises(DataError, match="'text' is int, not text"):
        list(read_parquet(bad, "text", "image"))
