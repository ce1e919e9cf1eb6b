"""Benchmark (not a test): exact vs fast circuit discovery on a real model.

Prints, per mode: forward passes (model calls, rows, token positions, backward passes), wall time and
peak RSS (each mode runs in its own process, so peaks do not mix); then recall of the exact top-k per
group by the fast mode, and the faithfulness of both circuits (mean ablation, same prompts).

    python tests/bench/bench_circuits.py --model tiny-base --n 32
    python tests/bench/bench_circuits.py --model smollm2-135m-instruct --n 16 --minimality none

The file name does not match pytest's ``test_*.py`` pattern, so pytest never collects it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def one(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from etbench import models
    from etbench.metrics.discovery import discover, format_discovery

    t0 = time.perf_counter()
    loaded = models.load(args.model)
    load_s = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = discover(loaded, args.one, n_boxes=args.n_boxes, n=args.n, seed=args.seed, batch_size=args.batch_size,
                   minimality_mode=None if args.minimality == "default" else args.minimality,
                   minimality_n=args.minimality_n, mean_n=args.mean_n, model_name=args.model, progress=args.progress)
    print(format_discovery(res), file=sys.stderr)
    out = res.to_dict()
    out["bench"] = {"load_s": load_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "rss_after_load_mb": rss0 / 1024, "threads": args.threads}
    with open(args.out, "w") as fh:
        json.dump(out, fh)


def _circuit_heads(circuit_json) -> dict[str, set]:
    return {g: {tuple(h) for h in body["heads"]} for g, body in circuit_json["groups"].items()}


def _passthrough(argv: list[str]) -> list[str]:
    """The command line minus --modes/--exact-json and their values (the child runs one mode)."""
    out, skip = [], False
    for a in argv:
        if a in ("--modes", "--exact-json"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-base")
    ap.add_argument("--n", type=int, default=32, help="noise pairs for path patching")
    ap.add_argument("--n-boxes", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--minimality", default="none", choices=["default", "pairs", "single", "none"])
    ap.add_argument("--minimality-n", type=int, default=50)
    ap.add_argument("--mean-n", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=100, help="prompts for the faithfulness check (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy shared machine)")
    ap.add_argument("--modes", nargs="+", default=["exact", "fast"])
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--save", default=None, help="directory for the discovery JSONs")
    ap.add_argument("--exact-json", default=None,
                    help="a saved exact-mode discovery JSON (from --save) to compare with instead of rerunning "
                         "exact mode (its settings must match; checked)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    outdir = args.save or tempfile.mkdtemp(prefix="bench_circuits_")
    os.makedirs(outdir, exist_ok=True)
    results = {}
    if args.exact_json:
        with open(args.exact_json) as fh:
            results["exact"] = json.load(fh)
        p = results["exact"]["parameters"]
        want = {"mode": "exact", "n": args.n, "n_boxes": args.n_boxes, "seed": args.seed, "batch_size": args.batch_size}
        got = {k: p.get(k) for k in want}
        if got != want or results["exact"]["model"] != args.model:
            sys.exit(f"--exact-json {args.exact_json}: made with {got}, model {results['exact']['model']}; "
                     f"this run: {want}, model {args.model}")
        args.modes = [m for m in args.modes if m != "exact"]
    for mode in args.modes:
        path = os.path.join(outdir, f"discovery_{mode}.json")
        cmd = [sys.executable, __file__, "--one", mode, "--out", path] + _passthrough(sys.argv[1:])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        with open(path) as fh:
            results[mode] = json.load(fh)
        results[mode]["bench"]["process_s"] = time.perf_counter() - t0

    print(f"\nmodel {args.model}, {args.n} noise pairs, {args.n_boxes} boxes, {args.threads} threads")
    print(f"{'mode':6} {'fwd calls':>9} {'rows':>7} {'backward':>8} {'tokens':>9} {'search s':>9} "
          f"{'minimality s':>12} {'peak RSS MB':>11}")
    for mode, r in results.items():
        fp = r["forward_passes"]["search"]
        print(f"{mode:6} {fp['calls']:>9} {fp['rows']:>7} {fp['backward']:>8} {fp['tokens']:>9} "
              f"{r['wall_s']['search']:>9.1f} {r['wall_s']['minimality']:>12.1f} {r['bench']['peak_rss_mb']:>11.0f}")
    if "fast" in results:
        f = results["fast"]
        print("fast per group: verify_k " + ", ".join(f"{g} {v}" for g, v in f["parameters"]["verify_k"].items())
              + "; calls " + ", ".join(f"{g} {s['forward_passes']['calls']}" for g, s in f["searches"].items()))
    if {"exact", "fast"} <= set(results):
        e, f = results["exact"], results["fast"]
        ratio = e["forward_passes"]["search"]["calls"] / max(1, f["forward_passes"]["search"]["calls"])
        row_ratio = e["forward_passes"]["search"]["rows"] / max(1, f["forward_passes"]["search"]["rows"])
        tok_ratio = e["forward_passes"]["search"]["tokens"] / max(1, f["forward_passes"]["search"]["tokens"])
        time_ratio = e["wall_s"]["search"] / max(1e-9, f["wall_s"]["search"])
        print(f"exact/fast: forward calls {ratio:.1f}x, rows {row_ratio:.1f}x, token positions {tok_ratio:.1f}x, "
              f"search wall {time_ratio:.1f}x (wall: exact {e['wall_s']['search']:.0f} s, fast "
              f"{f['wall_s']['search']:.0f} s)")
        for g in e["candidate"]["groups"]:
            ex = {tuple(h) for h in e["candidate"]["groups"][g]["heads"]}
            fa = {tuple(h) for h in f["candidate"]["groups"][g]["heads"]}
            rec = len(ex & fa) / len(ex) if ex else float("nan")
            print(f"  {g:22} exact top-k {len(ex):3}  fast {len(fa):3}  recall {rec:.2f}  "
                  f"missed {sorted(ex - fa) or '-'}  extra {sorted(fa - ex) or '-'}")
        for which in ("candidate", "circuit"):
            ce, cf = (_circuit_heads(r[which]) for r in (e, f))
            de = {h for hs in ce.values() for h in hs}
            df = {h for hs in cf.values() for h in hs}
            print(f"  {which}: group sizes exact {[len(v) for v in ce.values()]} fast {[len(v) for v in cf.values()]}; "
                  f"nodes in both {sum(len(ce[g] & cf[g]) for g in ce)}; distinct heads exact {len(de)} fast "
                  f"{len(df)} both {len(de & df)}")
        if args.eval_n:
            import torch

            torch.set_num_threads(args.threads)
            from etbench import models
            from etbench.mech.heads import head_map
            from etbench.metrics.ablation import mean_activations
            from etbench.metrics.faithfulness import evaluate_circuit
            from etbench.schema.circuit import Circuit
            from etbench.task.layout import usable_pool

            loaded = models.load(args.model)
            pool, labels = usable_pool(loaded.tokenizer, args.n_boxes)
            mean = mean_activations(loaded.model, loaded.tokenizer, head_map(loaded.model), args.n_boxes, args.mean_n,
                                    args.seed, args.batch_size, pool, labels)
            done = {}  # the same nodes give the same evaluation (e.g. no pruning: circuit == candidate)
            for mode, r in results.items():
                for which in ("candidate", "circuit"):
                    c = Circuit.from_dict(r[which])
                    key = frozenset(n.key for n in c.nodes())
                    if key not in done:
                        done[key] = evaluate_circuit(loaded, c, n_boxes=args.n_boxes, n=args.eval_n, seed=args.seed,
                                                     batch_size=args.batch_size, random_draws=0,
                                                     completeness_draws=0, curve=False, mean=mean)
                    ev = done[key]
                    print(f"  {mode:5} {which:9} {c.summary():60} model acc {ev.model_acc.value:.3f} "
                          f"circuit acc {ev.circuit_acc.value:.3f} faithfulness {ev.faithfulness:.3f}")
    print(f"JSON in {outdir}")


if __name__ == "__main__":
    main()
