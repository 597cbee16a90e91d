"""Read-only readers for the official dataset layouts, accepting the downloads unchanged.

Evaluation readers (DAVIS, JHMDB, VIP) refuse anything doubtful with a `DatasetError` that
names the file or folder and what was expected. Training readers (YouTube-VOS, image folders)
list files and leave decoding to `read_rgb_or_none`, so one corrupt JPEG costs one sample,
not a run. Everywhere, macOS clutter (`__MACOSX/`, `.AppleDouble/`, `._*`) and hidden files
are ignored, and frame files are ordered by the integer value of their stem where the stem
is all digits (`00005` < `00010` < `00100`; DAVIS val has widths 854, 910 and 1152, YouTube-VOS
lists start anywhere, so nothing assumes a size or a first number).

Layouts, as the official downloads and public evaluation code have them:

DAVIS-2017 (davis2017-evaluation)::

    ImageSets/2017/<split>.txt               one sequence per line
    JPEGImages/<480p|Full-Resolution>/<seq>/00000.jpg ...
    Annotations/<480p|Full-Resolution>/<seq>/00000.png ...   mode 'P', 0 = background, 255 = void
    train/val annotate every frame; test-dev/test-challenge only the first.
    Objects: the largest id in the first annotation, 255 excluded (`get_all_masks`).

YouTube-VOS 2018/2019::

    train/JPEGImages/<video>/00000.jpg 00005.jpg ...  every 5th raw frame, any first number
    train/meta.json                          {"videos": {<video>: {"objects": ...}}}
    train_all_frames/JPEGImages/<video>/...  every raw frame (separate download)

JHMDB (CRW `ajabri/videowalk` code/data/jhmdb.py, VFS `mmaction/datasets/jhmdb_dataset.py`)::

    Rename_Images/<action>/<video>/00001.png ...         1-based frame numbers
    joint_positions/<action>/<video>/joint_positions.mat `pos_img`: 2 x 15 x T, (x, y), MATLAB 1-based
    splits/<action>_test_split<k>.txt         lines "<video>.avi 1|2" (1 = train, 2 = test)
    Both CRW and VFS subtract 1 from `pos_img`; VFS truncates to min(frames, T) because a few
    videos have more frames than joint annotations. This reader returns both as they are.

VIP (UVC / ContrastCorr `test_mask_vip.py`, VFS `vip_dataset.py`)::

    VIP_Fine/lists/<split>_videos.txt         one video per line ("videos1")
    VIP_Fine/Images/<video>/<12-digit raw frame number>.jpg
    VIP_Fine/Annotations/Category_ids/<video>/<same stem>.png   class ids 0..19, 255 = ignore
    VIP_Fine keeps only the annotated frames (every 25th raw frame: ...826, ...851), so labels
    usually cover every listed frame; `label_paths` pairs by stem, so a denser frame folder works
    too. VFS scores mIoU over 20 classes with ignore_index=255, hence 255 is accepted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageFile

from stt.metrics import VIP_IGNORE_LABEL, VIP_NUM_CLASSES


class DatasetError(ValueError):
    """A dataset file or folder is missing or not what the official layout promises."""


# --------------------------------------------------------------------------- files


def _is_clutter(name: str) -> bool:
    # Hidden files, AppleDouble forks (`._x.jpg`) and the folders zip tools on macOS add.
    return name.startswith(".") or name == "__MACOSX"


def _is_number(stem: str) -> bool:
    return stem.isascii() and stem.isdigit()


def _numeric_key(path: Path) -> tuple:
    stem = path.stem
    return (0, int(stem), path.name) if _is_number(stem) else (1, 0, path.name)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing folder; expected {what}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing file; expected {what}")
    return path


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _is_clutter(e.name))


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of `folder` ending in one of `suffixes` (any case), clutter skipped, numeric order."""
    paths = [
        Path(e.path)
        for e in os.scandir(folder)
        if e.is_file() and not _is_clutter(e.name) and e.name.lower().endswith(suffixes)
    ]
    return sorted(paths, key=_numeric_key)


