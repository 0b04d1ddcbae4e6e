"""Official DG-Net / DG-Net++ / teacher weights to our checkpoints, and ours back to the official files.

::

    python -m dgnetpp_pl.convert src=models/dgnet/duke out=dgnet_duke.ckpt          # DG-Net -> stage=source
    python -m dgnetpp_pl.convert src=outputs/best-duke2market iteration=172353 num_source_ids=702 out=d2m.ckpt
    python -m dgnetpp_pl.convert src=models/teacher/duke/net_last.pth out=teacher_duke.ckpt
    python -m dgnetpp_pl.convert to=official src=run/checkpoints/adapt/final.ckpt out=official/checkpoints

A DG-Net model (one generator) becomes a ``stage=source`` checkpoint that ``init_ckpt=`` accepts; a DG-Net++
model (two generators, a joint classifier of source ids then target clusters) an ``adapt`` checkpoint that
``evaluate`` accepts. The official files do not record the network config: ``model`` (default: the paper's
networks) and ``image_size`` describe them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.cli import run_app
from dgnetpp_pl.config import ConfigError, ConvertConfig, ModelConfig, coerce, require
from dgnetpp_pl.inference import build_model, load_model, save_model_checkpoint
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.official_files import (
    OfficialFiles,
    find_official_files,
    load_tensors,
    read_state,
    read_teacher_opts,
    save_state,
    state_dict_of,
)
from dgnetpp_pl.official_layout import (
    Imported,
    OfficialLayoutError,
    appearance_layout,
    export_state,
    generator_layout,
    image_dis_layout,
    import_state,
    summarise_keys,
    teacher_layout,
)
from dgnetpp_pl.teacher_checkpoint import load_teacher, save_teacher, teacher_hparams

log = logging.getLogger(__name__)

HEADS = ("classifier1", "classifier2")
TEACHER_CLASSES = "classifier.classifier.0.weight"
TEACHER_BOTTLENECK = "classifier.add_block.0.weight"


def _network_config(model: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """The typed network config of converted weights, without ImageNet weights (the files hold the weights)."""
    return dataclasses.replace(coerce(ModelConfig, model, "model"), pretrained=False)


# ------------------------------------------------------------------ official -> ours
def _class_count(state: dict[str, Tensor], heads: tuple[str, ...], path: Path) -> int | None:
    """Number of classes of the heads' final Linear layers, or None when the file has none of them."""
    counts = {h: state[f"{h}.classifier.0.weight"].shape[0] for h in heads if f"{h}.classifier.0.weight" in state}
    if len(counts) < len(heads):
        return None
    if len(set(counts.values())) > 1:
        raise OfficialLayoutError(f"{path}: the heads score different numbers of classes {counts}; they must agree.")
    return next(iter(counts.values()))


def _load_into(module: torch.nn.Module, imported: Imported) -> None:
    module.load_state_dict(imported.state, strict=True)


def _report(imports: dict[str, Imported], dropped: str = "") -> None:
    unused = "; ".join(f"{name}: {summarise_keys(imp.unused)}" for name, imp in imports.items() if imp.unused)
    if unused:
        log.info(f"Official entries not used (the official code never reads them): {unused}")
    filled = sum(len(imp.filled) for imp in imports.values())
    if filled:
        log.info(f"{filled} BatchNorm step counters are absent from the files (older PyTorch) and set to 0.")
    if dropped:
        log.info(dropped)


