"""`moesim cluster show NAME [--gpus N]`: print a cluster preset's (or topology file's) summary."""

from __future__ import annotations

import argparse

HELP = "show a cluster preset or topology file (GPUs, switches, NICs, links); save it as GraphML/JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="print the summary of a preset or a .graphml/.json topology")
    show.add_argument("name", help="preset (h800 h100 h200 a100 a800 a30-pcie cpu-loopback) or a topology file")
    show.add_argument("--gpus", type=int, default=None, help="GPU count (a multiple of GPUs per node)")
    show.add_argument("--cores", type=int, default=None, help="cpu-loopback: cores shared by the processes")
    show.add_argument("--save", default=None, metavar="FILE", help="also write the topology (.graphml or .json)")


def run(args: argparse.Namespace) -> int:
    from simulator.cluster import get_cluster, save_cluster

    options = {"cores": args.cores} if args.cores is not None else {}
    cluster = get_cluster(args.name, gpus=args.gpus, **options)
    print(cluster.summary())
    if args.save:
        print(f"wrote {save_cluster(cluster, args.save)}")
    return 0