def _sequence_files(folder: Path, suffix: str, what: str) -> list[Path]:
    _require_dir(folder, what)
    paths = _files(folder, (suffix,))
    if not paths:
        raise DatasetError(f"{folder}: no {suffix} files; expected {what}")
    return paths


def _read_list(path: Path, what: str) -> list[str]:
    """Non-blank stripped lines of a list file; refuses a missing or empty one."""
    _require_file(path, what)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: empty; expected {what}, one name per line")
    return names


# --------------------------------------------------------------------------- images


def _open_loaded(path: Path) -> Image.Image:
    """Open and fully decode an image, so a truncated file fails here rather than later."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this flag PIL pads a truncated JPEG with grey and reports success.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated frames would be read silently")
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing file; expected an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from err
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        img.close()
        raise DatasetError(f"{path}: truncated or corrupt image ({err}); expected a complete image file") from err
    return img


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the header alone."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing file; expected an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from err
    return height, width


def read_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; DatasetError naming the file if it is bad."""
    with _open_loaded(path) as img:
        return np.array(img.convert("RGB"))


def read_rgb_or_none(path) -> np.ndarray | None:
    """`read_rgb`, or None for a missing, corrupt or truncated file (training readers count these)."""
    try:
        return read_rgb(path)
    except DatasetError:
        return None


def read_mask(path) -> np.ndarray:
    """(H, W) uint8 label indices of a mode 'P' (palette) or 'L' (grey) PNG."""
    with _open_loaded(path) as img:
        if img.mode not in ("P", "L"):
            raise DatasetError(f"{path}: mask has mode {img.mode!r}; expected a palette ('P') or grey ('L') PNG")
        return np.array(img)


