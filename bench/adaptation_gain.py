"""Adaptation gain of the demo: direct transfer against DG-Net++ over several seeds, with and without the teacher
terms, plus ablations and variants.

For each seed (which also draws the built-in data) it trains the demo's source stage once per teacher setting (the
direct-transfer rows), then the demo's adapt stage from that checkpoint with the full method, with each ablation
switched off in turn, and with each variant (every batch cross-domain instead of the demo's official batch mix, the
official recipe as a whole, and a cross control trained for as many iterations as the mix). With the teacher on
(``model.loss.teacher_w=2``), the teacher stage runs once per seed (its own direct transfer is a row) and the
source stage and the adaptation warm-up train with it. Every run goes through
``python -m dgnetpp_pl experiment=demo`` in its own process, so the figures are exactly what ``make demo`` does.

    python bench/adaptation_gain.py                          # 3 seeds, teacher off and on, every ablation
    python bench/adaptation_gain.py --seeds 0 --teacher on --ablations 0,1,2,3
    python bench/adaptation_gain.py --ablations none --variants all   # data.pairing=cross against the mix
    python bench/adaptation_gain.py --json bench/results/adaptation_gain.json
    python bench/adaptation_gain.py --seeds 0 --ablations none --variants all debug=tiny   # a minutes-long check

Figures are the target test mAP and Rank-1 (Market protocol) of each stage's final weights, in percent. The gain
column is over the direct transfer of the same teacher setting (the checkpoint the adaptation starts from).
Ablations change the adapt stage only; ``--ablate-source`` also trains the source stage without the parts that
exist there (the cycle loss and the generated-image id loss), since with the teacher on the source stage's
generated images train the re-ID features too.
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
    "no generated-image id loss": ["model.loss.lambda_id=0"],
    "no domain-adversarial loss": ["model.loss.domain_adv=0"],
    "no self-training": ["adapt.warmup_epochs=${adapt.max_epochs}"],
    "random classifier re-init": ["pseudo_label.init_classifier=random"],
}
# The ablations whose part also trains in the source stage (--ablate-source).
IN_SOURCE_STAGE = ("no cycle loss", "no generated-image id loss")
TEACHER_ON = ["model.loss.teacher_w=2"]
SETTINGS = {"off": "", "on": ", with teacher"}
# Each variant changes part of the demo's settings; the demo trains with the official batch mix.
VARIANTS = {
    "pairing=cross": ["data.pairing=cross"],
    "official recipe": [
        "data.pairing=official",
        "model.appearance.bn_groups=official",
        "model.loss.domain_reduction=sum",
    ],
    # A control for the mix's longer schedule: on the built-in data a mix warm-up epoch trains about 94 batches and
    # a self-training epoch about 51, against 47 cross batches, so cross needs twice the warm-up epochs (and as
    # many self-training epochs, refreshed as often) to train about as many iterations as the demo with the mix.
    "cross, as many iterations as the mix": ["data.pairing=cross", "adapt.warmup_epochs=4", "adapt.max_epochs=8"],
}


# Set by --reuse: a run whose folder holds its metrics.json, the record of the same overrides and the same composed
# config (so a changed demo default trains again) is read back instead of trained again.
REUSE = False
RECORD_FILE = "bench_run.json"


def reusable(cmd: list[str], overrides: list[str], out_dir: Path, env: dict[str, str]) -> dict | None:
    """The record of an earlier run of exactly this command and config in ``out_dir``, else None."""
    record, saved = out_dir / RECORD_FILE, out_dir / ".hydra" / "config.yaml"
    if not ((out_dir / "metrics.json").is_file() and record.is_file() and saved.is_file()):
        return None
    done = json.loads(record.read_text())
    if done["overrides"] != overrides:
        return None
    composed = subprocess.run([*cmd, "--cfg", "job"], capture_output=True, text=True, env=env, check=True).stdout
    return done if composed == saved.read_text() else None


def run(overrides: list[str], out_dir: Path, log: Path) -> tuple[dict, float]:
    """One ``python -m dgnetpp_pl`` run; returns its metrics.json and wall seconds."""
    record = out_dir / RECORD_FILE
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dgnetpp_pl", "experiment=demo", "logger=csv", *overrides]
    cmd.append(f"hydra.run.dir={out_dir}")
    if REUSE and (done := reusable(cmd, overrides, out_dir, env)) is not None:
        return json.loads((out_dir / "metrics.json").read_text()), float(done["wall_s"])
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
    took = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"run failed (exit {rc}): {' '.join(cmd)}\nsee {log}:\n{log.read_text()[-3000:]}")
    record.write_text(json.dumps({"overrides": overrides, "wall_s": round(took, 1)}))
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
    parser.add_argument("--teacher", choices=("off", "on", "both"), default="both", help="teacher terms (default both)")
    parser.add_argument("--ablations", default="all", help="'all', 'none', or a comma list of indices into ABLATIONS")
    parser.add_argument("--ablation-seeds", help="comma list of the seeds that run the ablations (default: all)")
    parser.add_argument("--ablate-source", action="store_true", help="also train the source stage without the part")
    parser.add_argument(
        "--variants", default="none", help="'all', 'none' (default), or a comma list of indices into VARIANTS"
    )
    parser.add_argument("--work-dir", type=Path, default=HERE / "results" / "adaptation_gain")
    parser.add_argument(
        "--reuse", action="store_true", help="read back the runs of --work-dir that finished (same overrides!)"
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. paths.data_dir=...)")
    args = parser.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    seeds = [int(s) for s in args.seeds.split(",") if s]
    ablation_seeds = [int(s) for s in args.ablation_seeds.split(",") if s] if args.ablation_seeds else seeds
    settings = ["off", "on"] if args.teacher == "both" else [args.teacher]
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

    rows: dict[str, list[dict]] = {}
    # label -> (the direct-transfer row its gain is measured against, its seeds)
    basis: dict[str, tuple[str | None, list[int]]] = {}
    if "on" in settings:
        rows["teacher (re-ID baseline, direct transfer)"] = []
        basis["teacher (re-ID baseline, direct transfer)"] = (None, seeds)
    for setting in settings:
        direct, full = f"direct transfer (source-only){SETTINGS[setting]}", f"DG-Net++ adapted{SETTINGS[setting]}"
        rows[direct], rows[full] = [], []
        basis[direct], basis[full] = (None, seeds), (direct, seeds)
    for setting in settings:
        for name in chosen:
            label = f"DG-Net++{SETTINGS[setting]}, {name}"
            rows[label] = []
            basis[label] = (f"direct transfer (source-only){SETTINGS[setting]}", ablation_seeds)
    for setting in settings:
        for name in variants:
            label = f"DG-Net++{SETTINGS[setting]} with {name}"
            rows[label] = []
            basis[label] = (f"direct transfer (source-only){SETTINGS[setting]}", seeds)
    times: dict[str, list[float]] = {k: [] for k in ("teacher", "source", "source_teacher", "adapt", "adapt_teacher")}
    teachers: dict[int, str] = {}
    sources: dict[tuple[int, str], str] = {}

    def teacher_overrides(seed: int, setting: str) -> list[str]:
        return [*TEACHER_ON, f"teacher_ckpt={teachers[seed]}"] if setting == "on" else []

    def source_run(seed: int, setting: str, extra: list[str], slug: str) -> dict:
        base = args.work_dir / f"seed{seed}"
        overrides = [f"seed={seed}", *args.overrides, "stage=source", *teacher_overrides(seed, setting), *extra]
        res, took = run(overrides, base / slug, base / f"{slug}.log")
        times["source_teacher" if setting == "on" else "source"].append(took)
        return res["source"]

    def adapt_run(seed: int, setting: str, init: str, extra: list[str], slug: str) -> dict:
        base = args.work_dir / f"seed{seed}"
        overrides = [f"seed={seed}", *args.overrides, "stage=adapt", f"init_ckpt={init}"]
        res, took = run([*overrides, *teacher_overrides(seed, setting), *extra], base / slug, base / f"{slug}.log")
        times["adapt_teacher" if setting == "on" else "adapt"].append(took)
        print(f"  seed {seed} {slug}: mAP {percent(res['adapt'], 'mAP'):.1f} ({took:.0f} s)", file=sys.stderr)
        return res["adapt"]

    # Every seed's full method first, then the ablations, so the headline rows are ready soonest.
    for seed in seeds:
        base = args.work_dir / f"seed{seed}"
        base.mkdir(parents=True, exist_ok=True)
        if "on" in settings:
            res, took = run([f"seed={seed}", *args.overrides, "stage=teacher"], base / "teacher", base / "teacher.log")
            times["teacher"].append(took)
            rows["teacher (re-ID baseline, direct transfer)"].append(res["teacher"])
            teachers[seed] = res["teacher"]["ckpt"]
            print(f"  seed {seed} teacher: mAP {percent(res['teacher'], 'mAP'):.1f} ({took:.0f} s)", file=sys.stderr)
        for setting in settings:
            suffix = SETTINGS[setting]
            src = source_run(seed, setting, [], f"source_teacher_{setting}")
            rows[f"direct transfer (source-only){suffix}"].append(src)
            sources[seed, setting] = src["ckpt"]
            print(f"  seed {seed} direct transfer{suffix}: mAP {percent(src, 'mAP'):.1f}", file=sys.stderr)
            adapted = adapt_run(seed, setting, src["ckpt"], [], f"adapted_teacher_{setting}")
            rows[f"DG-Net++ adapted{suffix}"].append(adapted)
    for seed in seeds:  # the variants, on every seed: they compare settings, not parts of the method
        for setting in settings:
            for name in variants:
                slug = "variant_" + "".join(c if c.isalnum() else "_" for c in name) + f"_teacher_{setting}"
                result = adapt_run(seed, setting, sources[seed, setting], VARIANTS[name], slug)
                rows[f"DG-Net++{SETTINGS[setting]} with {name}"].append(result)
    for seed in (s for s in seeds if s in ablation_seeds):
        for setting in settings:
            for name in chosen:
                slug = f"{name.replace(' ', '_')}_teacher_{setting}"
                init = sources[seed, setting]
                if args.ablate_source and name in IN_SOURCE_STAGE:
                    init = source_run(seed, setting, ABLATIONS[name], f"source_{slug}")["ckpt"]
                result = adapt_run(seed, setting, init, ABLATIONS[name], slug)
                rows[f"DG-Net++{SETTINGS[setting]}, {name}"].append(result)

    table = []
    for label, results in rows.items():
        reference, run_seeds = basis[label]
        maps = [percent(r, "mAP") for r in results]
        gain = "-"
        if reference is not None:
            direct = {s: percent(r, "mAP") for s, r in zip(seeds, rows[reference], strict=True)}
            gain = mean_std([m - direct[s] for m, s in zip(maps, run_seeds, strict=True)])
        row = [label, mean_std(maps), mean_std([percent(r, "Rank-1") for r in results]), gain]
        per_seed = " ".join(f"{m:.1f}" for m in maps)
        table.append([*row, per_seed, ",".join(map(str, run_seeds))])
    print_table(
        f"Target test figures (%), mean ± std over seeds; load average at the end {load_average()}",
        ["model", "target mAP", "target Rank-1", "mAP gain over its direct transfer", "mAP per seed", "seeds"],
        table,
    )
    for setting in settings:
        src, ada = ("source", "adapt") if setting == "off" else ("source_teacher", "adapt_teacher")
        stages = [times["teacher"]] if setting == "on" else []
        demo = [sum(t) for t in zip(*stages, times[src][: len(seeds)], times[ada][: len(seeds)], strict=True)]
        teacher = f"teacher {mean_std(times['teacher'])} s, " if setting == "on" else ""
        print(
            f"Wall time of one demo with the teacher {setting} (stages incl. start-up and evaluation): "
            f"{mean_std(demo)} s; {teacher}source {mean_std(times[src][: len(seeds)])} s, "
            f"adapt {mean_std(times[ada][: len(seeds)])} s."
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"seeds": seeds, "ablation_seeds": ablation_seeds, "overrides": args.overrides}
        payload["variants"] = {name: VARIANTS[name] for name in variants}
        payload.update(teacher=settings, ablate_source=args.ablate_source, rows=rows, times=times)
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
