"""Multi-process parity under gloo on CPU: FSDP2, tensor parallel and pipeline parallel runs
must log the losses of a single process (to 1e-5 relative), checkpoints must reshard between
world sizes, and a bad layout must fail fast on every rank.

Each layout runs as a real `torchrun --nproc_per_node 2 -m kiln train` job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import REL, STEPS, assert_close, base_overrides, losses, run_kiln, sets, train, write_corpus

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.parallel.mesh import ParallelDims


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, base_overrides(root / "cache", write_corpus(root))


@pytest.fixture(scope="module")
def single(setup):
    root, base = setup
    return train(root / "runs", "single", base)


@pytest.fixture(scope="module")
def single_untied(setup):
    root, base = setup
    return train(root / "runs", "single-untied", base + ["model.tie_embeddings=false"])


@pytest.fixture(scope="module")
def fsdp(setup):
    root, base = setup
    return train(root / "runs", "fsdp2", base, nproc=2)


def test_fsdp_matches_single_process(single, fsdp):
    assert_close(fsdp, single)


def test_tensor_parallel_matches_single_process(setup, single_untied):
    root, base = setup
    tp = train(root / "runs", "tp2", base + ["model.tie_embeddings=false", "parallel.tp=2"], nproc=2)
    assert_close(tp, single_untied)


def test_uneven_batch_shares_match_single_process(setup, single):
    """Mixed devices: rank 0 takes 6 of the 8 sequences in two micro-batches of 3, rank 1 takes 2
    in two of 1; the mean loss and its gradient are the global batch's all the same."""
    root, base = setup
    shares = train(
        root / "runs", "shares", base + ["parallel.dp_batch_shares=[6,2]", "train.micro_batch_size=3"], nproc=2
    )
    assert_close(shares, single)


