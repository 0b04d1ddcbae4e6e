"""Readers for the re-ID benchmarks (Market-1501, DukeMTMC-reID, MSMT17) and for custom image folders.

Every reader exposes ``.train``, ``.query`` and ``.gallery`` as lists of :class:`ImageRecord`. Train pids
are relabelled to ``0..num_train_pids-1``; query and gallery keep the original pids. Camera ids are 0-based.
A benchmark reader finds its dataset by folder name (``Market-1501*``, ``DukeMTMC-reID*``, ``MSMT17*``) in
``root`` or one level down, so all three can sit side by side under one data folder.
"""

from __future__ import annotations

import csv
import fnmatch
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from dgnetpp_pl.data.records import ImageRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:s\d+)?_.*(?:" + "|".join(map(re.escape, IMAGE_EXTENSIONS)) + ")$", re.I)
_SHOW = 5  # how many offending names an error or warning quotes


class DatasetError(ValueError):
    """Bad dataset input: a missing folder, an unparsable file name, an empty split or an unreadable image."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def parse_market_name(name: str) -> tuple[int, int] | None:
    """Return ``(pid, camid)`` from a Market / Duke style image file name, or None when it does not parse.

    ``0002_c1s1_000451_03.jpg`` -> ``(2, 0)``; ``0005_c2_f0046985.jpg`` -> ``(5, 1)``; camid = camera - 1.
    Any extension of :data:`IMAGE_EXTENSIONS` is accepted (the benchmarks ship JPEGs).
    """
    match = _MARKET_NAME.match(name)
    if match is None or int(match.group(2)) < 1:
        return None
    return int(match.group(1)), int(match.group(2)) - 1


def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Map pids to ``0..N-1`` in sorted order of the original pid (the train-split convention)."""
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records]


class _Problems:
    """Collects unparsable entries of one dataset and reports them once (error, or warning if not strict)."""

    def __init__(self, dataset: str, root: Path, strict: bool, expected: str) -> None:
        self.dataset, self.root, self.strict, self.expected = dataset, root, strict, expected
        self.items: list[str] = []

    def add(self, item: str) -> None:
        self.items.append(item)

    def report(self) -> None:
        if not self.items:
            return
        shown = ", ".join(repr(s) for s in self.items[:_SHOW])
        more = f" (and {len(self.items) - _SHOW} more)" if len(self.items) > _SHOW else ""
        head = f"{self.dataset} at '{self.root}': {len(self.items)} entries do not parse as {self.expected}"
        if self.strict:
            raise DatasetError(
                f"{head}: {shown}{more}. Rename or remove them, or pass strict=False to skip them with a warning."
            )
        warnings.warn(f"{head}; skipped them: {shown}{more}.", stacklevel=3)


def _layout_gaps(folder: Path, layouts: Sequence[Sequence[str]]) -> list[list[str]]:
    """For each layout, the entries of it that ``folder`` lacks (an empty list: the layout is complete)."""
    return [[name for name in layout if not (folder / name).exists()] for layout in layouts]


def _named(folder_name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(folder_name.lower(), pattern.lower()) for pattern in patterns)


def dataset_named(folder_name: str) -> str | None:
    """The benchmark whose folder names match ``folder_name`` (``'Market-1501-v15.09.15'`` -> ``'market1501'``)."""
    for name, cls in DATASETS.items():
        if _named(folder_name, cls.folder_patterns):
            return name
    return None


def find_dataset_root(
    root: str | os.PathLike,
    dataset: str,
    patterns: Sequence[str],
    layouts: Sequence[Sequence[str]],
    where_to_get: str = "",
) -> tuple[Path, int]:
    """Return ``(folder, index of its layout)`` for ``dataset`` under ``root``.

    ``root`` itself wins when it holds a layout and is not named as another benchmark (e.g. ``/data/my_copy``);
    otherwise exactly one sub-folder named like ``patterns`` (case-insensitive globs) must hold a layout.
    """
    base = Path(root).expanduser()
    looked_for = " or ".join(f"{p}/" for p in patterns)
    expected = " or ".join(", ".join(layout) for layout in layouts)
    if not base.is_dir():
        raise DatasetError(
            f"{dataset} root '{base}' does not exist or is not a folder. Expected {expected} in a folder named "
            f"{looked_for} (root itself or one level down). {where_to_get}".rstrip()
        )
    owner = dataset_named(Path(os.path.abspath(base)).name)
    if owner is not None and owner != dataset:
        raise DatasetError(
            f"{dataset}: root '{base}' is named as a {owner} folder, and {dataset} reads only folders named "
            f"{looked_for}. Set root to the {dataset} folder or to the folder that holds it."
        )
    gaps = _layout_gaps(base, layouts)
    if [] in gaps:
        return base.resolve(), gaps.index([])
    named = [child for child in sorted(base.iterdir()) if child.is_dir() and _named(child.name, patterns)]
    found = [(child, _layout_gaps(child, layouts)) for child in named]
    complete = [(child, child_gaps.index([])) for child, child_gaps in found if [] in child_gaps]
    if len(complete) == 1:
        return complete[0][0].resolve(), complete[0][1]
    if len(complete) > 1:
        names = ", ".join(str(child) for child, _ in complete)
        raise DatasetError(
            f"{dataset}: several copies of the dataset under '{base}' ({names}); set root to the one to use."
        )
    incomplete = [(base, gaps)] if owner == dataset else []
    incomplete += [(child, gaps) for child, gaps in found]
    lacking = "".join(
        f" '{folder}' is named as a {dataset} folder but lacks {', '.join(min(folder_gaps, key=len))}."
        for folder, folder_gaps in incomplete
    )
    present = ", ".join(_describe(p) for p in sorted(base.iterdir())[:10]) or "nothing"
    raise DatasetError(
        f"{dataset} not found in '{base}': expected {expected} in '{base}' itself or in a sub-folder named "
        f"{looked_for}; found {present}.{lacking} {where_to_get}".rstrip()
    )