def read_palette(path) -> list[int] | None:
    """The palette of a mode 'P' image as 768 ints (r, g, b per index), or None for other modes."""
    with _open_loaded(path) as img:
        if img.mode != "P":
            return None
        palette = img.getpalette("RGB")
    # Pillow returns only the entries the file stores; writers expect all 256.
    return palette + [0] * (768 - len(palette))


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL VOC colour map (768 ints): index bits spread over the high bits of r, g, b."""
    palette = []
    for index in range(256):
        r = g = b = 0
        bits = index
        for shift in range(7, -1, -1):
            r |= (bits & 1) << shift
            g |= ((bits >> 1) & 1) << shift
            b |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette += [r, g, b]
    return palette


def _stack_frames(paths: list[Path]) -> np.ndarray:
    """(T, H, W, 3) uint8; refuses a frame whose size differs from the first."""
    frames = [read_rgb(paths[0])]
    for path in paths[1:]:
        frame = read_rgb(path)
        if frame.shape != frames[0].shape:
            raise DatasetError(
                f"{path}: frame is {frame.shape[1]}x{frame.shape[0]}; expected "
                f"{frames[0].shape[1]}x{frames[0].shape[0]} like {paths[0].name}"
            )
        frames.append(frame)
    return np.stack(frames)


# --------------------------------------------------------------------------- DAVIS


class DAVIS:
    """DAVIS-2017 semi-supervised: sequences of a split, their frames and object masks."""

    RESOLUTIONS = ("480p", "Full-Resolution")
    FULLY_ANNOTATED_SPLITS = ("train", "val")

    def __init__(self, root, split: str = "val", resolution: str = "480p"):
        if resolution not in self.RESOLUTIONS:
            raise DatasetError(f"DAVIS resolution {resolution!r}; expected one of {self.RESOLUTIONS}")
        self.root = _require_dir(Path(root), "a DAVIS-2017 root holding JPEGImages/, Annotations/, ImageSets/")
        self.split = split
        self.resolution = resolution
        self.frame_root = _require_dir(self.root / "JPEGImages" / resolution, f"DAVIS {resolution} frames")
        self.mask_root = _require_dir(self.root / "Annotations" / resolution, f"DAVIS {resolution} annotations")
        split_file = self.root / "ImageSets" / "2017" / f"{split}.txt"
        self.sequences: list[str] = _read_list(split_file, f"the DAVIS-2017 {split!r} sequence list")
        repeated = sorted({seq for seq in self.sequences if self.sequences.count(seq) > 1})
        if repeated:  # scored twice, it would weigh twice in the mean
            raise DatasetError(f"{split_file}: lists {', '.join(repeated)} more than once; expected each sequence once")
        # Every listed sequence is checked before the first is evaluated: no half-written results.
        for seq in self.sequences:
            for folder in (self.frame_root / seq, self.mask_root / seq):
                _require_dir(folder, f"sequence {seq!r} listed in {split_file}")
            if self.num_objects(seq) == 0:
                # The official tool scores such a sequence with no rows: it silently leaves the mean.
                first = self.mask_paths(seq)[0]
                raise DatasetError(
                    f"{first}: the first annotation holds no object id (only 0 and 255 = void); expected "
                    "ids 1..N for the objects to propagate (masks saved as 0/255 mark the object void)"
                )

    def frame_paths(self, seq: str) -> list[Path]:
        return _sequence_files(self.frame_root / seq, ".jpg", f"the frames of DAVIS sequence {seq!r}")

    def mask_paths(self, seq: str) -> list[Path]:
        """Annotation PNGs; each names a frame, the first is the first frame's, train/val cover all."""
        frames = self.frame_paths(seq)
        masks = _sequence_files(self.mask_root / seq, ".png", f"the annotations of DAVIS sequence {seq!r}")
        if self.split in self.FULLY_ANNOTATED_SPLITS and len(masks) != len(frames):
            raise DatasetError(
                f"{self.mask_root / seq}: {len(masks)} masks for {len(frames)} frames in "
                f"{self.frame_root / seq}; expected one mask per frame in DAVIS {self.split}"
            )
        frame_stems = {p.stem for p in frames}
        for mask in masks:
            if mask.stem not in frame_stems:
                raise DatasetError(f"{mask}: no frame {mask.stem}.jpg in {self.frame_root / seq}")
        if masks[0].stem != frames[0].stem:
            raise DatasetError(f"{self.mask_root / seq}: first mask is {masks[0].name}; expected {frames[0].stem}.png")
        return masks

    def read_frames(self, seq: str) -> np.ndarray:
        """(T, H, W, 3) uint8."""
        return _stack_frames(self.frame_paths(seq))

    def read_masks(self, seq: str) -> np.ndarray:
        """(T, H, W) uint8 object ids, 255 = void; T = number of annotations."""
        frame_dir = self.frame_root / seq
        masks = [self._read_checked_mask(path, frame_dir / f"{path.stem}.jpg") for path in self.mask_paths(seq)]
        return np.stack(masks)

    def first_mask(self, seq: str) -> np.ndarray:
        """(H, W) uint8: the annotation propagation starts from."""
        return self._read_checked_mask(self.mask_paths(seq)[0], self.frame_paths(seq)[0])

    def num_objects(self, seq: str) -> int:
        mask = self.first_mask(seq)
        return int(mask[mask != 255].max(initial=0))

    def palette(self, seq: str) -> list[int]:
        return read_palette(self.mask_paths(seq)[0]) or davis_palette()

    @staticmethod
    def _read_checked_mask(mask_path: Path, frame_path: Path) -> np.ndarray:
        mask = read_mask(mask_path)
        frame_hw = _image_size(frame_path)
        if mask.shape != frame_hw:
            raise DatasetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}; expected "
                f"{frame_hw[1]}x{frame_hw[0]} like its frame {frame_path}"
            )
        return mask


# --------------------------------------------------------------------------- YouTube-VOS