def official_model_to_ours(
    files: OfficialFiles,
    out: str | Path,
    kind: str,
    num_source_ids: int | None,
    model: ModelConfig | Mapping[str, Any],
    image_size: tuple[int, int],
) -> Path:
    """Convert one saved iteration of DG-Net (`kind="dgnet"`) or DG-Net++ (`"dgnetpp"`) to our checkpoint.

    `model` (typed or a plain dict) describes the official networks; `image_size` is `(height, width)`.
    """
    network = _network_config(model)
    image_size = (int(image_size[0]), int(image_size[1]))
    id_path = files.path("id")
    id_state = read_state(id_path, "a")
    if files.kind == "dgnetpp":
        gen_a_path, gen_b_path = files.path("gen_a"), files.path("gen_b")
        gen_a, gen_b = read_state(gen_a_path, "a"), read_state(gen_b_path, "b")
    else:
        gen_a_path = gen_b_path = files.path("gen")
        held = load_tensors(gen_a_path)
        gen_a = state_dict_of(held, gen_a_path, "a")
        gen_b = state_dict_of(held, gen_a_path, "b") if isinstance(held, dict) and "b" in held else None
    found = "dgnetpp" if gen_b is not None else "dgnet"
    kind = found if kind == "auto" else kind
    if kind != found:
        what = "a DG-Net++ model (two generators)" if gen_b is not None else "a DG-Net model (one generator)"
        raise CheckpointError(
            f"{files.folder} holds {what}, not kind={kind}; use kind={found} (or kind=auto). A DG-Net model "
            "converts to a source-stage checkpoint that init_ckpt= starts DG-Net++ from."
        )
    dis_path = files.path("dis", "dis_a")
    dis_state = read_state(dis_path, "a")

    total = _class_count(id_state, HEADS, id_path)
    if total is None:  # not an official appearance encoder: the import lists every entry that differs
        probe = build_model("source", network, 1, image_size=image_size).e_app
        import_state(id_state, probe, appearance_layout(probe), str(id_path))
        raise AssertionError("unreachable: the classifier entries are part of the official layout")
    if kind == "dgnet":
        if num_source_ids is not None and num_source_ids != total:
            raise OfficialLayoutError(
                f"{id_path} scores {total} source identities, but num_source_ids={num_source_ids} was asked; "
                "convert the model trained on that source, or drop num_source_ids."
            )
        stage, n_src, capacity = "source", total, 0
    else:
        if num_source_ids is None:
            raise ConfigError(
                f"num_source_ids is required for a DG-Net++ model ({id_path} scores {total} classes: source ids "
                "first, then target clusters); e.g. num_source_ids=702 for DukeMTMC-reID as the source, 751 for "
                "Market-1501."
            )
        if not 1 <= num_source_ids <= total:
            raise OfficialLayoutError(
                f"num_source_ids={num_source_ids} must be between 1 and the {total} classes {id_path} scores."
            )
        stage, n_src, capacity = "adapt", num_source_ids, total - num_source_ids

    converted = build_model(stage, network, n_src, capacity, image_size=image_size)
    parts = [("e_app", converted.e_app, appearance_layout, id_state, id_path)]
    parts.append(("gen_a", converted.gen_a, generator_layout, gen_a, gen_a_path))
    if converted.gen_b is not None:
        parts.append(("gen_b", converted.gen_b, generator_layout, gen_b, gen_b_path))
    parts.append(("d_img", converted.d_img, image_dis_layout, dis_state, dis_path))
    imports = {}
    for name, module, layout, state, path in parts:
        imports[f"{path.name} ({name})"] = imp = import_state(state, module, layout(module), str(path))
        _load_into(module, imp)
    if stage == "adapt":
        # Every official class is in use: ID_class_b is the number of clusters of the last round.
        converted.num_target_classes.fill_(capacity)
    dropped = (
        "The domain discriminator is not in the official files (the official code re-creates it every round): "
        "it starts from a fresh initialisation."
        if stage == "adapt"
        else ""
    )
    _report(imports, dropped)
    written = save_model_checkpoint(converted, out, origin=f"{files.folder} iteration {files.iteration}")
    ids = f"{n_src} source ids" + (f" + {capacity} target classes" if stage == "adapt" else "")
    log.info(f"Wrote {written}: stage={stage}, {ids}, from {files.folder} (iteration {files.iteration}).")
    return written


def official_teacher_to_ours(
    path: str | Path, out: str | Path, num_source_ids: int | None, last_stride: int | None
) -> Path:
    """Convert the re-ID baseline's `net_last.pth` (`ft_net`) to our teacher checkpoint."""
    path = Path(path)
    state = read_state(path)
    opts = read_teacher_opts(path)
    if TEACHER_CLASSES not in state or TEACHER_BOTTLENECK not in state:
        probe = Teacher(1)  # not an ft_net: the import lists every entry that differs
        import_state(state, probe, teacher_layout(probe), str(path))
        raise AssertionError("unreachable: the classifier entries are part of the official layout")
    n = state[TEACHER_CLASSES].shape[0]
    if num_source_ids is not None and n != num_source_ids:
        raise OfficialLayoutError(
            f"{path} scores {n} identities, but num_source_ids={num_source_ids} was asked; convert the teacher "
            "trained on that source, or drop num_source_ids."
        )
    stride = int(last_stride if last_stride is not None else opts.get("stride", 2))
    teacher = Teacher(
        n,
        last_stride=stride,
        bottleneck_dim=state[TEACHER_BOTTLENECK].shape[0],
        droprate=float(opts.get("droprate", 0.5)),
    )
    imp = import_state(state, teacher, teacher_layout(teacher), str(path))
    _load_into(teacher, imp)
    _report({path.name: imp})
    written = save_teacher(teacher, out, origin=str(path))
    log.info(f"Wrote {written}: teacher of {n} source ids, last stride {stride}.")
    return written


