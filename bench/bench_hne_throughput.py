"""Training throughput of an HNE: the grouped tree against separate per-member networks.

For N = 2, 4, 8, 16 members (B = 1 … 4) one training step (forward, summed cross-entropy of the
members, backward) is timed three ways on the same weights:

- grouped: the tree as kdedge trains it, every block one grouped pass (paper Fig. 2);
- per-node: the same tree computed node by node with ungrouped layers (shared blocks computed
  once, no grouping): isolates what grouping itself buys;
- per-member: every member a separate network run in a loop (the reference implementation):
  shared blocks recomputed for every member, as in an ensemble of independent networks.

Prints a table of medians and the ratios per-member / grouped and per-node / grouped, with the
machine and the command; ``--json PATH`` also writes the numbers.

Example:
    python bench/bench_hne_throughput.py --config resnet_small --batch 32 --size 32
    python bench/bench_hne_throughput.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdedge.models import create_model
from kdedge.models.hne import HNE
from kdedge.models.hne_reference import node_copy, reference_member


class PerNodeTree(nn.Module):
    """The tree evaluated node by node with one-node (ungrouped) copies of every layer."""

    def __init__(self, model: HNE) -> None:
        super().__init__()
        self.B = model.B
        self.nodes = nn.ModuleList(
            nn.ModuleList(nn.Sequential(*[node_copy(layer, k) for layer in model.blocks[d]]) for k in range(2 ** d))
            for d in range(model.B + 1))
        self.heads = nn.ModuleList(node_copy(model.head, k) for k in range(2 ** model.B))

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for d in range(self.B + 1):
            feats = [node(feats[k >> 1] if d else feats[0]) for k, node in enumerate(self.nodes[d])]
        return torch.stack([head(f) for head, f in zip(self.heads, feats)])


def _step_grouped(model: nn.Module, x: Tensor, y: Tensor) -> None:
    z = model(x)
    F.cross_entropy(z.flatten(0, 1), y.repeat(z.shape[0]), reduction="sum").backward()


def _step_members(members: list[nn.Module], x: Tensor, y: Tensor) -> None:
    loss = sum(F.cross_entropy(m(x), y, reduction="sum") for m in members)
    loss.backward()  # type: ignore[union-attr]


def timed(fn: Callable[[], None], repeats: int, warmup: int, device: torch.device, clock: str = "wall") -> list[float]:
    """Seconds per call. ``clock="cpu"`` measures the process's CPU time instead of wall time:
    on a shared machine with one torch thread it is what the step would take alone, where wall
    time also counts the time other processes held the core."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(now() - t0)
    return times


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"load average {load:.1f} at start")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="resnet_small", help="hne configuration (default: the paper's HNE-small)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input height = width")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--members", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (use with --threads 1 on a machine shared with other jobs)")
    p.add_argument("--no-per-node", action="store_true", help="skip the per-node loop")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        raise SystemExit("--clock cpu needs --threads 1 and --device cpu (CPU time of several threads includes their "
                         "spinning, and it does not see a GPU)")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    rows = []
    print(f"# {machine(device)}")
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"# config {args.config} width {args.width}, batch {args.batch}, input {args.channels}x{args.size}x{args.size}, "
          f"median of {args.repeats} training steps (forward + backward), {args.clock} clock")
    header = f"{'N':>3} {'grouped ms':>11} {'per-node ms':>12} {'per-member ms':>14} {'member/grouped':>15} {'node/grouped':>13}"
    print(header)
    for n in args.members:
        B = n.bit_length() - 1
        if 2 ** B != n:
            raise SystemExit(f"--members must be powers of two, got {n}")
        model = create_model("hne", num_classes=args.classes, in_channels=args.channels,
                             input_size=(args.size, args.size), config=args.config, B=B, width=args.width).to(device)
        members = [reference_member(model, k).to(device) for k in range(n)]
        g = statistics.median(timed(lambda: _step_grouped(model, x, y), args.repeats, args.warmup, device, args.clock))
        m = statistics.median(timed(lambda: _step_members(members, x, y), args.repeats, args.warmup, device, args.clock))
        nd = float("nan")
        if not args.no_per_node:
            per_node = PerNodeTree(model).to(device)
            nd = statistics.median(timed(lambda: _step_grouped(per_node, x, y), args.repeats, args.warmup, device, args.clock))
        row = {"members": n, "grouped_ms": 1e3 * g, "per_node_ms": 1e3 * nd, "per_member_ms": 1e3 * m,
               "member_over_grouped": m / g, "node_over_grouped": nd / g}
        rows.append(row)
        print(f"{n:>3} {row['grouped_ms']:>11.1f} {row['per_node_ms']:>12.1f} {row['per_member_ms']:>14.1f} "
              f"{row['member_over_grouped']:>15.2f} {row['node_over_grouped']:>13.2f}", flush=True)
    result = {"machine": machine(device), "command": " ".join(sys.argv), "clock": args.clock, "config": args.config,
              "width": args.width,
              "batch": args.batch, "input": [args.channels, args.size, args.size], "rows": rows}
    if args.json:
        from kdedge.io import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