class YouTubeVOS:
    """YouTube-VOS 2018/2019 training videos (frames only; masks are not used for training)."""

    def __init__(self, root, split: str = "train", all_frames: bool = False):
        root = _require_dir(Path(root), "a YouTube-VOS root or split folder")
        folder_name = f"{split}_all_frames" if all_frames else split
        # Accept both the download root and the split folder itself.
        self.split_dir = root if (root / "JPEGImages").is_dir() else root / folder_name
        if not all_frames and not self.split_dir.is_dir() and (root / f"{split}_all_frames" / "JPEGImages").is_dir():
            self.split_dir = root / f"{split}_all_frames"  # a download of the all-frames archive alone
        self.frame_root = _require_dir(self.split_dir / "JPEGImages", f"YouTube-VOS {folder_name}/JPEGImages")
        self.videos: list[str] = _subdirs(self.frame_root)
        meta_path = self.split_dir / "meta.json"
        try:
            self.meta: dict = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except json.JSONDecodeError as err:
            raise DatasetError(f"{meta_path}: not valid JSON ({err})") from err

    def frame_paths(self, video: str) -> list[Path]:
        """JPEGs in frame-number order; [] for an empty folder (training skips such videos)."""
        return _files(_require_dir(self.frame_root / video, f"YouTube-VOS video {video!r}"), (".jpg",))

    def frame_numbers(self, video: str) -> list[int]:
        numbers = []
        for path in self.frame_paths(video):
            if not _is_number(path.stem):
                raise DatasetError(f"{path}: frame name is not a number; expected e.g. 00005.jpg")
            numbers.append(int(path.stem))
        return numbers


# --------------------------------------------------------------------------- image folder


class ImageFolder:
    """Every image under `root`, recursively (ImageNet-style class folders or flat)."""

    SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root):
        self.root = _require_dir(Path(root), "a folder of images")
        paths = []
        for folder, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not _is_clutter(d)]  # prune in place: os.walk honours it
            paths += [
                Path(folder) / name
                for name in filenames
                if not _is_clutter(name) and name.lower().endswith(self.SUFFIXES)
            ]
        if not paths:
            raise DatasetError(f"{self.root}: no images found; expected files ending in {', '.join(self.SUFFIXES)}")
        self.paths: list[Path] = sorted(paths)


# --------------------------------------------------------------------------- JHMDB


class JHMDB:
    """JHMDB videos of one split and subset, their PNG frames and 15 joints per frame."""

    NUM_JOINTS = 15
    SUBSET_FLAGS = {"train": "1", "test": "2"}

    def __init__(self, root, split: int = 1, subset: str = "test"):
        if split not in (1, 2, 3):
            raise DatasetError(f"JHMDB split {split!r}; expected 1, 2 or 3")
        if subset not in self.SUBSET_FLAGS:
            raise DatasetError(f"JHMDB subset {subset!r}; expected 'train' or 'test'")
        self.root = _require_dir(Path(root), "a JHMDB root holding Rename_Images/, joint_positions/, splits/")
        self.frame_root = _require_dir(self.root / "Rename_Images", "JHMDB frames")
        self.joint_root = _require_dir(self.root / "joint_positions", "JHMDB joint annotations")
        split_dir = _require_dir(self.root / "splits", "JHMDB split files")
        suffix = f"_test_split{split}.txt"
        split_files = _files(split_dir, (suffix,))
        if not split_files:
            raise DatasetError(f"{split_dir}: no *{suffix} files; expected one per action")
        self.videos: list[tuple[str, str]] = []
        for split_file in split_files:
            action = split_file.name[: -len(suffix)]
            self.videos += [(action, video) for video in self._parse_split(split_file, self.SUBSET_FLAGS[subset])]
        if not self.videos:
            flag = self.SUBSET_FLAGS[subset]
            raise DatasetError(f"{split_dir}: no {subset} videos in *{suffix}; expected lines ending in {flag}")
        for action, video in self.videos:
            _require_dir(self.frame_root / action / video, f"frames of {action}/{video} listed in splits/")
            _require_dir(self.joint_root / action / video, f"joints of {action}/{video} listed in splits/")

    @staticmethod
    def _parse_split(path: Path, flag: str) -> list[str]:
        videos = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[0].endswith(".avi") or fields[1] not in ("1", "2"):
                raise DatasetError(f"{path}, line {number}: {line!r}; expected '<video>.avi 1' or '<video>.avi 2'")
            if fields[1] == flag:
                videos.append(fields[0][: -len(".avi")])
        return videos

    def frame_paths(self, action: str, video: str) -> list[Path]:
        return _sequence_files(self.frame_root / action / video, ".png", f"the frames of JHMDB {action}/{video}")

    def read_frames(self, action: str, video: str) -> np.ndarray:
        """(T, H, W, 3) uint8."""
        return _stack_frames(self.frame_paths(action, video))

    def joints(self, action: str, video: str) -> np.ndarray:
        """(T, 15, 2) float64 (x, y) in 0-based pixels; T is the annotation's, which may be < frames."""
        path = _require_file(self.joint_root / action / video / "joint_positions.mat", "JHMDB joint positions")
        try:
            mat = scipy.io.loadmat(path)
        except (ValueError, NotImplementedError, OSError) as err:
            raise DatasetError(f"{path}: unreadable MATLAB file ({err})") from err
        if "pos_img" not in mat:
            raise DatasetError(f"{path}: no 'pos_img' variable; expected 2 x 15 x T image coordinates")
        pos_img = np.asarray(mat["pos_img"], dtype=np.float64)
        if pos_img.ndim != 3 or pos_img.shape[:2] != (2, self.NUM_JOINTS):
            raise DatasetError(f"{path}: 'pos_img' has shape {pos_img.shape}; expected (2, 15, T)")
        # MATLAB pixel (1, 1) is the centre of the top-left pixel, i.e. (0, 0) here.
        return pos_img.transpose(2, 1, 0) - 1.0


