"""Deterministic, resumable, rank-aware batches of packed image-text windows, made by worker processes.

A window is one int32 record per position, `(seq_len + 1, 3 + ceil(patch_values / 4))`:

    column 0      token id (the pad id at image positions: the model puts patch embeddings there)
    column 1      document: the window's sample slot (0, 1, ...), -1 for padding; attention never
                  crosses documents and no target is taken across a boundary
    column 2      patch index within its image (0 .. n_patches - 1), -1 for text and padding
    columns 3...  the patch's uint8 pixel values, four to a column (`pixels_of` reads them back),
                  zero elsewhere

so batches keep the shape of text windows (rows can be sliced, padded and shared over ranks by
the same code). A sample is BOS, its segments (text tokens; an image's patches), EOS; with
`data.image_placement = "prefix"` its images come first, with "inline" where they occur.

`MultimodalSampler.batch(step)` is a pure function of (seed, step, rank, world size) like the
text sampler's; worker processes (`data.loader_workers`, a torch DataLoader) compute the next
steps' batches ahead, and a request out of order (a resume, a rollback, skipped batches)
restarts them at that step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kiln.config import Config
from kiln.data.loader import rank_share
from kiln.data.multimodal.images import decode, patchify
from kiln.data.multimodal.packing import EpochPlans, efficiency
from kiln.data.multimodal.prepare import IMAGE, TEXT, MultimodalPrepared
from kiln.errors import DataError

TOKEN, DOC, PATCH, PIXELS = 0, 1, 2, 3


def pixel_columns(patch_values: int) -> int:
    return -(-patch_values // 4)


def pixels_of(records: torch.Tensor) -> torch.Tensor:
    """The uint8 pixel values of window records (..., columns): (..., 4 * pixel columns), the
    last few zero when a patch's values are not a multiple of four (the model reads its own count)."""
    return records[..., PIXELS:].contiguous().view(torch.uint8)


