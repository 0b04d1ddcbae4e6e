"""Training-step benchmark: one DG-Net++ iteration (D step + G step), ours against the official structure.

For each phase (source stage, adapt warm-up, adapt self-training) and batch type (ab: source + target; aa: two
source halves; bb: two target halves, as in the official batch mix) it times our iteration (the module's own
``discriminator_step`` / ``generator_step`` on one shared ``objective.forward_pair``, then the scheduler
steps, as ``DGNetPP.training_step`` does) and the straightforward official-structured iteration of
``tests/reference_step.py`` (the official ``gen_update_*`` / ``dis_update_*`` of that type), both against a warm
torchvision ResNet-50 forward+backward at batch 8. It counts the network passes of one iteration
(appearance-encoder calls and their batch sizes, decoder, structure encoder and image-discriminator calls, frozen
re-encodings, deep copies). Each configuration runs in its own process, so each peak RSS is its own. The source
stage trains aa batches only; self-training skips aa batches (adapt.aa_drop), so that case is not timed.

    python bench/train_step.py                        # paper size (256x128, ResNet-50, batch 8 + 8), CPU, ab
    python bench/train_step.py --types aa,ab,bb --phases warmup,self_training --iters 2
    python bench/train_step.py --model dgnetpp_small --iters 5
    python bench/train_step.py --device cuda --precision bf16 [--channels-last]
    python bench/train_step.py --model dgnetpp_small --phases source,warmup --teacher   # with the teacher terms

``--teacher`` turns the teacher terms on (``model.loss.teacher_w=2``) with a teacher of the model's trunk and
bottleneck (ResNet-50 / 512, stride 2 for the paper; the demo's ResNet-18 / 128 for ``dgnetpp_small``): the student
pass over the detached fakes and the teacher's soft labels. They are active in the source stage and the warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Works from a checkout without `pip install -e .`; the reference iteration lives with the tests that trust it.
sys.path[:0] = [str(HERE.parent / "src"), str(HERE), str(HERE.parent / "tests")]

from _common import FlopCount, emit, print_table, run_worker  # noqa: E402

PHASES = ("source", "warmup", "self_training")
TYPES = ("aa", "ab", "bb")
PATHS = ("ours", "ref")
# Source ids (DukeMTMC-reID) and target clusters (k-means k) of the paper-size run; small: the demo's sizes.
CLASSES = {"dgnetpp": (702, 700), "dgnetpp_small": (100, 50)}
IMAGE_SIZE = {"dgnetpp": (256, 128), "dgnetpp_small": (128, 64)}
OFFICIAL = "official code on this CPU (reference doc s11): D 3.1 s + G 15.1 s; 31-45x ResNet-50; 15.3-16.9 GB"
# The official implementation's own CPU time per iteration on this kind of machine, per batch type (seconds).
OFFICIAL_TYPE_S = {"aa": "20.2", "ab": "17.7-18.7", "bb": "14.0-15.8"}


# --------------------------------------------------------------------------------------------- config
def load_model_cfg(name: str, sets: list[str], channels_last: bool) -> Any:
    """The typed ``model=<name>`` config with ``--set key=value`` overrides (keys relative to ``model``)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from dgnetpp_pl.config import CONF_DIR, validate_config

    choices = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if name not in choices:
        raise SystemExit(f"--model {name!r}: use one of {choices}")
    height, width = IMAGE_SIZE.get(name, (256, 128))
    overrides = [f"model={name}", f"model.channels_last={channels_last}", "paths.output_dir=unused"]
    overrides += [f"data.height={height}", f"data.width={width}", *(f"model.{item}" for item in sets)]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return validate_config(compose(config_name="config", overrides=overrides)).model
    except HydraException as err:
        raise SystemExit(f"--set: {err}; expected existing model keys, e.g. decoder.checkpoint=true") from None


