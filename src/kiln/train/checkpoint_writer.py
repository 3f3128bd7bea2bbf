"""DCP's file writer as Kiln's checkpoints use it: each rank's pieces of sharded tensors and the
whole tensors it writes in separate files, without torch.save's per-record CRC32."""

from __future__ import annotations

import queue

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future as TorchFuture
from torch.utils.serialization import config as serialization_config


def _whole(item: WriteItem) -> bool:
    """A whole tensor or an object (the same on every rank that has it; DCP picks one rank to
    write it), not a piece of a sharded tensor."""
    data = item.tensor_data
    return item.type == WriteItemType.BYTE_IO or data is None or tuple(data.chunk.sizes) == tuple(data.size)


class SplitWriter(dcp.FileSystemWriter):
    """DCP's file writer with each rank's items in two files: its pieces of sharded tensors
    (`__<rank>_0.distcp`) and the whole tensors it was picked to write (`__<rank>_1.distcp`:
    replicated ones such as the optimizer's step counts, which DCP spreads over the ranks). A rank
    loading the layout it saved then reads, and verifies, its own large file and only others'
    small ones, instead of every rank's file for a few bytes of each."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        write = getattr(self, "_write_data", None)  # torch's writer of a queue of files
        if write is None:  # a torch without it: one file per rank (loads verify more, nothing else changes)
            return super().write_data(plan, planner)
        pieces = [item for item in plan.items if not _whole(item)]
        whole = [item for item in plan.items if _whole(item)]
        files: queue.Queue = queue.Queue()
        for n, items in enumerate(part for part in (pieces, whole) if part):
            name = f"{plan.storage_data.prefix}{n}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, items))
        # torch.save's CRC32 of every record took two thirds of its time and no load checks it;
        # the manifest's checksums, which every load verifies, covers these files. (A process-wide
        # setting, held only while this rank writes; Kiln runs one save at a time.)
        crc = serialization_config.save.compute_crc32
        serialization_config.save.compute_crc32 = False
        try:
            return write(planner, files)
        finally:
            serialization_config.save.compute_crc32 = crc