def _describe(entry: Path) -> str:
    owner = dataset_named(entry.name) if entry.is_dir() else None
    return f"{entry.name} (a {owner} folder)" if owner else entry.name


def _require_nonempty(records: list[ImageRecord], dataset: str, split: str, location: Path) -> None:
    if not records:
        raise DatasetError(
            f"{dataset}: the {split} split '{location}' holds no usable images. "
            "Check that the dataset was unpacked completely."
        )


class ReIDDataset:
    """Common attributes of every reader: the three splits and the train label / camera counts."""

    name: ClassVar[str] = "reid"
    folder_patterns: ClassVar[tuple[str, ...]] = ()  # the benchmark's own folder names, case-insensitive globs
    root: Path
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        """Camera ids of the train split are ``0..num_train_cams-1``."""
        return max((r.camid for r in self.train), default=-1) + 1

    def require_eval_splits(self, role: str) -> None:
        """Raise :class:`DatasetError` naming ``role`` (e.g. ``"data.target"``) when query or gallery is empty."""
        missing = [split for split in ("query", "gallery") if not getattr(self, split)]
        if missing:
            raise DatasetError(
                f"{role}: {self.name} at '{self.root}' has no {' and no '.join(missing)} images, so it cannot be "
                f"evaluated on. {self._how_to_add_eval_splits()}"
            )

    def _how_to_add_eval_splits(self) -> str:
        return "Check that the dataset was unpacked completely."

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', train={len(self.train)} images / "
            f"{self.num_train_pids} ids, query={len(self.query)}, gallery={len(self.gallery)})"
        )


class _MarketLayout(ReIDDataset):
    """Market-1501 layout: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of named JPEGs."""

    splits: ClassVar[tuple[tuple[str, str], ...]] = (
        ("train", "bounding_box_train"),
        ("query", "query"),
        ("gallery", "bounding_box_test"),
    )
    where_to_get: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike, strict: bool = True) -> None:
        folders = [folder for _, folder in self.splits]
        self.root, _ = find_dataset_root(root, self.name, self.folder_patterns, [folders], self.where_to_get)
        problems = _Problems(self.name, self.root, strict, "'<pid>_c<camera>[s<seq>]_<rest>.jpg'")
        parsed = {split: self._read_folder(self.root / folder, split, problems) for split, folder in self.splits}
        problems.report()
        for split, folder in self.splits:
            _require_nonempty(parsed[split], self.name, split, self.root / folder)
        self.train = relabel(parsed["train"])
        self.query = parsed["query"]
        self.gallery = parsed["gallery"]

    @staticmethod
    def _read_folder(folder: Path, split: str, problems: _Problems) -> list[ImageRecord]:
        records = []
        for name in sorted(os.listdir(folder)):
            if not _is_image(name):
                continue  # Thumbs.db and the like ship with the official archives
            parsed = parse_market_name(name)
            if parsed is None:
                problems.add(f"{folder.name}/{name}")
                continue
            pid, camid = parsed
            # -1 marks junk boxes everywhere; 0 marks gallery distractors, which only the gallery may hold.
            if pid == -1 or (pid == 0 and split != "gallery"):
                continue
            records.append(ImageRecord(str(folder / name), pid, camid))
        return records


class Market1501(_MarketLayout):
    """Market-1501 (Zheng et al., ICCV 2015).

    Real counts: 751 train ids, 12,936 train images, 3,368 query images and 15,913 gallery images
    (junk ``-1`` boxes skipped, the 2,793 ``0000`` distractors kept in the gallery).
    """

    name = "market1501"
    folder_patterns = ("Market-1501*", "Market1501*")
    where_to_get = (
        "Market-1501 is distributed by its authors (Zheng et al., ICCV 2015, 'Scalable Person "
        "Re-identification: A Benchmark'): download Market-1501-v15.09.15 from their project page, unpack it "
        "and point root at it."
    )