# --------------------------------------------------------------------------------------------- helpers
def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _images(n: int, height: int, width: int, gen: Any) -> Any:
    """Smooth random person-sized images ``(n, 3, H, W)`` (content does not change the cost)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.randn(n, 3, height // 8, width // 8, generator=gen)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


class PassCounter:
    """Forward hooks counting network calls and their batch sizes; a call on detached weights is 'frozen'.

    Deep copies carry the hooks with them, so the reference path's copies are counted as frozen too.
    """

    def __init__(self, module: Any) -> None:
        self.calls: dict[str, list[tuple[int, bool]]] = {}
        self._handles = []
        gens = {id(g): g for g in (module.gen_a, module.gen_b_or_a)}.values()
        targets = [("d_img", module.d_img)]
        targets += [("str", g.encoder) for g in gens] + [("dec", g.decoder) for g in gens]
        if module.d_dom is not None:
            targets.append(("d_dom", module.d_dom))
        if module.teacher is not None:
            targets.append(("teacher", module.teacher))
        for name, mod in targets:
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        # The encoder's feature_map is one call per encoder pass, checkpointed stages included (a hook on the
        # backbone module would miss those, and a hook on its first layer would also count recomputations).
        self._e_app = module.e_app
        feature_map = module.e_app.feature_map

        def counted(x: Any) -> Any:
            frozen = not any(p.requires_grad for p in self._e_app.backbone.parameters())
            self.calls.setdefault("app", []).append((int(x.shape[0]), frozen))
            return feature_map(x)

        module.e_app.feature_map = counted

    def _hook(self, name: str) -> Callable:
        def hook(mod: Any, inputs: tuple, output: Any) -> None:
            frozen = not any(p.requires_grad for p in mod.parameters())
            self.calls.setdefault(name, []).append((int(inputs[0].shape[0]), frozen))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        del self._e_app.feature_map  # back to the class method

    def summary(self) -> dict[str, Any]:
        def pick(name: str, frozen: bool | None = None) -> list[int]:
            return [b for b, f in self.calls.get(name, []) if frozen is None or f == frozen]

        return {
            "app_live": pick("app", False),
            "app_frozen": pick("app", True),
            "str_live": pick("str", False),
            "str_frozen": pick("str", True),
            "dec": pick("dec"),
            "d_img": pick("d_img"),
            "d_dom": pick("d_dom"),
            "teacher": pick("teacher"),
        }


@contextlib.contextmanager
def timed_frozen_calls(acc: dict[str, float], device: str) -> Iterator[None]:
    """Time every ``objective.frozen_call`` (the re-encodings of the fakes) into ``acc['reencode_s']``."""
    from dgnetpp_pl import objective

    original = objective.frozen_call

    def timed(*args: Any, **kwargs: Any) -> Any:
        _sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        acc["reencode_s"] = acc.get("reencode_s", 0.0) + time.perf_counter() - start
        return out

    objective.frozen_call = timed
    try:
        yield
    finally:
        objective.frozen_call = original


# --------------------------------------------------------------------------------------------- workers
def cases(args: argparse.Namespace) -> list[str]:
    """``<path>-<phase>-<type>`` of every requested combination that training runs: the source stage trains aa
    batches only, self-training skips its aa batches (adapt.aa_drop)."""
    out = []
    for phase in args.phases:
        kinds = ["aa"] if phase == "source" else [k for k in args.types if (phase, k) != ("self_training", "aa")]
        out += [f"{path}-{phase}-{kind}" for kind in kinds for path in args.paths]
    return out


def _build(args: argparse.Namespace, phase: str, kind: str) -> tuple[Any, Any, Any, dict, list]:
    """Module on the device, its pair batch and flags for batch type ``kind``, named optimisers and schedulers."""
    import torch

    from dgnetpp_pl.inference import build_model
    from dgnetpp_pl.models.teacher import Teacher
    from dgnetpp_pl.optim import optimizer_names
    from dgnetpp_pl.schedule import AdaptSchedule

    sets = [*args.set, *(["loss.teacher_w=2"] if args.teacher else [])]
    cfg = load_model_cfg(args.model, sets, bool(args.channels_last))
    n_src, k = CLASSES.get(args.model, CLASSES["dgnetpp_small"])
    height, width = IMAGE_SIZE.get(args.model, (256, 128))
    stage = "source" if phase == "source" else "adapt"
    with_teacher = cfg.loss.teacher_w > 0
    schedule = AdaptSchedule(stage, warmup_epochs=1 if phase == "warmup" else 0, with_teacher=with_teacher)
    torch.manual_seed(0)
    module = build_model(stage, cfg, n_src, k, schedule=schedule, image_size=(height, width))
    if phase == "self_training":
        module.set_target_classes(k)
    if with_teacher:
        a = cfg.appearance
        module.attach_teacher(Teacher(n_src, arch=a.arch, bottleneck_dim=a.bottleneck_dim))
    module.to(args.device).train()
    opts, scheds = module.configure_optimizers()
    named = dict(zip(optimizer_names(module.stage), opts, strict=True))
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def half(n: int, num_labels: int) -> dict:
        def img() -> torch.Tensor:
            return _images(n, height, width, g).to(args.device).contiguous(memory_format=fmt)

        labels = torch.randint(num_labels, (n,), generator=g).to(args.device)
        return {"image": img(), "pos": img(), "label": labels}

    b = args.batch
    if phase == "source" or kind == "aa":
        batch = {"source": half(2 * b, n_src)}
    elif kind == "bb":
        batch = {"target": half(2 * b, k)}
    else:
        batch = {"source": half(b, n_src), "target": half(b, k)}
    pair, flags = module._pair_from_batch(batch)
    return module, pair, flags, named, scheds


def _ours_iteration(module: Any, pair: Any, flags: Any, scheds: list, args: argparse.Namespace) -> dict:
    """``DGNetPP.training_step`` without logging: shared forward, D step, G step, scheduler steps."""
    from dgnetpp_pl import objective

    w = module.cfg.loss
    acc: dict[str, float] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    gen_a, gen_b = objective.generators_for(flags.batch_type, module.gen_a, module.gen_b_or_a)
    with timed_frozen_calls(acc, args.device), _autocast(args.device, args.precision):
        fwd = objective.forward_pair(
            module.e_app, gen_a, gen_b, pair, flags,
            erasing_p=w.erasing_p, structure_detach_p=w.structure_detach_p,
            bn_groups=module.cfg.appearance.bn_groups, teacher=module.teacher,
        )  # fmt: skip
        _sync(args.device)
        t1 = time.perf_counter()
        if module.discriminator_step(fwd, pair, flags) is None:
            raise RuntimeError("the discriminator step was skipped (non-finite loss)")
        _sync(args.device)
        t2 = time.perf_counter()
        if module.generator_step(fwd, pair, flags) is None:
            raise RuntimeError("the generator step was skipped (non-finite loss)")
    for sched in scheds:
        sched.step()
    _sync(args.device)
    t3 = time.perf_counter()
    times = {"forward_s": t1 - t0, "d_step_s": t2 - t1, "g_step_s": t3 - t2, "total_s": t3 - t0}
    return {**times, "cpu_s": time.process_time() - c0, **acc}


def _ref_iteration(
    module: Any,
    pair: Any,
    flags: Any,
    named: dict,
    scheds: list,
    args: argparse.Namespace,
) -> dict:
    """The official-structured iteration of ``reference_step.py`` plus the scheduler steps."""
    import dataclasses

    from reference_step import Nets, reference_iteration

    stats: dict[str, float] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    with _autocast(args.device, args.precision):
        loss = dataclasses.asdict(module.cfg.loss)
        reference_iteration(Nets.from_module(module), named, pair, flags, loss, stats=stats, teacher=module.teacher)
    for sched in scheds:
        sched.step()
    _sync(args.device)
    stats["total_s"] = time.perf_counter() - t0
    stats["cpu_s"] = time.process_time() - c0
    return stats


def step_worker(case: str, args: argparse.Namespace) -> dict:
    """Median times of ``args.iters`` iterations of one (path, phase, type) after warm-up; passes counted once."""
    import torch

    path, phase, kind = case.split("-")
    module, pair, flags, named, scheds = _build(args, phase, kind)
    # The module's steps use the trainer's optimiser handles and backward; give them the plain ones.
    module._named_optimizers = lambda: named
    module.manual_backward = lambda loss: loss.backward()

    def once() -> dict:
        if path == "ours":
            return _ours_iteration(module, pair, flags, scheds, args)
        return _ref_iteration(module, pair, flags, named, scheds, args)

    counter = PassCounter(module)
    with FlopCount() as flops:
        first = once()  # the first warm-up iteration also counts the passes and the floating-point work
    counter.remove()
    for _ in range(args.warmup - 1):
        once()
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [once() for _ in range(args.iters)]
    keys = sorted({k for r in runs for k in r})
    result = {
        "case": case,
        **{k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys},
        "first_s": first["total_s"],
        "gflop": flops.total / 1e9,
        "passes": counter.summary(),
        "deep_copies": int(first.get("deep_copies", 0)),
        "threads": torch.get_num_threads(),
    }
    if torch.device(args.device).type == "cuda":
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["gpu_name"] = torch.cuda.get_device_name()
    return result


def baseline_worker(args: argparse.Namespace) -> dict:
    """Warm torchvision ResNet-50 forward + backward, batch 8, 256x128 (median of ``args.baseline_iters``).

    The baseline is the plain (contiguous) network; with ``--channels-last`` a channels-last ResNet-50 is timed
    as well (``cl_total_s``), since that format speeds ResNet-50 too.
    """
    import torch
    import torchvision

    def measure(fmt: torch.memory_format) -> dict:
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).to(args.device).train().to(memory_format=fmt)
        x = torch.randn(8, 3, 256, 128, device=args.device).contiguous(memory_format=fmt)
        y = torch.randint(1000, (8,), device=args.device)

        def once() -> tuple[float, float]:
            c0, t0 = time.process_time(), time.perf_counter()
            with _autocast(args.device, args.precision):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
            _sync(args.device)
            return time.perf_counter() - t0, time.process_time() - c0

        with FlopCount() as flops:
            once()
        for _ in range(2):
            once()
        runs = [once() for _ in range(args.baseline_iters)]
        return {
            "gflop": flops.total / 1e9,
            "total_s": statistics.median(r[0] for r in runs),
            "cpu_s": statistics.median(r[1] for r in runs),
        }

    result = {"case": "baseline", **measure(torch.contiguous_format), "threads": torch.get_num_threads()}
    if args.channels_last:
        cl = measure(torch.channels_last)
        result["cl_total_s"], result["cl_cpu_s"] = cl["total_s"], cl["cpu_s"]
    return result


def run_case(case: str, args: argparse.Namespace) -> dict:
    """One configuration's result dict (baseline, or ``<path>-<phase>``)."""
    import torch

    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        from dgnetpp_pl.allocator import keep_freed_memory

        keep_freed_memory()  # as training does (keep_freed_memory: true)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    result = baseline_worker(args) if case == "baseline" else step_worker(case, args)
    result["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if torch.device(args.device).type == "cuda":
        result.setdefault("gpu_name", torch.cuda.get_device_name())
        gc.collect()  # free this configuration's networks before the next one (--in-process)
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------------------------- report
def _calls(sizes: list[int]) -> str:
    """'3 (32)': number of calls and total images; '-' when none."""
    return f"{len(sizes)} ({sum(sizes)})" if sizes else "-"


def _rows(results: dict[str, dict], args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """``(phase/type, path, result)`` in table order."""
    keys = [(ph, kind, pa) for ph in args.phases for kind in TYPES for pa in args.paths]
    return [
        (f"{ph}/{kind}", pa, results[f"{pa}-{ph}-{kind}"]) for ph, kind, pa in keys if f"{pa}-{ph}-{kind}" in results
    ]


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Print the timing table, the pass-count table and the before/after summary."""
    base = results["baseline"]
    cuda = args.device.startswith("cuda")
    header = ["phase/type", "path", "iter s", "CPU s", "forward s", "D step s", "G step s", "re-encode s"]
    cl = "cl_total_s" in base
    header += ["x ResNet-50", "x (CPU)"] + (["x channels-last ResNet-50"] if cl else [])
    header += (["it/s", "GPU peak GB"] if cuda else []) + ["peak RSS GB"]
    rows = []
    for phase, path, r in _rows(results, args):
        row = [phase, path, r["total_s"], r["cpu_s"], r.get("forward_s", "-"), r["d_step_s"], r["g_step_s"]]
        row += [r.get("reencode_s", 0.0), r["total_s"] / base["total_s"], r["cpu_s"] / base["cpu_s"]]
        row += [r["total_s"] / base["cl_total_s"]] if cl else []
        row += [1.0 / r["total_s"], r.get("gpu_peak_gb", 0.0)] if cuda else []
        rows.append([*row, r["peak_rss_gb"]])
    where = base.get("gpu_name") or f"{args.device}, {args.threads} threads"
    load = max(r.get("load", 0.0) for r in results.values())
    print_table(
        f"One iteration (D step + G step), model={args.model}, batch {args.batch} + {args.batch}, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}{', teacher terms' if args.teacher else ''}"
        f"{', default malloc' if args.default_malloc else ''}{''.join(', ' + i for i in args.set)}; {where}; "
        f"median of {args.iters} "
        f"after {args.warmup} warm-up; highest load average {load:.1f}",
        header,
        rows,
    )
    print(
        f"Baseline: warm ResNet-50 forward+backward, batch 8, 256x128: {base['total_s']:.3f} s wall, "
        f"{base['cpu_s']:.3f} s CPU (median of {args.baseline_iters})"
        + (f"; channels-last: {base['cl_total_s']:.3f} s wall" if cl else "")
        + ".\n"
        "ours: forward = the shared forward_pair (re-encoding included); D and G steps include backward and\n"
        "optimiser steps. ref: the D step re-runs its own forward. CPU s counts all threads (steadier than\n"
        "wall time on a shared machine)."
    )
    count_header = ["phase/type", "path", "E_app live", "E_app frozen", "E_str live", "E_str frozen", "decoder"]
    count_header += ["D_img", "D_dom", "teacher", "deep copies"]
    count_rows = []
    for phase, path, r in _rows(results, args):
        p = r["passes"]
        names = ("app_live", "app_frozen", "str_live", "str_frozen", "dec", "d_img", "d_dom", "teacher")
        count_rows.append([phase, path, *(_calls(p[n]) for n in names), r["deep_copies"]])
    print_table("Network passes in one iteration: calls (total images)", count_header, count_rows)
    print(
        "The structure re-encoding branch is a coin (structure_detach_p): 'E_str frozen' shows the branch\n"
        f"the counted iteration drew. For comparison, {OFFICIAL}."
    )
    work_rows = []
    for phase, path, r in _rows(results, args):
        if "gflop" in r:
            rate, time_ratio = r["gflop"] / r["total_s"], r["total_s"] / base["total_s"]
            work_rows.append([phase, path, r["gflop"], r["gflop"] / base["gflop"], rate, time_ratio])
    if work_rows and "gflop" in base:
        base_rate = base["gflop"] / base["total_s"]
        print_table(
            "Work in one iteration: convolutions and matrix products, forward and backward, as run",
            ["phase/type", "path", "GFLOP", "x ResNet-50 GFLOP", "GFLOP/s", "x ResNet-50 time"],
            work_rows,
        )
        print(
            f"Baseline: {base['gflop']:.1f} GFLOP per ResNet-50 forward+backward at {base_rate:.0f} GFLOP/s. An\n"
            "iteration's time ratio is its GFLOP ratio times (baseline GFLOP/s / its GFLOP/s): a time ratio under\n"
            "the GFLOP ratio needs the iteration to run faster per FLOP than ResNet-50 itself. Forwards that\n"
            "activation checkpointing recomputes in backward are in the count."
        )
    ratio_rows = []
    for phase in args.phases:
        for kind in TYPES:
            ours, ref = results.get(f"ours-{phase}-{kind}"), results.get(f"ref-{phase}-{kind}")
            if not (ours and ref):
                continue
            r_wall, o_wall, r_cpu, o_cpu = ref["total_s"], ours["total_s"], ref["cpu_s"], ours["cpu_s"]
            official = OFFICIAL_TYPE_S[kind] if phase != "source" else "-"
            ratio_rows.append(
                [f"{phase}/{kind}", r_cpu, o_cpu, o_cpu / r_cpu, r_wall, o_wall, o_wall / r_wall, official]
                + [ref["peak_rss_gb"], ours["peak_rss_gb"]]
            )
    if ratio_rows:
        print_table(
            "Ours against the official structure on our networks, per batch type (ratio = ours / official structure)",
            ["phase/type", "ref CPU s", "ours CPU s", "CPU ratio", "ref wall s", "ours wall s", "wall ratio"]
            + ["official code CPU s", "ref peak RSS GB", "ours peak RSS GB"],
            ratio_rows,
        )
        print("official code CPU s: the official implementation's own time per iteration on this kind of machine.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="dgnetpp", help="a model= option of the package config (default: dgnetpp)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up iterations, >= 1 (default 1)")
    parser.add_argument("--baseline-iters", type=int, default=10, help="timed ResNet-50 passes (default 10)")
    parser.add_argument("--batch", type=int, default=8, help="images per half (default 8: batch 8 + 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and inputs")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. --set decoder.checkpoint=true --set appearance.bn_groups=official",
    )
    parser.add_argument("--teacher", action="store_true", help="the teacher terms on (model.loss.teacher_w=2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES}")
    parser.add_argument(
        "--types", default="ab", help=f"adapt batch types, comma list of {TYPES} (default ab; the source stage: aa)"
    )
    parser.add_argument("--paths", default="ours,ref", help="comma list: ours, ref (official-structured)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc malloc as is (training's keep_freed_memory=false)"
    )
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process (faster start on a GPU; no per-configuration RSS)",
    )
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    args.paths = [p for p in args.paths.split(",") if p]
    args.types = [t for t in args.types.split(",") if t]
    bad = [p for p in args.phases if p not in PHASES] + [p for p in args.paths if p not in PATHS]
    bad += [t for t in args.types if t not in TYPES]
    if bad:
        parser.error(f"unknown phase/path/type {bad}; phases: {PHASES}, paths: {PATHS}, types: {TYPES}")
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be >= 1 (the first warm-up iteration counts the passes)")
    return args


def _worker_argv(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--iters", str(args.iters), "--warmup", str(args.warmup)]
    out += ["--baseline-iters", str(args.baseline_iters), "--batch", str(args.batch), "--device", args.device]
    out += ["--precision", args.precision, "--threads", str(args.threads)]
    out += ["--default-malloc"] if args.default_malloc else []
    out += ["--teacher"] if args.teacher else []
    out += [f"--set={item}" for item in args.set]
    return out + (["--channels-last"] if args.channels_last else [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_case(args.worker, args))
        return
    results: dict[str, dict] = {}
    for case in ["baseline", *cases(args)]:
        start = time.perf_counter()
        if args.in_process:
            results[case] = {**run_case(case, args), "peak_rss_gb": float("nan")}
        else:
            results[case] = run_worker(__file__, case, *_worker_argv(args), timeout=3600)
        took = time.perf_counter() - start
        print(f"  {case}: {results[case]['total_s']:.3f} s/iter ({took:.0f} s)", file=sys.stderr, flush=True)
    report(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": _worker_argv(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
