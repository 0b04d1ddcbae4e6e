"""Adaptation gain of the demo: direct transfer against DG-Net++ over several seeds, plus ablations and variants.

For each seed it trains the demo's source stage once (the direct-transfer row), then the demo's adapt stage from
that checkpoint with the full method, with each ablation switched off in turn, and with each variant (the official
batch mix, the official recipe as a whole) instead of the demo's settings. Every run goes through
``python -m dgnetpp_pl experiment=demo`` in its own process, so the figures are exactly what ``make demo`` does.

    python bench/adaptation_gain.py                          # 3 seeds, full method and every ablation
    python bench/adaptation_gain.py --seeds 0 --ablations none
    python bench/adaptation_gain.py --ablations none --variants all   # data.pairing=official against cross
    python bench/adaptation_gain.py --json bench/results/adaptation_gain.json
    python bench/adaptation_gain.py --seeds 0 --ablations none --variants all debug=tiny   # a minutes-long check

Figures are the target test mAP and Rank-1 (Market protocol) of each stage's final weights, in percent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from _common import load_average, print_table  # noqa: E402

# Each ablation switches one part of the method off; the rest of the demo config is unchanged.
ABLATIONS = {
    "no cycle loss": ["model.loss.lambda_cyc=0"],
    "no domain-adversarial loss": ["model.loss.domain_adv=0"],
    "no self-training": ["adapt.warmup_epochs=${adapt.max_epochs}"],
    "no generated-image id loss": ["model.loss.lambda_id=0"],
    "random classifier re-init": ["pseudo_label.init_classifier=random"],
}
# Each variant replaces part of the demo's settings by the official code's; "cross" pairing is the demo's.
VARIANTS = {
    "pairing=official": ["data.pairing=official"],
    "official recipe": [
        "data.pairing=official",
        "model.appearance.bn_groups=official",
        "model.loss.domain_reduction=sum",
    ],
}


def run(overrides: list[str], out_dir: Path, log: Path) -> tuple[dict, float]:
    """One ``python -m dgnetpp_pl`` run; returns its metrics.json and wall seconds."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dgnetpp_pl", "experiment=demo", "logger=csv", *overrides]
    cmd.append(f"hydra.run.dir={out_dir}")
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
    took = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"run failed (exit {rc}): {' '.join(cmd)}\nsee {log}:\n{log.read_text()[-3000:]}")
    return json.loads((out_dir / "metrics.json").read_text()), took


def percent(stage: dict, key: str) -> float:
    return 100.0 * float(stage[f"test/{key}"])


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--ablations", default="all", help="'all', 'none', or a comma list of indices into ABLATIONS")
    parser.add_argument("--ablation-seeds", help="comma list of the seeds that run the ablations (default: all)")
    parser.add_argument(
        "--variants", default="none", help="'all', 'none' (default), or a comma list of indices into VARIANTS"
    )
    parser.add_argument("--work-dir", type=Path, default=HERE / "results" / "adaptation_gain")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. paths.data_dir=...)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    ablation_seeds = [int(s) for s in args.ablation_seeds.split(",") if s] if args.ablation_seeds else seeds
    names = list(ABLATIONS)
    if args.ablations == "all":
        chosen = names
    elif args.ablations == "none":
        chosen = []
    else:
        chosen = [names[int(i)] for i in args.ablations.split(",")]
    variant_names = list(VARIANTS)
    variants = {"all": variant_names, "none": []}.get(args.variants)
    if variants is None:
        variants = [variant_names[int(i)] for i in args.variants.split(",")]

    rows: dict[str, list[dict]] = {"direct transfer (source-only)": [], "DG-Net++ adapted": []}
    rows.update({f"DG-Net++, {name}": [] for name in chosen})
    rows.update({f"DG-Net++ with {name}": [] for name in variants})
    times: dict[str, list[float]] = {"source": [], "adapt": []}
    # Every seed's full method first, then the ablations, so the headline rows are ready soonest.
    ckpts: dict[int, str] = {}

    def adapt_overrides(seed: int) -> list[str]:
        return [f"seed={seed}", *args.overrides, "stage=adapt", f"init_ckpt={ckpts[seed]}"]

    for seed in seeds:
        base = args.work_dir / f"seed{seed}"
        base.mkdir(parents=True, exist_ok=True)
        src, took = run([f"seed={seed}", *args.overrides, "stage=source"], base / "source", base / "source.log")
        times["source"].append(took)
        rows["direct transfer (source-only)"].append(src["source"])
        ckpts[seed] = src["source"]["ckpt"]
        print(f"  seed {seed} direct transfer: mAP {percent(src['source'], 'mAP'):.1f}", file=sys.stderr)
        res, took = run(adapt_overrides(seed), base / "adapted", base / "adapted.log")
        times["adapt"].append(took)
        rows["DG-Net++ adapted"].append(res["adapt"])
        print(f"  seed {seed} DG-Net++ adapted: mAP {percent(res['adapt'], 'mAP'):.1f} ({took:.0f} s)", file=sys.stderr)
    for seed in seeds:  # the variants, on every seed: they compare settings, not parts of the method
        base = args.work_dir / f"seed{seed}"
        for name in variants:
            slug = "variant_" + name.replace(" ", "_").replace("=", "_")
            res, took = run([*adapt_overrides(seed), *VARIANTS[name]], base / slug, base / f"{slug}.log")
            rows[f"DG-Net++ with {name}"].append(res["adapt"])
            print(f"  seed {seed} {name}: mAP {percent(res['adapt'], 'mAP'):.1f} ({took:.0f} s)", file=sys.stderr)
    for seed in (s for s in seeds if s in ablation_seeds):
        base = args.work_dir / f"seed{seed}"
        for name in chosen:
            slug = name.replace(" ", "_")
            res, took = run([*adapt_overrides(seed), *ABLATIONS[name]], base / slug, base / f"{slug}.log")
            rows[f"DG-Net++, {name}"].append(res["adapt"])
            print(f"  seed {seed} {name}: mAP {percent(res['adapt'], 'mAP'):.1f} ({took:.0f} s)", file=sys.stderr)

    direct = {s: percent(r, "mAP") for s, r in zip(seeds, rows["direct transfer (source-only)"], strict=True)}
    table = []
    for label, results in rows.items():
        run_seeds = ablation_seeds if label.startswith("DG-Net++, ") else seeds
        maps = [percent(r, "mAP") for r in results]
        gains = [m - direct[s] for m, s in zip(maps, run_seeds, strict=True)]
        gain = mean_std(gains) if label != "direct transfer (source-only)" else "-"
        row = [label, mean_std(maps), mean_std([percent(r, "Rank-1") for r in results]), gain]
        table.append([*row, ",".join(map(str, run_seeds))])
    print_table(
        f"Target test figures (%), mean ± std over seeds; load average at the end {load_average()}",
        ["model", "target mAP", "target Rank-1", "mAP gain over direct transfer", "seeds"],
        table,
    )
    demo = [s + a for s, a in zip(times["source"], times["adapt"], strict=True)]
    print(
        f"Wall time of one demo (source + adapt stage, incl. start-up and evaluation): {mean_std(demo)} s; "
        f"source {mean_std(times['source'])} s, adapt {mean_std(times['adapt'])} s."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"seeds": seeds, "ablation_seeds": ablation_seeds, "overrides": args.overrides}
        payload["variants"] = {name: VARIANTS[name] for name in variants}
        payload.update(rows=rows, times=times)
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
