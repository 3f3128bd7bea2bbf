"""The machines a plan is for: groups of devices read from a cluster file (TOML) or `local:N`.

    # cluster.toml: one [[group]] per kind of node; groups of different devices make a mixed cluster
    [[group]]
    device = "h100"      # a built-in kind (kiln plan --list-devices), or give the fields below
    per_node = 8         # devices per node
    nodes = 2
    # memory_gb = 80, peak_tflops = 989, intra_gbps = 450, inter_gbps = 50, latency_us = 10

Bandwidths are per device, in GB/s, one direction: `intra_gbps` between devices of one node
(NVLink, PCIe), `inter_gbps` leaving the node (the NIC's share per device). `peak_tflops` is the
dense bf16 peak; plans scale it by the efficiency the profile measured (or a default).
`local:N` is N processes on this machine under torchrun (CPU, gloo): memory and peak are this
machine's shared N ways.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from kiln.errors import ConfigError


@dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_gb: float
    peak_tflops: float  # dense bf16 (a CPU: its measured float32 matmul ceiling)
    intra_gbps: float
    inter_gbps: float
    latency_us: float = 10.0  # per collective step (alpha of the alpha-beta model)


# Datasheet figures: dense bf16 peak, HBM, NVLink (per direction) and a 400 Gb/s NIC per GPU.
BUILTIN = {
    "h100": DeviceKind("H100 SXM", 80, 989, 450, 50),
    "h100-pcie": DeviceKind("H100 PCIe", 80, 756, 64, 25),
    "h200": DeviceKind("H200", 141, 989, 450, 50),
    "b200": DeviceKind("B200", 192, 2250, 900, 50),
    "a100": DeviceKind("A100 80GB", 80, 312, 300, 25),
    "a100-40gb": DeviceKind("A100 40GB", 40, 312, 300, 25),
    "l40s": DeviceKind("L40S", 48, 362, 32, 12.5),
    "l4": DeviceKind("L4", 24, 121, 32, 12.5),
    "a10g": DeviceKind("A10G", 24, 70, 16, 6.25),
    "mi300x": DeviceKind("MI300X", 192, 1307, 448, 50),
}
FIELDS = ("memory_gb", "peak_tflops", "intra_gbps", "inter_gbps", "latency_us")


@dataclass(frozen=True)
class Group:
    kind: DeviceKind
    per_node: int
    nodes: int

    @property
    def devices(self) -> int:
        return self.per_node * self.nodes


@dataclass(frozen=True)
class Cluster:
    groups: tuple[Group, ...]
    name: str = ""
    local: bool = False  # processes on this machine (torchrun, gloo)

    @property
    def world_size(self) -> int:
        return sum(g.devices for g in self.groups)

    @property
    def mixed(self) -> bool:
        return len({g.kind for g in self.groups}) > 1

    def describe(self) -> str:
        return " + ".join(f"{g.nodes}x{g.per_node} {g.kind.name}" for g in self.groups)


def _device(entry: dict, where: str) -> DeviceKind:
    name = entry.get("device")
    extra = {k: entry[k] for k in FIELDS if k in entry}
    for k, v in extra.items():
        if not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{where}: {k} must be a positive number, got {v!r}")
    if name is not None and str(name).lower() in BUILTIN:
        return replace(BUILTIN[str(name).lower()], **extra)
    missing = [k for k in FIELDS[:4] if k not in extra]
    if missing:
        known = ", ".join(BUILTIN)
        raise ConfigError(f"{where}: device {name!r} is not built in ({known}); give {', '.join(missing)} for it")
    return DeviceKind(str(name or "custom"), **extra)


def parse_cluster(text: str, origin: str) -> Cluster:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML ({e})") from None
    entries = raw.get("group")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{origin}: no [[group]] tables; each names a device, per_node and nodes")
    groups = []
    for i, entry in enumerate(entries):
        where = f"{origin}: group {i + 1}"
        unknown = set(entry) - {"device", "per_node", "nodes", *FIELDS}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: device, per_node, nodes, {', '.join(FIELDS)}"
            )
        for k in ("per_node", "nodes"):
            v = entry.get(k, 1)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{where}: {k} must be a positive integer, got {v!r}")
        groups.append(Group(_device(entry, where), entry.get("per_node", 1), entry.get("nodes", 1)))
    return Cluster(tuple(groups), name=Path(origin).stem)


def local_cluster(n: int) -> Cluster:
    """N processes on this machine: its measured float32 ceiling and memory shared N ways;
    gloo moves tensors through shared memory at a few GB/s (the profile measures it)."""
    import torch

    from kiln.hardware import cpu_peak_tflops

    if n < 1:
        raise ConfigError(f"--cluster local:{n}: give a positive number of processes")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    cores = os.cpu_count() or 1
    # each process gets cores / n threads; the ceiling was measured with all of them
    peak = cpu_peak_tflops(torch.float32) * min(1.0, max(1, cores // n) / max(1, torch.get_num_threads()))
    kind = DeviceKind("CPU process", memory / n, peak, 2.0, 2.0, latency_us=50.0)
    return Cluster((Group(kind, n, 1),), name=f"local:{n}", local=True)


def load_cluster(spec: str) -> Cluster:
    """`local:N`, a built-in device name with a count (`h100:8`), or a cluster TOML file."""
    if spec.startswith("local:"):
        try:
            return local_cluster(int(spec.split(":", 1)[1]))
        except ValueError:
            raise ConfigError(f"--cluster {spec}: write local:N with N a number of processes") from None
    name, _, count = spec.partition(":")
    if name.lower() in BUILTIN and count.isdigit():
        n = int(count)
        per_node = min(n, 8)
        if n % per_node:
            raise ConfigError(f"--cluster {spec}: {n} devices do not fill nodes of 8; write a cluster file")
        return Cluster((Group(BUILTIN[name.lower()], per_node, n // per_node),), name=spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"--cluster {spec}: no such file; give a cluster TOML, local:N, or DEVICE:N with a "
            f"built-in device ({', '.join(BUILTIN)})"
        )
    return parse_cluster(path.read_text(), str(path))
