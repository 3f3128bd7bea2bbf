"""The image-text model family (`vlm`) and its objective: masks, targets, the stem, validation."""

import pytest
import torch
from safetensors.torch import save_file

from kiln.config import load_config
from kiln.data.multimodal.loader import DOC, PATCH, PIXELS
from kiln.errors import ConfigError
from kiln.model.registry import fresh_model
from kiln.objectives import IGNORE, get_objective
from kiln.train.resolve import check_training

SMALL = ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=32"]


def cfg_of(*extra):
    return load_config(preset="vlm-tiny", overrides=[*SMALL, *extra])


def record(samples):
    """A window record (T+1, 3 + 1) from [(n_image_patches, [tokens])], image first; a patch's
    four pixel values are packed into one int32 column."""

    def packed(value):
        return int(torch.full((4,), value, dtype=torch.uint8).view(torch.int32))

    rows = []
    for slot, (patches, tokens) in enumerate(samples):
        rows.append([1, slot, -1, 0])  # BOS
        rows += [[2, slot, i, packed((37 * i + slot) % 256)] for i in range(patches)]
        rows += [[t, slot, -1, 0] for t in tokens]
    rows += [[2, -1, -1, 0]] * (33 - len(rows))
    return torch.tensor(rows, dtype=torch.int32)


def test_targets_skip_images_documents_and_padding():
    objective = get_objective("multimodal")(None, 64)
    rec = record([(4, [10, 11, 0]), (4, [12, 0])])
    batch = objective.make_batch(rec[None], step=0, seed=0)
    t = batch.targets[0]
    # BOS -> first patch, patch -> patch: nothing; last patch -> first caption token: predicted
    assert (t[:4] == IGNORE).all() and t[4] == 10 and t[5] == 11 and t[6] == 0
    assert t[7] == IGNORE  # EOS of sample 0 -> BOS of sample 1: across documents
    assert t[12] == 12 and t[13] == 0 and (t[14:] == IGNORE).all()  # padding predicts nothing
    assert batch.extras["patch_index"].shape == (1, 32) and batch.extras["patches"].shape == (1, 32, 4)
    assert batch.extras["patches"].dtype == torch.uint8 and int(batch.extras["patches"][0, 1, 0]) == 0
    assert int(batch.extras["patches"][0, 2, 0]) == 37


def test_documents_never_see_each_other_and_images_matter():
    cfg = cfg_of()
    model = fresh_model(cfg.model, 64, seed=0).eval()
    objective = get_objective("multimodal")(None, 64)
    rec = record([(16, [10, 11, 0]), (0, [12, 13, 0])])
    other = rec.clone()
    other[(other[:, DOC] == 0) & (other[:, PATCH] >= 0), PIXELS] = 12345  # change sample 0's image only
    outs = []
    for r in (rec, other):
        b = objective.make_batch(r[None], step=0, seed=0)
        outs.append(model(b.inputs, **b.extras)[0])
    doc = rec[:-1, DOC]
    assert not torch.allclose(outs[0][doc == 0], outs[1][doc == 0])  # the caption reads the image
    torch.testing.assert_close(outs[0][doc == 1], outs[1][doc == 1])  # the next sample does not


def test_frozen_encoder_is_loaded_and_not_trained(tmp_path):
    cfg = cfg_of()
    donor = fresh_model(cfg.model, 64, seed=7)
    path = tmp_path / "stem.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    frozen = cfg_of("model.image_encoder=frozen", f"model.image_encoder_from={path}")
    check_training(frozen)
    model = fresh_model(frozen.model, 64, seed=0)
    assert torch.equal(model.stem.weight, donor.stem.weight)
    assert torch.equal(model.patch_pos.weight, donor.patch_pos.weight)
    assert not torch.equal(model.layers["0"].attn.wq.weight, donor.layers["0"].attn.wq.weight)
    assert not model.stem.weight.requires_grad and model.tok_emb.weight.requires_grad


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.patch_size=3"], "must divide model.image_size"),
        (["model.patch_size=1", "model.seq_len=32"], "an image takes 64 positions"),
        (["train.objective=causal"], "train.objective = 'multimodal'"),
        (["model.image_encoder=frozen"], "needs model.image_encoder_from"),
        (["model.image_encoder=frozen", "model.image_encoder_from=/no/such.safetensors"], "does not exist"),
        (["model.image_encoder=pretrained"], "model.image_encoder = 'pretrained' is not allowed"),
        (["data.image_placement=middle"], "data.image_placement"),
    ],
)
def test_bad_settings_are_one_line(extra, message):
    with pytest.raises(ConfigError, match=message):
        check_training(cfg_of(*extra))


def test_tensor_and_pipeline_parallel_are_refused():
    with pytest.raises(ConfigError, match="data parallelism"):
        check_training(cfg_of("parallel.tp=2", "model.tie_embeddings=false"))


def test_more_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="image_channels must be 1"):
        check_training(cfg_of("model.image_channels=2"))
    with pytest.raises(ConfigError, match="trains model.family = 'vlm'"):
        check_training(load_config(preset="tiny", overrides=["train.objective=multimodal"]))


def test_captions_slide_when_the_prompt_fills_the_window():
    """An image ending near the window's end: generation keeps to the model's context."""
    from kiln.data.tokenizer import train_tokenizer
    from kiln.eval.caption import caption_samples

    cfg = cfg_of("model.image_size=10", "model.patch_size=2")  # 25 patches in a 32-position context
    model = fresh_model(cfg.model, 64, seed=0)
    tok = train_tokenizer(iter(["a handwritten seven."] * 20), 300)
    rec = record([(25, [10, 0])])
    out = caption_samples(model, rec, tok, torch.device("cpu"), n=1, max_tokens=16)
    assert len(out) == 1