def test_pipeline_1f1b_matches_single_process(setup, single_untied):
    """With uneven stages (3 layers and 1, as for a fast and a slow device); the even split is
    what the other pipeline tests run."""
    root, base = setup
    piped = train(
        root / "runs",
        "pp2",
        base
        + [
            "model.tie_embeddings=false",
            "parallel.pp=2",
            "parallel.pp_schedule=1f1b",
            "parallel.pp_microbatches=4",
            "parallel.pp_layers=[3,1]",
        ],
        nproc=2,
    )
    assert_close(piped, single_untied)
    evals = [json.loads(line) for line in (root / "runs" / "pp2" / "eval.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (root / "runs" / "single-untied" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [e["step"] for e in ref]
    for e, r in zip(evals, ref):
        assert abs(e["val_loss"] - r["val_loss"]) <= REL * r["val_loss"]


def _cut_after(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been killed right after checkpoint `step`."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return dst


def test_save_two_ranks_resume_one(setup, fsdp):
    root, _ = setup
    run = _cut_after(root / "runs" / "fsdp2", root / "runs" / "fsdp2-to-1", 5)
    run_kiln(["train", "--resume", str(run)])
    assert_close(losses(run), fsdp)
    assert (run / "checkpoints" / "step-00000010" / "model.safetensors").is_file()  # saved single-process now


def test_two_ranks_share_the_checksums_of_a_checkpoint(setup, fsdp):
    """Each rank hashed a share of the files; rank 0's manifest lists every file, each checksum right."""
    from kiln.fileio import checksum_file, recorded_checksum
    from kiln.train.checkpoint import verify_checkpoint

    root, _ = setup
    for ckpt in sorted((root / "runs" / "fsdp2" / "checkpoints").glob("step-*")):
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"}
        assert set(files) == on_disk and {"rng-0.safetensors", "rng-1.safetensors"} <= on_disk
        for name, meta in files.items():
            algorithm, digest = recorded_checksum(meta)
            assert checksum_file(ckpt / name, algorithm) == digest
        assert verify_checkpoint(ckpt) is None


def test_save_one_rank_resume_two(setup, single):
    root, _ = setup
    run = _cut_after(root / "runs" / "single", root / "runs" / "single-to-2", 5)
    run_kiln(["train", "--resume", str(run)], nproc=2)
    assert_close(losses(run), single)
    assert (run / "checkpoints" / "step-00000010" / "dcp").is_dir()


def test_export_consolidates_sharded_checkpoint(setup, fsdp, tmp_path):
    from safetensors.torch import load_file

    root, _ = setup
    out = tmp_path / "model.safetensors"
    run_kiln(["export", str(root / "runs" / "fsdp2"), "--out", str(out)])
    weights = load_file(out)
    assert weights["tok_emb.weight"].shape == (320, 64)  # vocabulary padded to a multiple of 64
    assert "layers.3.mlp.w2.weight" in weights
    # the same sharded checkpoint as a Hugging Face folder: the true vocabulary, Llama's names
    run_kiln(["export", str(root / "runs" / "fsdp2"), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    vocab = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert vocab <= 320 and torch.equal(hf["model.embed_tokens.weight"], weights["tok_emb.weight"][:vocab])
    assert torch.equal(hf["model.layers.3.mlp.down_proj.weight"], weights["layers.3.mlp.w2.weight"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ("parallel.tp=3", "parallel.tp = 3 must divide model.n_heads"),
        ("parallel.dp_shard=3", "do not multiply|multiply to 2"),
    ],
)
def test_bad_layout_fails_on_every_rank(setup, bad, message):
    import re

    root, base = setup
    proc = run_kiln(
        ["train", "--preset", "tiny", "--runs-dir", str(root / "runs"), "--name", "bad", *sets(base + [bad])],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 2, proc.stderr[-2000:]  # one line from each rank, no hang
    assert all(re.search(message, line) for line in errors)
    assert "Traceback" not in proc.stderr.split("kiln: error:")[0]


def test_parallel_dims_validation():
    cfg = load_config("tiny", overrides=["parallel.tp=2", "model.tie_embeddings=false"]).parallel
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp) == (1, 4, 2, 1)
    assert dims.describe() == "dp_shard=4 x tp=2"
    with pytest.raises(ConfigError, match="does not divide the world size"):
        ParallelDims.from_config(
            load_config("tiny", overrides=["parallel.tp=2", "parallel.pp=2", "model.tie_embeddings=false"]).parallel, 6
        )
    with pytest.raises(ConfigError, match="multiply to 4"):
        ParallelDims.from_config(load_config("tiny", overrides=["parallel.dp_shard=3"]).parallel, 4)
    # resuming an expert-parallel run on fewer ranks: the message names a degree that fits
    ep2 = load_config("moe-tiny", overrides=["parallel.ep=2"]).parallel
    with pytest.raises(ConfigError, match=r"at world size 1 .* add --set parallel\.ep=1 \("):
        ParallelDims.from_config(ep2, 1)
    ep4 = load_config("moe-tiny", overrides=["parallel.ep=4"]).parallel
    with pytest.raises(ConfigError, match=r"parallel\.ep = 4 must divide parallel\.dp_shard = 2 .* parallel\.ep=2 \("):
        ParallelDims.from_config(ep4, 2)
    from kiln.train.resolve import check_training

    with pytest.raises(ConfigError, match="tie_embeddings"):
        check_training(load_config("tiny", overrides=["parallel.pp=2"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra",
    [
        ("dp-tp-pp", ["parallel.tp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]),
        ("hsdp", ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
        ("tp-fsdp-ac", ["parallel.tp=2", "parallel.activation_checkpoint=full"]),
        ("interleaved", ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b", "parallel.pp_microbatches=4"]),
        ("gpipe-async", ["parallel.pp=4", "parallel.pp_schedule=gpipe", "parallel.async_checkpoint=true"]),
    ],
)
def test_four_process_layouts_match_single_process(setup, single_untied, name, extra):
    root, base = setup
    got = train(root / "runs", name, base + ["model.tie_embeddings=false"] + extra, nproc=4)
    assert_close(got, single_untied)


def test_masked_objective_fsdp_matches_single_process(setup):
    """The masked (BERT-style) objective: 2 FSDP ranks build the same masks and log the same
    losses as one process."""
    root, base = setup
    masked = [o for o in base if not o.startswith("data.vocab_size")] + [
        "data.vocab_size=320",
        "model.family=encoder",
        "train.objective=masked",
        "model.pos=rope",
    ]
    one = train(root / "runs", "masked-1", masked)
    two = train(root / "runs", "masked-2", masked, nproc=2)
    assert_close(two, one)
    evals = [json.loads(line) for line in (root / "runs" / "masked-2" / "eval.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (root / "runs" / "masked-1" / "eval.jsonl").read_text().splitlines()]
    assert [e["majority_baseline"] for e in evals] == [r["majority_baseline"] for r in ref]


def test_fork_of_a_sharded_run_adds_tensors_at_any_world_size(setup, fsdp):
    """A fork adding QK-norm, post-norm and z-loss to a run saved by 2 FSDP ranks (a DCP
    checkpoint, partially loaded): trained on 2 ranks and on 1 it logs the same losses."""
    root, _ = setup
    args = [
        "fork",
        str(root / "runs" / "fsdp2"),
        "--step",
        "5",
        "--set",
        "model.qk_norm=true",
        "--set",
        "model.post_norm=true",
        "--set",
        "train.z_loss=0.001",
    ]
    run_kiln([*args, "--name", "fork-on-2", "--nproc-per-node", "2"])
    run_kiln([*args, "--name", "fork-on-1"])
    on2, on1 = losses(root / "runs" / "fork-on-2"), losses(root / "runs" / "fork-on-1")
    assert len(on2) == len(on1) == STEPS - 5
    for x, y in zip(on2, on1):
        assert abs(x - y) <= REL * abs(y)
    lineage = json.loads((root / "runs" / "fork-on-2" / "lineage.json").read_text())
    assert "layers.0.attn.q_norm.weight" in lineage["new_tensors"]


STABILISED = [
    "model.tie_embeddings=false",
    "model.qk_norm=true",
    "model.post_norm=true",
    "model.norm=rmsnorm",
    "train.z_loss=0.001",
]


@pytest.fixture(scope="module")
def single_stabilised(setup):
    root, base = setup
    return train(root / "runs", "single-stabilised", base + STABILISED)


@pytest.mark.parametrize(
    "name, layout",
    [("tp2-stabilised", ["parallel.tp=2"]), ("pp2-stabilised", ["parallel.pp=2", "parallel.pp_microbatches=4"])],
)
def test_post_norm_and_z_loss_match_single_process(setup, single_stabilised, name, layout):
    """The post-norms' sequence-parallel plan and the z-loss on the pipeline's last stage."""
    root, base = setup
    assert_close(train(root / "runs", name, base + STABILISED + layout, nproc=2), single_stabilised)
    z = [json.loads(line).get("z_loss") for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    ref = [
        json.loads(line)["z_loss"]
        for line in (root / "runs" / "single-stabilised" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(z, ref))


COLLECTIVES = str(Path(__file__).parents[1] / "plugins" / "collectives.py")


def _train_counting(root: Path, name: str, overrides: list[str]) -> list[dict]:
    run_kiln(
        [
            "train",
            "--plugin",
            COLLECTIVES,
            "--preset",
            "tiny",
            "--runs-dir",
            str(root / "runs"),
            "--name",
            name,
            *sets([*overrides, 'callbacks.enabled=["collectives"]']),
        ],
        nproc=2,
    )
    return [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_gradients_reduced_once_a_step_under_accumulation(setup, single):
    """Two micro-batches a rank: `last_microbatch` reduce-scatters each FSDP group's gradients
    once a step (4 blocks + the root = 5), the losses those of one process all the same."""
    root, base = setup
    records = _train_counting(
        root, "grad-sync-last", base + ["train.micro_batch_size=2", "parallel.grad_sync=last_microbatch"]
    )
    assert_close([r["loss"] for r in records], single)
    assert {r["collectives/reduce_scatter"] for r in records} == {5}


def test_bf16_fsdp_gathers_bf16_and_reduces_fp32(setup):
    """FSDP2's mixed-precision policy under bf16: parameters all-gathered in bf16, gradients
    reduce-scattered in fp32, on every micro-batch with `every_microbatch` (2 x 5 a step); the
    losses those of one bf16 process within one bf16 rounding, 2^-8 relative (the norm gains, fp32
    in one process under autocast, are gathered in bf16 here)."""
    root, base = setup
    bf16 = [o for o in base if o != "train.precision=fp32"] + ["train.precision=bf16"]
    one = train(root / "runs", "bf16-1", bf16)
    records = _train_counting(
        root, "bf16-2", bf16 + ["train.micro_batch_size=2", "parallel.grad_sync=every_microbatch"]
    )
    assert {r["collectives/reduce_scatter"] for r in records} == {10}
    assert {r["collectives/reduce_scatter_float32"] for r in records} == {10}
    assert all(r["collectives/all_gather_bfloat16"] > 0 and "collectives/all_gather_float32" not in r for r in records)
    for step, (two, ref) in enumerate(zip([r["loss"] for r in records], one), 1):
        assert abs(two - ref) <= 2**-8 * ref, f"step {step}: {two} vs {ref}"  # one bf16 rounding (3.8e-4 seen)