# ------------------------------------------------------------------ ours -> official
def official_states(model: DGNetPP) -> dict[str, tuple[dict[str, Tensor], str]]:
    """Our model as the official files hold it: `{role: (state_dict, entry)}`, roles as in `OfficialFiles`.

    The source stage gives DG-Net's files (`gen`, `dis`, `id`); the adapt stage DG-Net++'s (`gen_a`, `gen_b`,
    `dis_a`, `dis_b`, `id`), whose classifier keeps only the classes in use (source ids + current clusters).
    """
    id_state = export_state(model.e_app, appearance_layout(model.e_app))
    dis = export_state(model.d_img, image_dis_layout(model.d_img))
    gen_a = export_state(model.gen_a, generator_layout(model.gen_a))
    if model.stage == "source":
        return {"gen": (gen_a, "a"), "dis": (dis, "a"), "id": (id_state, "a")}
    used = model.num_source_ids + int(model.num_target_classes)
    for head in HEADS:
        for leaf in ("weight", "bias"):
            key = f"{head}.classifier.0.{leaf}"
            id_state[key] = id_state[key][:used].clone()
    gen_b = export_state(model.gen_b, generator_layout(model.gen_b))
    # One image discriminator serves both domains; DG-Net++ saves it under both names.
    return {
        "gen_a": (gen_a, "a"),
        "gen_b": (gen_b, "b"),
        "dis_a": (dis, "a"),
        "dis_b": ({k: v.clone() for k, v in dis.items()}, "b"),
        "id": (id_state, "a"),
    }


def ours_to_official(src: str | Path, out: str | Path, iteration: int | None = None) -> list[Path]:
    """Write our checkpoint `src` in the official layout into the folder `out`; returns the files written."""
    src, out = Path(src), Path(out)
    ckpt = load_checkpoint(src)
    if ckpt.get("dgnetpp", {}).get("stage") == "teacher":
        return _teacher_to_official(load_teacher(src), out)
    it = int(ckpt.get("global_step", 0)) if iteration is None else iteration
    del ckpt
    model = load_model(src)
    written = [
        save_state(out / f"{role}_{it:08d}.pt", state, entry) for role, (state, entry) in official_states(model).items()
    ]
    notes = ["ImageNet fc (model.fc.*) and AdaIN running statistics written as placeholders the official loaders drop"]
    if model.stage == "adapt":
        capacity = model.num_source_ids + model.target_capacity
        used = model.num_source_ids + int(model.num_target_classes)
        notes.append("the domain discriminator is not written (the official code does not save it)")
        if used < capacity:
            notes.append(f"classifier rows {used}..{capacity - 1} (unused capacity) are not written")
    log.info("; ".join(notes) + ".")
    log.info(f"Wrote {len(written)} official files of iteration {it} to {out}: {', '.join(p.name for p in written)}.")
    return written


def _teacher_to_official(teacher: Teacher, out: Path) -> list[Path]:
    weights = save_state(out / "net_last.pth", export_state(teacher, teacher_layout(teacher)))
    hp = teacher_hparams(teacher)
    opts = {"stride": hp["last_stride"], "nclasses": hp["num_classes"], "droprate": hp["droprate"]}
    opts["linear_num"] = hp["bottleneck_dim"]
    (out / "opts.yaml").write_text("".join(f"{k}: {v}\n" for k, v in opts.items()))
    log.info(f"Wrote {weights} and {out / 'opts.yaml'} (model.fc.* written as zeros; the official loader drops it).")
    return [weights, out / "opts.yaml"]


# ------------------------------------------------------------------ CLI
def convert(cfg: ConvertConfig | DictConfig) -> list[Path]:
    """Run one conversion from a :class:`ConvertConfig` (or the CLI's composed config); returns the files written."""
    require(cfg, ("src", "out"), "python -m dgnetpp_pl.convert src=PATH out=PATH [to=official]")
    cfg = coerce(ConvertConfig, cfg)
    if cfg.to == "official":
        return ours_to_official(cfg.src, cfg.out, cfg.iteration)
    src = Path(cfg.src)
    kind = cfg.kind
    if src.is_dir() and (src / "net_last.pth").is_file() and kind in ("auto", "teacher"):
        src, kind = src / "net_last.pth", "teacher"
    if kind == "auto" and src.is_file() and src.suffix == ".pth":
        kind = "teacher"
    if kind == "teacher":
        return [official_teacher_to_ours(src, cfg.out, cfg.num_source_ids, cfg.teacher_last_stride)]
    if src.is_file():
        raise ConfigError(
            f"src={src} is a file; give the official checkpoints folder (gen_*.pt, dis_*.pt, id_*.pt), or "
            "kind=teacher for a teacher's net_last.pth."
        )
    files = find_official_files(src, cfg.iteration)
    image_size = (cfg.image_size[0], cfg.image_size[1])
    return [official_model_to_ours(files, cfg.out, kind, cfg.num_source_ids, cfg.model, image_size)]


def convert_task(cfg: DictConfig) -> None:
    convert(cfg)


def main() -> None:
    """``python -m dgnetpp_pl.convert`` / ``dgnetpp-convert``."""
    run_app("convert", convert_task, lock_folder=False)


if __name__ == "__main__":
    main()