class DukeMTMCreID(_MarketLayout):
    """DukeMTMC-reID (Zheng et al., ICCV 2017, from DukeMTMC by Ristani et al.).

    Real counts: 702 train ids, 16,522 train images, 2,228 query images and 17,661 gallery images.
    """

    name = "dukemtmc"
    folder_patterns = ("DukeMTMC-reID*", "DukeMTMCreID*")
    where_to_get = (
        "DukeMTMC-reID was withdrawn by its authors in 2019 and is no longer distributed: you must "
        "already hold a copy (the DukeMTMC-reID folder) and point root at it."
    )


class MSMT17(ReIDDataset):
    """MSMT17 (Wei et al., CVPR 2018), V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``,
    faces blurred), each with ``list_{train,val,query,gallery}.txt``.

    Each list line is ``<path relative to the train or test folder> <pid>``; the camera is the third ``_`` field
    of the file name (1..15, so camid 0..14). ``combine_train_val=True`` (the default, as SpCL and OpenUnReID
    report) trains on list_train + list_val: 1,041 ids, 32,621 images; ``False`` uses list_train only
    (30,248 images). Query: 11,659 images, gallery: 82,161 images.
    """

    name = "msmt17"
    folder_patterns = ("MSMT17*",)  # MSMT17, MSMT17_V1, MSMT17_V2
    versions: ClassVar[dict[str, tuple[str, str]]] = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
    where_to_get = (
        "MSMT17 is available on request from its authors at Peking University (Wei et al., CVPR 2018); "
        "unpack MSMT17_V1 (or MSMT17_V2) and point root at it or at the folder that holds it."
    )

    def __init__(self, root: str | os.PathLike, strict: bool = True, combine_train_val: bool = True) -> None:
        lists = ["list_train.txt", "list_query.txt", "list_gallery.txt"]
        if combine_train_val:
            lists.insert(1, "list_val.txt")
        layouts = [[*folders, *lists] for folders in self.versions.values()]
        self.root, index = find_dataset_root(root, self.name, self.folder_patterns, layouts, self.where_to_get)
        self.version = list(self.versions)[index]
        train_dir, test_dir = (self.root / folder for folder in self.versions[self.version])
        self.combine_train_val = combine_train_val
        expected = "'<relative path> <pid>' lines, file names <pid>_<n>_<camera>_..."
        problems = _Problems(self.name, self.root, strict, expected)
        train_lists = lists[:-2]
        train = [r for name in train_lists for r in self._read_list(name, train_dir, problems)]
        query = self._read_list("list_query.txt", test_dir, problems)
        gallery = self._read_list("list_gallery.txt", test_dir, problems)
        problems.report()
        _require_nonempty(train, self.name, "train", self.root / " + ".join(train_lists))
        _require_nonempty(query, self.name, "query", self.root / "list_query.txt")
        _require_nonempty(gallery, self.name, "gallery", self.root / "list_gallery.txt")
        self.train, self.query, self.gallery = relabel(train), query, gallery

    def _read_list(self, list_name: str, image_dir: Path, problems: _Problems) -> list[ImageRecord]:
        records = []
        lines = (self.root / list_name).read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                rel, pid = fields[0], int(fields[1])
                camera = int(Path(rel).name.split("_")[2])
            except (IndexError, ValueError):
                problems.add(f"{list_name}:{number}: {line.strip()}")
                continue
            if len(fields) != 2 or camera < 1:
                problems.add(f"{list_name}:{number}: {line.strip()}")
                continue
            records.append(ImageRecord(str(image_dir / rel), pid, camera - 1))
        return records