# --------------------------------------------------------------------------- VIP


class VIP:
    """VIP (Video instance-level Parsing), VIP_Fine: frames and human-part category labels."""

    NUM_CLASSES = VIP_NUM_CLASSES  # the dataset's facts, defined once beside the mIoU that reads them
    IGNORE_INDEX = VIP_IGNORE_LABEL

    def __init__(self, root, split: str = "val"):
        root = _require_dir(Path(root), "a VIP root holding VIP_Fine/ (or VIP_Fine itself)")
        self.root = root / "VIP_Fine" if (root / "VIP_Fine").is_dir() else root
        self.frame_root = _require_dir(self.root / "Images", "VIP_Fine frames")
        self.label_root = _require_dir(self.root / "Annotations" / "Category_ids", "VIP_Fine category labels")
        list_file = self.root / "lists" / f"{split}_videos.txt"
        self.videos: list[str] = _read_list(list_file, f"the VIP {split!r} video list")
        for video in self.videos:
            for folder in (self.frame_root / video, self.label_root / video):
                _require_dir(folder, f"video {video!r} listed in {list_file}")

    def frame_paths(self, video: str) -> list[Path]:
        return _sequence_files(self.frame_root / video, ".jpg", f"the frames of VIP {video}")

    def label_paths(self, video: str) -> dict[int, Path]:
        """Frame index (into `frame_paths`) -> its category label PNG, paired by file stem."""
        index_of_stem = {path.stem: index for index, path in enumerate(self.frame_paths(video))}
        labels = _sequence_files(self.label_root / video, ".png", f"the category labels of VIP {video}")
        pairs = {}
        for label in labels:
            if label.stem not in index_of_stem:
                raise DatasetError(f"{label}: no frame {label.stem}.jpg in {self.frame_root / video}")
            pairs[index_of_stem[label.stem]] = label
        return pairs

    def read_label(self, path) -> np.ndarray:
        """(H, W) uint8 class ids 0..19, 255 = ignore (as VFS's mIoU)."""
        label = read_mask(path)
        bad = np.setdiff1d(np.unique(label), [*range(self.NUM_CLASSES), self.IGNORE_INDEX])
        if bad.size:
            raise DatasetError(f"{path}: class ids {bad.tolist()}; expected 0..{self.NUM_CLASSES - 1} or 255")
        return label
