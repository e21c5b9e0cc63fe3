"""The workflow configuration: validation against the JSON schema, and the nights it names."""

from __future__ import annotations

import glob
import re
import tempfile
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from .errors import NightstackError
from .loading import is_image_file

CALIBRATION_KINDS = ("bias", "dark", "flat", "darkflat")
# folder names accepted for each kind (the first is the documented one)
KIND_FOLDERS = {
    "light": ("lights", "light"),
    "bias": ("biases", "bias", "offsets", "offset"),
    "dark": ("darks", "dark"),
    "flat": ("flats", "flat"),
    "darkflat": ("darkflats", "darkflat", "flatdarks", "flatdark", "dark_flats"),
}


def schema() -> dict:
    text = resources.files("nightstack").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def validate(config: dict) -> None:
    """Raise NightstackError with one readable line for the first problem in ``config``."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(map(str, e.path))))
    if not errors:
        return
    err = errors[0]
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        message = f"unknown key {', '.join(map(repr, extra))}; allowed here: {', '.join(allowed)}"
    elif err.validator == "enum":
        message = f"{err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
    elif err.validator == "type":
        message = f"{err.instance!r} should be of type {err.validator_value}"
    elif err.validator == "oneOf" and where == "nights":
        message = "give a folder, a glob, a list of folders, or a mapping name -> folder"
    else:
        message = err.message
    raise NightstackError(f"config error at '{where}': {message}")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "night"


def _expand(entry: str, base: Path) -> list[Path]:
    path = Path(entry).expanduser()
    if not path.is_absolute():
        path = base / path
    if glob.has_magic(entry):
        hits = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_dir())
        if not hits:
            raise NightstackError(f"nights: the glob '{entry}' matches no folder")
        return hits
    return [path]


def resolve_nights(nights, base_dir=".") -> dict[str, Path]:
    """Map night names to folders from the ``nights`` config value (string, list or mapping)."""
    base = Path(base_dir)
    out: dict[str, Path] = {}
    if isinstance(nights, dict):
        for name, entry in nights.items():
            paths = _expand(str(entry), base)
            if len(paths) != 1:
                raise NightstackError(f"nights: '{name}' must name one folder, the glob matches {len(paths)}")
            out[str(name)] = paths[0]
        return out
    entries = [nights] if isinstance(nights, str) else list(nights)
    for entry in entries:
        for path in _expand(str(entry), base):
            name = _safe_name(path.resolve().name)
            if name in out and out[name] != path:
                raise NightstackError(
                    f"nights: two folders are both called '{name}' ({out[name]} and {path}); "
                    "use a mapping name -> folder to tell them apart"
                )
            out[name] = path
    return out


def _kind_folder(night: Path, kind: str) -> Path | None:
    for name in KIND_FOLDERS[kind]:
        for cand in (night / name, night / name.upper(), night / name.capitalize()):
            if cand.is_dir():
                return cand
    return None


def list_images(folder: Path) -> list[Path]:
    return _split_folder(folder)[0]


def _split_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) of a folder, sorted; hidden files are neither. A broken link
    counts as an image, so the frame is rejected with a reason instead of vanishing."""
    images, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if is_image_file(p) and (p.is_file() or (p.is_symlink() and not p.exists())):
            images.append(p)
        elif not is_image_file(p) and p.is_file():
            others.append(p)
    return images, others


def inventory(night: Path) -> dict[str, list[Path]]:
    """Files of a night by kind: 'light', 'bias', 'dark', 'flat', 'darkflat'; and under
    'ignored' the files beside the lights that nightstack does not read (notes, sidecars)."""
    night = Path(night)
    if not night.is_dir():
        raise NightstackError(f"night folder {night} does not exist")
    lights, ignored = _split_folder(_kind_folder(night, "light") or night)
    found = {"light": lights, "ignored": ignored}
    for kind in CALIBRATION_KINDS:
        folder = _kind_folder(night, kind)
        found[kind] = list_images(folder) if folder else []
    return found


def check_results_writable(results) -> None:
    """NightstackError naming the results folder when it cannot be created or written."""
    folder = Path(results)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nightstack-write-test-"):
            pass
    except OSError as exc:
        raise NightstackError(
            f"results folder {folder} is not writable ({exc.strerror or exc})"
        ) from None


def frame_ids(paths) -> dict[str, Path]:
    """Stable, file-system-friendly ids for frames (spaces and non-ASCII replaced), unique."""
    ids: dict[str, Path] = {}
    for path in paths:
        stem = Path(path).name
        for suffix in (".gz", ".bz2", ".fz"):
            stem = stem.removesuffix(suffix)
        base = _safe_name(Path(stem).stem)
        name, n = base, 2
        while name in ids:
            name, n = f"{base}_{n}", n + 1
        ids[name] = Path(path)
    return ids


def demo_inventory(folder, demo_cfg) -> dict[str, list[Path]]:
    """The files the demo generator will write into ``folder``, by kind (before they exist)."""
    from .demo import calibration_names, frame_suffix, light_names

    folder = Path(folder)
    counts = {"bias": demo_cfg.n_biases, "dark": demo_cfg.n_darks, "flat": demo_cfg.n_flats, "darkflat": 0}
    found = {"light": [folder / "lights" / n for n in light_names(demo_cfg)]}
    for kind in CALIBRATION_KINDS:
        found[kind] = [folder / KIND_FOLDERS[kind][0] / n for n in calibration_names(kind, counts[kind], frame_suffix(demo_cfg))]
    return found


COMBINED_NAME = "combined"  # results/combined/ holds the nights combined


def check_combine(config: dict, nights) -> None:
    """NightstackError when several nights cannot be combined as configured: a night called
    'combined' (its results would collide) or a reference night that is not listed."""
    if len(nights) < 2:
        return
    if COMBINED_NAME in nights:
        raise NightstackError(
            f"nights: a night called '{COMBINED_NAME}' would share results/{COMBINED_NAME}/ "
            "with the combined image; name it otherwise (mapping name -> folder)"
        )
    reference = str(config.get("combine", {}).get("reference", "auto"))
    if reference != "auto" and reference not in nights:
        raise NightstackError(
            f"combine: reference night '{reference}' is not one of the nights "
            f"({', '.join(nights)})"
        )