@dataclass(frozen=True)
class ImageLayout:
    size: int
    patch: int
    channels: int
    placement: str = "prefix"

    @property
    def n_patches(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def patch_values(self) -> int:
        return self.patch * self.patch * self.channels

    @classmethod
    def from_config(cls, cfg: Config) -> ImageLayout:
        v = cfg.model.vision
        return cls(v.image_size, v.patch_size, v.channels, cfg.data.image_placement)


class WindowBuilder:
    """Turns lists of samples into window records (numpy only: runs in the worker processes)."""

    def __init__(self, data: MultimodalPrepared, layout: ImageLayout, window: int, with_images: bool = True):
        self.data, self.layout, self.window, self.with_images = data, layout, window, with_images
        tok = data.tokenizer
        bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
        assert bos is not None and eos is not None and pad is not None  # required roles (KilnTokenizer checks)
        self.bos, self.eos, self.pad = bos, eos, pad

    def _sample(self, sample: int) -> list[tuple[int, tuple[int, int]]]:
        segs = self.data.sample_segments(sample)
        if not self.with_images:
            segs = segs[segs[:, 0] == TEXT]
        elif self.layout.placement == "prefix":
            segs = np.concatenate([segs[segs[:, 0] == IMAGE], segs[segs[:, 0] == TEXT]])
        return [(int(k), (int(a), int(b))) for k, a, b in segs]

    def build(self, samples: np.ndarray) -> np.ndarray:
        L, n_p = self.layout, self.layout.n_patches
        out = np.zeros((self.window, PIXELS + pixel_columns(L.patch_values)), dtype=np.int32)
        pixel_bytes = np.zeros((self.window, 4 * pixel_columns(L.patch_values)), dtype=np.uint8)
        out[:, TOKEN] = self.pad
        out[:, DOC] = -1
        out[:, PATCH] = -1
        pos = 0
        for slot, sample in enumerate(samples.tolist()):
            start = pos
            pieces: list[tuple[int, np.ndarray]] = [(TEXT, np.array([self.bos]))]
            for kind, (a, b) in self._sample(sample):
                if kind == TEXT:
                    pieces.append((TEXT, self.data.text_tokens(a, b)))
                else:
                    pixels = decode(self.data.image_bytes(a), L.size, L.channels, where=f"image {a} (sample {sample})")
                    pieces.append((IMAGE, patchify(pixels, L.patch)))
            pieces.append((TEXT, np.array([self.eos])))
            for kind, values in pieces:
                room = self.window - pos
                if kind == TEXT:
                    n = min(len(values), room)
                    out[pos : pos + n, TOKEN] = values[:n]
                else:
                    if n_p > room:  # an image that does not fit whole is left out (the rest is cut)
                        break
                    n = n_p
                    out[pos : pos + n, PATCH] = np.arange(n_p)
                    pixel_bytes[pos : pos + n, : L.patch_values] = values
                pos += n
                if pos >= self.window:
                    break
            out[start:pos, DOC] = slot
            if pos >= self.window:
                break
        out[:, PIXELS:] = pixel_bytes.view(np.int32)
        return out


class SplitStream:
    """The packed windows of one split: the training stream over epochs, or a fixed evaluation set."""

    def __init__(
        self,
        data: MultimodalPrepared,
        split: str,
        layout: ImageLayout,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        with_images: bool = True,
        ids: np.ndarray | None = None,
    ):
        ids = data.split_ids(split) if ids is None else ids
        if len(ids) == 0:
            raise DataError(f"the {split} split of the image-text data is empty; raise data.val_fraction")
        self.window = seq_len + 1
        lengths = data.positions(ids, layout.n_patches, with_images)
        self.plans = EpochPlans(ids, lengths, self.window, seed, shuffle)
        self.builder = WindowBuilder(data, layout, self.window, with_images)

    def windows(self, indices) -> np.ndarray:
        return np.stack([self.builder.build(self.plans.window_samples(int(i))[1]) for i in indices])

    def epoch_windows(self, epoch: int = 0) -> int:
        return self.plans.windows_in(epoch)

    def packing_efficiency(self, epoch: int = 0) -> float:
        samples, offsets = self.plans.plan(epoch)
        return efficiency(self.plans.lengths[samples], offsets, self.window)


class _StepBatches(torch.utils.data.Dataset):
    def __init__(self, sampler: MultimodalSampler):
        self.sampler = sampler

    def __getitem__(self, step: int) -> np.ndarray:
        return self.sampler.make(step)


class MultimodalSampler:
    """Training batches: `batch(step)` depends only on (seed, step, rank, world size)."""

    def __init__(
        self,
        stream: SplitStream,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        prefetch: int = 4,
        shares: list[int] | None = None,
    ):
        self.local_batch, self.offset = rank_share(global_batch, rank, world_size, shares)
        self.stream, self.global_batch = stream, global_batch
        self.rank, self.workers, self.prefetch = rank, workers, prefetch
        self._iter: Iterator[torch.Tensor] | None = None
        self._next: int | None = None

    def sample_indices(self, step: int) -> np.ndarray:
        """Global window indices of this rank's rows at `step`."""
        first = step * self.global_batch + self.offset
        return np.arange(first, first + self.local_batch)

    def make(self, step: int) -> np.ndarray:
        return self.stream.windows(self.sample_indices(step))

    def batch(self, step: int) -> torch.Tensor:
        """This rank's windows for `step`: int32 records (local_batch, seq_len + 1, columns)."""
        if not self.workers:
            return torch.from_numpy(self.make(step))
        if self._iter is None or step != self._next:
            self.close()
            loader = torch.utils.data.DataLoader(
                _StepBatches(self),
                batch_size=None,
                sampler=itertools.count(step),
                num_workers=self.workers,
                prefetch_factor=self.prefetch,
            )
            self._iter = iter(loader)
        self._next = step + 1
        try:
            return next(self._iter)
        except DataError as e:  # re-raised by the DataLoader with the worker's traceback in the message
            self.close()
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def close(self) -> None:
        self._iter = None  # the DataLoader iterator stops its workers when it is released

    def epoch_of(self, step: int) -> float:
        return self.stream.plans.epoch_of(step * self.global_batch)

    def __getstate__(self):  # the worker processes get the stream, not the parent's iterator
        return {**self.__dict__, "_iter": None}


def evaluation_samples(data: MultimodalPrepared, layout: ImageLayout, seq_len: int, windows: int) -> np.ndarray:
    """Validation samples, evenly spread over the split, about enough to fill `windows` windows
    (all of them if the split is smaller): the same samples for every evaluation and variant."""
    ids = data.split_ids("val")
    mean = float(data.positions(ids, layout.n_patches).mean()) if len(ids) else 1.0
    want = int(windows * (seq_len + 1) * 0.97 / mean)
    if want >= len(ids):
        return ids
    return ids[np.linspace(0, len(ids) - 1, max(1, want)).round().astype(np.int64)]


def validation_windows(cfg: Config, data: MultimodalPrepared, windows: int = 0) -> dict[str, torch.Tensor]:
    """The validation windows: "" with the images, "text_only" the same samples with their images
    withheld (the baseline an image must beat); about `windows` windows (0: the trainer's number)."""
    layout, seq_len = ImageLayout.from_config(cfg), cfg.model.seq_len
    ids = evaluation_samples(data, layout, seq_len, windows or cfg.eval.batches * cfg.global_batch)
    val = {}
    for name, with_images in (("", True), ("text_only", False)):
        stream = SplitStream(
            data, "val", layout, seq_len, cfg.train.seed, shuffle=False, with_images=with_images, ids=ids
        )
        val[name] = torch.from_numpy(stream.windows(range(stream.epoch_windows(0))))
    return val


def training_streams(
    cfg: Config, data: MultimodalPrepared, rank: int, world: int
) -> tuple[MultimodalSampler, dict[str, torch.Tensor]]:
    """The training sampler (`data.with_images = false` withholds the images) and `validation_windows`."""
    layout = ImageLayout.from_config(cfg)
    train = SplitStream(data, "train", layout, cfg.model.seq_len, cfg.train.seed, with_images=cfg.data.with_images)
    sampler = MultimodalSampler(
        train, cfg.global_batch, rank, world, cfg.data.loader_workers, shares=cfg.parallel.dp_batch_shares
    )
    return sampler, validation_windows(cfg, data)