class ImageFolderReID(ReIDDataset):
    """Custom data: ``root/records.csv`` (header ``path,pid[,camid][,split]``) or one sub-folder per identity.

    In folder mode each sub-folder name is one identity (``1``, ``01`` and ``001`` are three people), labelled in
    sorted order of the names, and camid is 0 unless the file name parses as Market style; there is no query or
    gallery, so such a folder is a training source only. In CSV mode paths are relative to root and stay inside
    it, and ``split`` (train/query/gallery, default train) fills ``.query`` / ``.gallery``. pid -1 rows are junk
    and skipped.
    """

    name = "folder"
    csv_name: ClassVar[str] = "records.csv"
    _SPLITS: ClassVar[tuple[str, ...]] = ("train", "query", "gallery")

    def __init__(self, root: str | os.PathLike, strict: bool = True) -> None:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DatasetError(
                f"folder dataset root '{base}' does not exist. Expected either {self.csv_name} (header "
                "path,pid[,camid][,split], paths relative to root) or one sub-folder of images per identity."
            )
        self.root = base.resolve()
        csv_path = self.root / self.csv_name
        if csv_path.is_file():
            problems = _Problems(self.name, self.root, strict, f"valid rows of {self.csv_name}")
            splits = self._read_csv(csv_path, problems)
        else:
            problems = _Problems(self.name, self.root, strict, "images inside an identity sub-folder")
            splits = {"train": self._read_folders(problems), "query": [], "gallery": []}
        problems.report()
        _require_nonempty(splits["train"], self.name, "train", csv_path if csv_path.is_file() else self.root)
        self.train = relabel(splits["train"])
        self.query, self.gallery = splits["query"], splits["gallery"]

    def _read_folders(self, problems: _Problems) -> list[ImageRecord]:
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        folders = [e.name for e in entries if e.is_dir()]
        for entry in entries:
            if entry.is_file() and _is_image(entry.name):
                problems.add(f"{entry.name} (not inside an identity folder)")
        records = []
        for pid, folder in enumerate(folders):  # keyed by the name string, never by its numeric value
            for name in sorted(os.listdir(self.root / folder)):
                if _is_image(name):
                    parsed = parse_market_name(name)
                    camid = parsed[1] if parsed else 0
                    records.append(ImageRecord(str(self.root / folder / name), pid, camid))
        return records

    def _read_csv(self, csv_path: Path, problems: _Problems) -> dict[str, list[ImageRecord]]:
        splits: dict[str, list[ImageRecord]] = {s: [] for s in self._SPLITS}
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or []]
            if "path" not in header or "pid" not in header:
                raise DatasetError(
                    f"'{csv_path}': the header must name the columns path and pid (optional: camid, split); "
                    f"found {header}."
                )
            for number, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                parsed = self._parse_row(row)
                if isinstance(parsed, str):
                    problems.add(f"{self.csv_name}:{number}: {parsed}")
                elif parsed[0].pid != -1:
                    splits[parsed[1]].append(parsed[0])
        return splits

    def _parse_row(self, row: dict[str, Any]) -> tuple[ImageRecord, str] | str:
        """Return ``(record, split)`` for a valid row, else the reason it is not."""
        if os.path.isabs(row["path"]) or os.path.normpath(row["path"]).split(os.sep)[0] == os.pardir:
            return f"path {row['path']!r} leaves the dataset root; give it relative to '{self.root}', inside it"
        path = self.root / row["path"]
        split = row.get("split") or "train"
        try:
            pid = int(row["pid"])
            camid = int(row["camid"]) if row.get("camid") else None
        except ValueError:
            return f"pid / camid must be integers, got pid={row['pid']!r} camid={row.get('camid')!r}"
        if split not in self._SPLITS:
            return f"split must be one of {', '.join(self._SPLITS)}, got {split!r}"
        if camid is not None and camid < 0:
            return f"camid must be >= 0, got {camid}"
        if not path.is_file():
            return f"missing file {row['path']!r}"
        if camid is None:
            parsed = parse_market_name(path.name)
            camid = parsed[1] if parsed else 0
        return ImageRecord(str(path), pid, camid), split

    def _how_to_add_eval_splits(self) -> str:
        if (self.root / self.csv_name).is_file():
            return f"Add rows with split=query and split=gallery to '{self.root / self.csv_name}'."
        return (
            f"One sub-folder per identity gives train images only: add '{self.root / self.csv_name}' with the "
            "columns path,pid,camid,split and rows with split=query and split=gallery."
        )


DATASETS: dict[str, type[ReIDDataset]] = {
    "market1501": Market1501,
    "dukemtmc": DukeMTMCreID,
    "msmt17": MSMT17,
    "folder": ImageFolderReID,
}


def build_dataset(name: str, root: str | os.PathLike, **kwargs: Any) -> ReIDDataset:
    """Build a registered dataset by name, e.g. ``build_dataset("market1501", "/data/Market-1501")``."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset name '{name}'; valid names: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name](root, **kwargs)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB (grayscale, palette, CMYK and RGBA are converted)."""
    try:
        with Image.open(path) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot read image '{path}': {err}. Replace or remove the file; data.verify=true lists every "
            "unreadable image of a dataset at once."
        ) from err


def _image_problem(path: str) -> str | None:
    try:
        load_image(path)
    except DatasetError as err:
        return str(err.__cause__ or err)
    return None


def verify_images(records: Iterable[ImageRecord], workers: int | None = None) -> list[tuple[str, str]]:
    """Fully decode every image and return ALL bad ones as ``(path, reason)``, in input order."""
    paths = [r.path for r in records]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        reasons = list(pool.map(_image_problem, paths, chunksize=64))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]
