"""One function per workflow stage: files in, artifact out.

The Snakemake scripts in scripts/ only unpack ``snakemake.input/params/output`` and call
these; everything here is plain Python, so a stage can be run and tested without Snakemake.
A frame that cannot be used is never an exception here: its artifact records
``status: rejected`` and the reason, and the next stages carry that forward.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .background import background_config_from_dict, remove_background
from .calibration import (
    DiskFrame,
    calibrate_mosaic,
    demosaic_frame,
    make_master,
    master_from_fits,
    with_pixel_masks,
    write_master,
)
from .camera import Camera, default_focal_px
from .errors import FrameError, NightstackError
from .io import (
    CALIBRATED_FORMATS,
    atomic_path,
    dither_seed,
    header_text,
    header_text_decoded,
    image_hdu,
    read_catalog,
    read_fits_image,
    read_json,
    write_catalog,
    write_fits_image,
    write_json,
)
from .landscape import (
    bin_mean,
    frame_sky,
    horizon_sky_mask,
    landscape_config_from_dict,
    mask_frame_indices,
    read_mask_image,
    sky_mask_bin_factor,
    sky_mask_from_frames,
    sky_model_only,
    star_search_mask,
)
from .loading import load_frame
from .logs import Progress, log
from .stars import detect_stars_presmoothed, luminance, star_config_from_dict

# Registration (scipy.optimize, scipy.sparse) and astropy.table are imported inside the steps
# that use them: every job is a new process, and a calibrate job then starts 0.25 s sooner.
if TYPE_CHECKING:
    from .registration import Pose, RegistrationConfig

SOFTWARE = f"nightstack {__version__}"
LP_MODEL_HDU = "LPMODEL"
SKY_FRACTION_HDU = "SKYFRAC"


# --------------------------------------------------------------------------- masters


def master_step(kind: str, paths, output, params: dict, bias=None, dark=None) -> None:
    """Combine calibration frames of one kind into a float32 master FITS."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    # each frame is parked on disk as it is loaded (calibration.DiskFrame): memory stays that
    # of one frame and a band, whatever the number of calibration frames
    with tempfile.TemporaryDirectory(dir=Path(output).parent, prefix=".scratch-") as scratch:
        frames, skipped = [], []
        progress = Progress(f"loading {kind} frames", len(paths))
        for path in paths:
            try:
                frame = load_frame(path)
            except FrameError as exc:
                skipped.append(exc)
                log.warning("skipping %s frame %s", kind, exc)
            else:
                frame.data = DiskFrame(frame.data, scratch)
                frames.append(frame)
            progress()
        if not frames:
            reasons = "; ".join(str(e) for e in skipped) or "no files"
            raise NightstackError(f"no usable {kind} frame ({reasons})")
        frames = _majority_geometry(frames, kind)
        bias_m = master_from_fits(bias) if bias else None
        dark_m = master_from_fits(dark) if dark else None
        master = with_pixel_masks(make_master(frames, kind, bias=bias_m, dark=dark_m), bias_m,
                                  params)
    write_master(output, master)
    log.info("master %s from %d frames written to %s", kind, master.n_frames, output)


def _majority_geometry(frames: list, kind: str) -> list:
    """The frames sharing the most common size and CFA pattern; the others are dropped with a
    warning naming each (a stray frame from another camera must not stop the master)."""
    def geometry(frame):
        return tuple(frame.data.shape), frame.cfa_pattern

    counts = Counter(geometry(f) for f in frames)
    (shape, pattern), _ = counts.most_common(1)[0]
    kept = [f for f in frames if geometry(f) == (shape, pattern)]
    size = "x".join(str(v) for v in shape[::-1])
    for frame in frames:
        if geometry(frame) != (shape, pattern):
            other = "x".join(str(v) for v in frame.data.shape[::-1])
            log.warning(
                "skipping %s frame %s: %s px, CFA %s, but the other %d %s frames are %s px, CFA %s",
                kind, Path(frame.source).name, other, frame.cfa_pattern or "none", len(kept), kind,
                size, pattern or "none",
            )
    return kept


# --------------------------------------------------------------------------- calibrate


def file_sha256(path, chunk_bytes: int = 8 << 20) -> str:
    """Hex SHA-256 of a file's bytes (duplicate frames are found by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rejected_header(source: str, reason: str):
    """Header of the empty FITS that stands for a rejected frame (reason kept whole)."""
    from astropy.io import fits

    hdr = fits.Header()
    hdr["NSSTATUS"] = "rejected"
    hdr["SOURCE"] = header_text(source)
    hdr["SOFTWARE"] = SOFTWARE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long strings: CONTINUE cards
        hdr["NSREASON"] = header_text(reason)
    return hdr


def _long_reason(header) -> str:
    return header_text_decoded(header.get("NSREASON", "rejected"))


def _source(header, default) -> str:
    return header_text_decoded(header["SOURCE"]) if "SOURCE" in header else str(default)


def calibrate_step(light, output, masters: dict, calib_params: dict, background_params: dict,
                   landscape_params: dict | None = None, frame_format: str = "compressed") -> None:
    """Calibrate one light (raw mosaic), demosaic, remove the sky gradient, write the FITS.

    landscape_params: config ``landscape``; the gradient is fitted on the frame's sky only
    (nightstack.landscape.frame_ground), its ground fraction goes in card GNDFRAC.
    ``frame_format``: "float32" (plain primary image) or "compressed" (tile-compressed,
    quantised to 1/16 of the noise: io.compressed_image_hdu), as config output.calibrated_frames.
    """
    if frame_format not in CALIBRATED_FORMATS:
        raise NightstackError(f"output.calibrated_frames must be one of {', '.join(CALIBRATED_FORMATS)}, "
                              f"got {frame_format!r}")
    source = Path(light).name
    try:
        raw = load_frame(light)
        loaded = {k: master_from_fits(p) for k, p in masters.items() if p}
        mosaic = calibrate_mosaic(raw, loaded.get("bias"), loaded.get("dark"), loaded.get("flat"),
                                  calib_params)  # fmt: skip
    except FrameError as exc:
        log.warning("rejected %s: %s", source, exc.reason)
        write_fits_image(output, None, rejected_header(source, exc.reason))
        return
    del raw, loaded  # freed before demosaicing: the raw frame and the masters are 400 MB at 24 MP
    cal = demosaic_frame(mosaic)
    del mosaic
    data = cal.data
    header = {
        "NSSTATUS": "ok",
        "SOURCE": header_text(source),
        "NSSHA256": file_sha256(light),
        "SOFTWARE": SOFTWARE,
        "BUNIT": "ADU",
    }
    meta_keys = {
        "exptime_s": "EXPTIME",
        "date_obs": "DATE-OBS",
        "instrument": "INSTRUME",
        "gain": "GAIN",
        "iso": "ISOSPEED",
        "cfa_pattern": "BAYERPAT",
        "focal_mm": "FOCALLEN",
        "pixel_um": "XPIXSZ",
    }
    for key, card in meta_keys.items():
        value = cal.meta.get(key)
        if value is not None and value != "":
            header[card] = header_text(value) if isinstance(value, str) else value
    extra = []
    if background_params.get("before_stars", True):
        from .outputs import bin_image, bin_model

        try:
            found = frame_sky(luminance(data), landscape_config_from_dict(landscape_params))
        except NightstackError as exc:  # a mask of another size: the sky_mask rule stops on it
            log.warning("%s: %s; its light pollution is fitted over the whole frame", source, exc)
            found = None
        header["GNDFRAC"] = 0.0 if found is None else round(float(1 - found[0].mean()), 6)
        bg_cfg = background_config_from_dict(_bg_only(background_params))
        if found is None:  # the model binned channel by channel: no full-size copy
            data, binned = remove_background(data, bg_cfg, in_place=True, model_reducer=bin_model)
        else:  # fitted on the sky, applied to the sky only
            channels = data if data.ndim == 3 else data[None]
            _, model = remove_background(channels, bg_cfg, not_sky=~found[0])
            model = sky_model_only(model, found[1])
            level = np.median(model.reshape(len(model), -1), axis=1)[:, None, None]
            data = (channels - model + level).astype(np.float32).reshape(data.shape)
            binned = bin_image(model.reshape(data.shape))[0]
            del model
            cal.notes.append(f"ground ({100 * (1 - found[0].mean()):.1f} %) kept out of the gradient")
        cal.notes.append("light-pollution gradient removed")
        extra.append(light_pollution_hdu(binned, data.shape[-2:]))
    from astropy.io import fits

    hdr = fits.Header()
    for k, v in header.items():
        hdr[k] = v
    for note in cal.notes:
        hdr.add_history(note)
    write_fits_image(output, data, hdr, extra_hdus=extra, compress=frame_format == "compressed",
                     seed=dither_seed(source))
    log.info("calibrated %s: %s", source, "; ".join(cal.notes) or "no calibration frames")


def light_pollution_hdu(binned, frame_shape):
    """The frame's light-pollution model (ADU), binned small (outputs.bin_model) from a frame
    of ``frame_shape`` (H, W), as the LPMODEL extension: the report shows the night's real
    glow from it (the stack's own model is only what is left)."""
    from astropy.io import fits

    from .outputs import bin_factor

    height, width = (int(v) for v in frame_shape)
    hdu = fits.ImageHDU(np.asarray(binned, np.float32), name=LP_MODEL_HDU)
    hdu.header["BUNIT"] = "adu"
    hdu.header["BINFACT"] = (bin_factor(height, width), "frame pixels per model pixel, each axis")
    hdu.header["STACKW"] = (width, "frame width (px)")
    hdu.header["STACKH"] = (height, "frame height (px)")
    hdu.header["BGREMOVD"] = (True, "model subtracted before star detection")
    return hdu


def _bg_only(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("before_stars", "after_stack")}


# --------------------------------------------------------------------------- stars


def channel_levels(data: np.ndarray, step: int = 4, sky=None):
    """Per-channel sky level and noise (ADU) of a (C, H, W) image, from a subsample.

    sky: optional (H, W) bool, True = sky; the ground of a landscape night is left out.
    """
    sub = np.asarray(data[:, ::step, ::step], dtype=np.float32)
    if sky is not None and not sky.all():
        sub = np.where(sky[::step, ::step][None], sub, np.nan)
    med = np.nanmedian(sub.reshape(sub.shape[0], -1), axis=1)
    mad = np.nanmedian(np.abs(sub.reshape(sub.shape[0], -1) - med[:, None]), axis=1)
    # the subsample skips pixels, so neighbour correlation from demosaicing is mostly avoided
    return med, 1.4826 * mad


def stars_step(calibrated, output, star_params: dict, sky_mask=None) -> None:
    """Detect stars in a calibrated frame and write the catalog (ECSV) with frame statistics.

    sky_mask: optional path of the night's sky_mask.fits; stars are sought in the sky only
    (nightstack.landscape.star_search_mask) and the sky level and noise come from the sky.
    """
    data, header = read_fits_image(calibrated)
    if data is not None:  # big-endian float32 mapped from disk: native in one pass (not two)
        data = np.asarray(data, dtype=np.float32)
    source = _source(header, Path(calibrated).name)
    if header.get("NSSTATUS") != "ok" or data is None:
        from astropy.table import Table

        table = Table(names=["x", "y", "flux", "fwhm_px", "ellipticity", "snr", "peak"])
        table.meta.update(status="rejected", reason=_long_reason(header), source=source)
        write_catalog(output, table)
        return
    params = dict(star_params)
    cfa_presmooth = float(params.pop("cfa_presmooth_px", 1.0))
    cfg = star_config_from_dict(params)
    presmooth = cfa_presmooth if header.get("BAYERPAT") else 0.0
    sky = _frame_sky(sky_mask, data.shape[-2:], source)
    search = None if sky is None else star_search_mask(sky)
    table = detect_stars_presmoothed(data, cfg, presmooth, mask=search)
    bg, noise = channel_levels(data if data.ndim == 3 else data[None], sky=sky)
    table.meta.update(
        status="ok",
        source=source,
        width_px=int(data.shape[-1]),
        height_px=int(data.shape[-2]),
        n_channels=int(data.shape[0]) if data.ndim == 3 else 1,
        exptime_s=header.get("EXPTIME"),
        date_obs=header_text_decoded(header["DATE-OBS"]) if "DATE-OBS" in header else None,
        focal_mm=header.get("FOCALLEN"),
        pixel_um=header.get("XPIXSZ"),
        instrument=header_text_decoded(header["INSTRUME"]) if "INSTRUME" in header else None,
        sha256=header.get("NSSHA256"),
        channel_background=[float(v) for v in bg],
        channel_noise=[float(v) for v in noise],
    )
    if len(table) < 3:
        table.meta.update(status="rejected", reason=f"only {len(table)} stars detected")
    write_catalog(output, table)
    log.info("%s: %d stars, median FWHM %.2f px", source, len(table), table.meta.get("fwhm_px_median", float("nan")))


def _frame_sky(sky_mask, shape, source):
    """The night's sky mask (H, W) bool for a frame of ``shape``, or None (no mask, all sky, or
    a frame of another size: that is said in the log)."""
    if not sky_mask:
        return None
    sky = read_sky_mask(sky_mask)
    if sky.shape != tuple(shape):
        log.warning("%s: %s px, but the sky mask is %s px: the whole frame is searched", source,
                    "x".join(map(str, shape[::-1])), "x".join(map(str, sky.shape[::-1])))
        return None
    return None if sky.all() else sky


# --------------------------------------------------------------------------- sky mask


def sky_mask_step(night: str, calibrated: list, output, landscape_params: dict) -> None:
    """Write the night's sky mask (uint8, 1 = sky, on the lights' pixel grid; see
    nightstack.landscape) from config ``landscape``."""
    from astropy.io import fits

    cfg = landscape_config_from_dict(landscape_params)
    usable, reasons = [], []
    for path in calibrated:
        with fits.open(path) as hdul:  # the image is the primary or a compressed extension
            hdr, image_shape = hdul[0].header, image_hdu(hdul).shape
        if hdr.get("NSSTATUS") == "ok" and len(image_shape) >= 2:
            usable.append((path, tuple(int(v) for v in image_shape[-2:])))
        else:
            reasons.append(f"{_source(hdr, Path(path).name)}: {_long_reason(hdr)}")
    if not usable:  # said as the reference step would say it, frame by frame
        raise NightstackError(f"night '{night}' has no usable frame ({'; '.join(reasons)})")
    shape = Counter(s for _, s in usable).most_common(1)[0][0]
    info = {}
    if cfg.ground == "none":
        sky, source = np.ones(shape, dtype=bool), "none"
    elif cfg.ground == "horizon":
        sky, source = horizon_sky_mask(*shape, cfg.horizon_fraction), f"horizon {cfg.horizon_fraction:g}"
    elif cfg.ground == "auto":
        paths = [p for p, s in usable if s == shape]
        paths = [paths[i] for i in mask_frame_indices(len(paths))]
        factor = sky_mask_bin_factor(*shape)
        sky, info = sky_mask_from_frames(*_luminances_and_models(paths, factor))
        if factor > 1 and sky.all():  # no ground even binned: the common deep-sky night
            sky, info = np.ones(shape, dtype=bool), {**info, "binned_px": factor}
        elif factor > 1:  # ground: traced to the pixel at full resolution
            sky, info = sky_mask_from_frames(*_luminances_and_models(paths))
        source = "auto"
    else:
        sky, source = read_mask_image(cfg.ground, *shape), f"file {Path(cfg.ground).name}"
    write_sky_mask(output, sky, source, info)
    why = f" ({info['reason']})" if info.get("reason") else ""
    log.info("night %s: sky mask from %s, ground %.1f %% of the frame%s", night, source,
             100 * (1 - sky.mean()), why)


def _luminances_and_models(paths, bin_px: int = 1):
    """Luminance (H, W) of each calibrated frame, block-averaged by ``bin_px``, and its
    (binned LPMODEL luminance, factor, bin_px) for restore_light_pollution."""
    from astropy.io import fits

    lums, models = [], []
    for path in paths:
        with fits.open(path, memmap=True) as hdul:
            lum = luminance(image_hdu(hdul).data)
            lums.append(bin_mean(lum, bin_px) if bin_px > 1 else lum)
            model = None
            if LP_MODEL_HDU in hdul:
                hdu = hdul[LP_MODEL_HDU]
                model = (luminance(hdu.data), int(hdu.header.get("BINFACT", 1)), bin_px)
            models.append(model)
    return lums, models


def write_sky_mask(path, sky: np.ndarray, source: str, info: dict | None = None) -> None:
    """sky_mask.fits: uint8 (H, W), 1 = sky, 0 = ground; cards NSMASK (where it came from),
    GNDFRAC (ground fraction of the frame) and, for auto masks, the figures it was judged by;
    an auto mask with ground also holds the SKYFRAC extension (float32 sky share per pixel)."""
    from astropy.io import fits

    info = info or {}
    hdr = fits.Header()
    hdr["NSMASK"] = (header_text(source), "source of the sky mask")
    hdr["GNDFRAC"] = (round(float(1 - np.mean(sky)), 6), "fraction of the frame that is ground")
    hdr["SKYVALUE"] = (1, "pixel value of the sky (ground = 0)")
    hdr["SOFTWARE"] = SOFTWARE
    if info.get("contrast_sigma") is not None:
        hdr["CONTRAST"] = (round(float(info["contrast_sigma"]), 3), "sky - ground level, noise sigmas")
    if info.get("edge_width_px") is not None and np.isfinite(info["edge_width_px"]):
        hdr["EDGEWID"] = (round(float(info["edge_width_px"]), 3), "contrast / boundary gradient (px)")
    if info.get("n_frames"):
        hdr["NFRAMES"] = (int(info["n_frames"]), "frames in the time-median")
    if info.get("reason"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdr["NSREASON"] = header_text(info["reason"])
    hdus = [fits.PrimaryHDU(np.asarray(sky, dtype=np.uint8), header=hdr)]
    if info.get("sky_fraction") is not None and not np.all(sky):
        frac = fits.ImageHDU(np.asarray(info["sky_fraction"], dtype=np.float32), name=SKY_FRACTION_HDU)
        frac.header["COMMENT"] = "share of each pixel's light that is sky (silhouette pixels: between)"
        hdus.append(frac)
    with atomic_path(path, ".fits") as tmp:
        fits.HDUList(hdus).writeto(tmp)


def read_sky_mask(path) -> np.ndarray:
    """Sky mask (H, W) bool (True = sky) from sky_mask.fits."""
    data, _ = read_fits_image(path, memmap=False)
    if data is None or data.ndim != 2:
        raise NightstackError(f"sky mask {path}: expected a 2D image")
    return np.asarray(data) > 0


def read_sky_fraction(path):
    """The SKYFRAC map (H, W) float32 of sky_mask.fits, or None (not an auto mask)."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        return np.asarray(hdul[SKY_FRACTION_HDU].data, np.float32) if SKY_FRACTION_HDU in hdul else None


# --------------------------------------------------------------------------- reference


def _consensus(candidates: list, tables: dict, n_probe: int = 8) -> dict:
    """For each candidate reference, how many of up to n_probe other frames its stars match.

    A sharp frame of another field (or a mirrored one) must not become the reference: the
    reference is the candidate that the rest of the night agrees with.
    """
    from .matching import match_coarse
    from .registration import StarList

    others = list(tables)
    scores = {}
    for cand in candidates:
        pool = [f for f in others if f != cand]
        probe = [pool[i] for i in np.linspace(0, len(pool) - 1, min(n_probe, len(pool))).astype(int)] if pool else []
        ref_xy = StarList.from_table(tables[cand], min_snr=15.0).xy
        hits = 0
        for f in probe:
            m = match_coarse(StarList.from_table(tables[f], min_snr=15.0).xy, ref_xy)
            hits += m is not None
        scores[cand] = hits
    return scores


def reference_step(night: str, catalogs: dict, output, reference: str = "auto") -> None:
    """Choose the reference frame and write reference.json."""
    tables = {fid: read_catalog(p) for fid, p in catalogs.items()}
    metas = {fid: t.meta for fid, t in tables.items()}
    usable = {fid: m for fid, m in metas.items() if m.get("status") == "ok"}
    if not usable:
        reasons = "; ".join(f"{m.get('source', fid)}: {m.get('reason')}" for fid, m in metas.items())
        raise NightstackError(f"night '{night}' has no usable frame ({reasons})")
    if reference != "auto":
        match = [fid for fid, m in usable.items() if m.get("source") == reference or fid == reference]
        if not match:
            raise NightstackError(f"night '{night}': reference '{reference}' is not a usable light of this night")
        chosen = match[0]
    else:
        sizes = Counter((m["width_px"], m["height_px"]) for m in usable.values())
        size = sizes.most_common(1)[0][0]
        same = {f: m for f, m in usable.items() if (m["width_px"], m["height_px"]) == size}
        # the stack lives on the reference's pixel grid, so it should be one of the sharpest
        # frames (others are resampled, which softens undersampled stars a little); candidates
        # are frames with at least half the best star count, sharpest first
        counts = np.array([m.get("n_stars", 0) for m in same.values()], float)
        fwhm = np.array([m.get("fwhm_px_median") or np.inf for m in same.values()], float)
        fwhm[counts < 0.5 * counts.max()] = np.inf
        order = [list(same)[i] for i in np.argsort(fwhm, kind="stable")]
        # the sharpest few are candidates; the one most other frames match wins, then sharpness
        candidates = order[:5]
        agree = _consensus(candidates, {f: tables[f] for f in same})
        best = max(agree.values())
        chosen = next(f for f in candidates if agree[f] == best)
    meta = usable[chosen]
    write_json(output, {"night": night, "frame": chosen, "source": meta.get("source"), "catalog": str(catalogs[chosen])})
    log.info("reference of night %s: %s", night, meta.get("source"))


def reference_camera(meta: dict, reg_params: dict) -> Camera:
    """The reference camera: size from the catalog, focal length from config, header or a guess."""
    focal_mm = reg_params.get("focal_mm") or meta.get("focal_mm")
    pixel_um = reg_params.get("pixel_um") or meta.get("pixel_um")
    w, h = int(meta["width_px"]), int(meta["height_px"])
    return Camera(w, h, default_focal_px(w, h, focal_mm, pixel_um))


def registration_config(reg_params: dict) -> RegistrationConfig:
    from .registration import RegistrationConfig

    dist = reg_params.get("distortion", "auto")
    dist = {True: "on", False: "off"}.get(dist, dist)
    keys = ("min_pairs", "max_rms_px", "per_frame_focal", "min_snr")
    return RegistrationConfig(distortion=dist, **{k: reg_params[k] for k in keys if k in reg_params})


# --------------------------------------------------------------------------- pose


def _pose_record(frame: str, source: str, pose: Pose, ref_cam: Camera, h=None) -> dict:
    rec = {"frame": frame, "file": source, "status": pose.status, "reason": pose.reason,
           "pairs_matched": pose.n_pairs, "residual_rms_px": _num(pose.rms_px)}
    if pose.status == "accepted":
        focal = ref_cam.focal_px * pose.zoom
        rec.update(
            rotation=pose.rotation().tolist(), rotvec=pose.rotvec.tolist(), zoom=pose.zoom,
            focal_px=focal, flux_scale=pose.flux_scale,
            H=(h if h is not None else _h(ref_cam, pose)).tolist(),
            pairs=pose.pairs.tolist(),
        )
    return rec


def _h(ref_cam, pose):
    from .camera import homography

    return homography(ref_cam, ref_cam.with_focal(ref_cam.focal_px * pose.zoom), pose.rotation())


def _num(x):
    return None if x is None or not np.isfinite(x) else float(x)


def other_camera(meta: dict, ref_meta: dict) -> str:
    """Why a frame from another camera than the reference's is rejected ('' if the same or
    unknown): one night is one camera, other cameras' frames belong in their own night."""
    mine, theirs = meta.get("instrument"), ref_meta.get("instrument")
    if not mine or not theirs or mine.strip() == theirs.strip():
        return ""
    return (f"taken with camera '{mine.strip()}' but the reference with '{theirs.strip()}' "
            "(one camera per night: put this camera's frames in a night of their own)")


def size_mismatch(meta: dict, ref_cam: Camera) -> str:
    """Why a frame of another size or orientation than the reference is rejected."""
    size = (meta["width_px"], meta["height_px"])
    text = f"frame is {size[0]}x{size[1]} px but the reference is {ref_cam.width_px}x{ref_cam.height_px} px"
    if size == (ref_cam.height_px, ref_cam.width_px):
        shape = "portrait" if size[1] > size[0] else "landscape"
        text += f" (a {shape} frame: the camera was turned by a quarter turn)"
    return text


def pose_step(frame: str, catalog, reference_json, output, reg_params: dict) -> None:
    """Register one frame's stars on the reference's; write the pose JSON."""
    from .registration import Pose, StarList, estimate_pose

    ref_info = read_json(reference_json)
    table = read_catalog(catalog)
    meta = table.meta
    source = meta.get("source", frame)
    ref_table = read_catalog(ref_info["catalog"])
    ref_cam = reference_camera(ref_table.meta, reg_params)
    cfg = registration_config(reg_params)
    if meta.get("status") != "ok":
        pose = Pose(status="rejected", reason=meta.get("reason", "rejected"))
    elif camera_reason := other_camera(meta, ref_table.meta):
        pose = Pose(status="rejected", reason=camera_reason)
    elif (meta["width_px"], meta["height_px"]) != (ref_cam.width_px, ref_cam.height_px):
        pose = Pose(status="rejected", reason=size_mismatch(meta, ref_cam))
    elif frame == ref_info["frame"]:
        n_ref = len(StarList.from_table(table, min_snr=cfg.min_snr).xy)
        pose = Pose(status="accepted", n_pairs=n_ref, rms_px=0.0,
                    pairs=np.column_stack([np.arange(n_ref)] * 2))
    else:
        pose = estimate_pose(StarList.from_table(table, min_snr=cfg.min_snr), StarList.from_table(ref_table, min_snr=cfg.min_snr), ref_cam, cfg)
        if pose.status != "accepted":
            # say what the frame's stars looked like: trailed or blurred stars explain most failures
            pose.reason += (
                f" ({len(table)} stars, median FWHM {meta.get('fwhm_px_median', float('nan')):.1f} px,"
                f" median ellipticity {meta.get('ellipticity_median', float('nan')):.2f})"
            )
    write_json(output, _pose_record(frame, source, pose, ref_cam))
    log.info("%s: %s %s (%d pairs, RMS %s px)", source, pose.status, pose.reason, pose.n_pairs, _num(pose.rms_px))


# --------------------------------------------------------------------------- solve


def _pose_from_record(rec: dict) -> Pose:
    from .registration import Pose

    if rec["status"] != "accepted":
        return Pose(status="rejected", reason=rec.get("reason", ""))
    return Pose(status="accepted", rotvec=np.asarray(rec["rotvec"], float), zoom=float(rec["zoom"]),
                n_pairs=int(rec["pairs_matched"]), rms_px=float(rec["residual_rms_px"] or 0.0),
                pairs=np.asarray(rec["pairs"], int).reshape(-1, 2), flux_scale=float(rec["flux_scale"]))


def solve_step(night: str, frames: list, catalogs: dict, poses: dict, reference_json, output,
               reg_params: dict, quality_params: dict | None = None) -> None:
    """Global bundle adjustment of a night; writes solution.json listing every frame."""
    from .registration import Pose, StarList, solve_night

    ref_info = read_json(reference_json)
    ref_id = ref_info["frame"]
    cfg = registration_config(reg_params)
    # each catalog is reduced to its registration stars and kept metadata as it is read: the
    # tables themselves (0.4 GB for 500 x 5,000 stars) are not needed after that
    metas, n_stars, star_lists = {}, {}, {}
    for f in frames:
        table = read_catalog(catalogs[f])
        metas[f], n_stars[f] = table.meta, len(table)
        star_lists[f] = StarList.from_table(table, min_snr=cfg.min_snr)
    records = {f: read_json(poses[f]) for f in frames}
    ref_cam = reference_camera(metas[ref_id], reg_params)
    others = [f for f in frames if f != ref_id]
    pose_list = [_pose_from_record(records[f]) for f in others]
    ref_stars = star_lists.pop(ref_id)
    star_lists = [star_lists[f] for f in others]
    if any(p.status == "accepted" for p in pose_list):
        sol = solve_night(ref_stars, star_lists, pose_list, ref_cam, cfg)
        camera, solved = sol.ref_camera, sol.poses
        frame_rms = dict(zip(others, sol.frame_rms_px))
        bundle = {"n_tracks": sol.n_tracks, "n_observations": sol.n_observations,
                  "rms_centre_px": _num(sol.rms_centre_px), "rms_outer_px": _num(sol.rms_outer_px),
                  "distortion_used": sol.distortion_used}
    else:
        camera, solved, frame_rms, bundle = ref_cam, pose_list, {}, {"n_tracks": 0}
    solved_by_id = dict(zip(others, solved))
    solved_by_id[ref_id] = Pose(status="accepted", n_pairs=n_stars[ref_id], rms_px=0.0)
    frame_records = []
    for f in frames:
        pose = solved_by_id[f]
        rms = frame_rms.get(f, 0.0 if f == ref_id else pose.rms_px)
        if pose.status == "accepted" and f != ref_id and rms is not None and rms > cfg.max_rms_px:
            pose = Pose(status="rejected", reason=f"residual RMS {rms:.2f} px after the global solution exceeds {cfg.max_rms_px} px")
        pose.rms_px = rms if rms is not None else float("nan")
        rec = _pose_record(f, metas[f].get("source", f), pose, camera)
        rec.pop("pairs", None)
        meta = metas[f]
        rec.update(exptime_s=meta.get("exptime_s"), date_obs=meta.get("date_obs"),
                   n_stars=n_stars[f], fwhm_px=_num(meta.get("fwhm_px_median")),
                   reference=(f == ref_id))
        frame_records.append(rec)
    _reject_duplicates(frame_records, metas)
    _judge_quality(frame_records, metas, quality_params)
    accepted = [r for r in frame_records if r["status"] == "accepted"]
    for r in frame_records:
        if r["status"] != "accepted":
            log.warning("night %s: frame %s rejected: %s", night, r["file"], r["reason"])
    write_json(output, {
        "night": night, "software": SOFTWARE, "reference": ref_id,
        "reference_file": ref_info.get("source"),
        "convention": "H maps a reference pixel (x, y, 1) to this frame's pixel; 0-based, x = column",
        "camera": {"width_px": camera.width_px, "height_px": camera.height_px,
                   "focal_px": camera.focal_px, "k1": camera.k1, "k2": camera.k2},
        "bundle": bundle,
        "n_frames": len(frames), "n_accepted": len(accepted),
        "frames": frame_records,
    })
    log.info("night %s: %d of %d frames accepted", night, len(accepted), len(frames))


def _reject_duplicates(records: list, metas: dict) -> None:
    """Reject every copy of a file already in the night (same SHA-256 in its catalog's
    metadata, ``metas``: frame -> meta) but one: the reference if it is among them, else the
    shortest file name (``x (copy).fits`` is the copy of ``x.fits``). A duplicate would count
    one exposure twice."""
    first_by_digest = {}
    ordered = sorted(records, key=lambda r: (not r.get("reference"), len(r["file"]), r["file"]))
    for rec in ordered:
        digest = metas[rec["frame"]].get("sha256")
        if not digest:
            continue
        if digest not in first_by_digest:
            first_by_digest[digest] = rec
            continue
        if rec["status"] == "accepted":
            original = first_by_digest[digest]["file"]
            rec.update(status="rejected", reason=f"duplicate of {original} (identical file content)")
            for key in ("H", "rotation", "rotvec", "zoom", "focal_px", "flux_scale"):
                rec.pop(key, None)


def _judge_quality(records: list, metas: dict, quality_params) -> None:
    """Score every registered frame and reject outliers (robust statistics over the night);
    ``metas``: frame -> its catalog's metadata."""
    from .quality import judge_frames, quality_config_from_dict, score_frames

    cfg = quality_config_from_dict(quality_params or {})
    rows = []
    for rec in records:
        meta = metas[rec["frame"]]
        rec["quality"] = {
            "fwhm_px": rec.get("fwhm_px"),
            "ellipticity": _num(meta.get("ellipticity_median")),
            "n_stars": rec.get("n_stars"),
            "background_adu": _num(float(np.mean(meta["channel_background"]))) if meta.get("channel_background") else None,
            "noise_adu": _num(float(np.mean(meta["channel_noise"]))) if meta.get("channel_noise") else None,
            "residual_rms_px": rec.get("residual_rms_px"),
        }
        if rec["status"] == "accepted":
            rows.append({"frame": rec["frame"], **rec["quality"]})
    verdict = judge_frames(score_frames(rows), cfg) if rows else {}
    for rec in records:
        reason = verdict.get(rec["frame"], "")
        if reason and not rec.get("reference"):
            rec.update(status="rejected", reason=f"quality: {reason}")
            for key in ("H", "rotation", "rotvec", "zoom", "focal_px", "flux_scale"):
                rec.pop(key, None)


# --------------------------------------------------------------------------- stack


def frame_weight(noise_adu, fwhm_px, weighting: str) -> float:
    """Weight of a frame in the final mean (noise already in reference flux units).

    "noise": 1/variance, the least noisy stack. "quality": 1/(variance * FWHM^2), which
    maximises the peak signal-to-noise of stars. "sharpness": 1/FWHM^4 (the squared peak of a
    star of given flux), the sharpest stack: frames of poor seeing or focus count little.
    """
    var = max(float(np.mean(np.square(noise_adu))), 1e-12)
    fwhm_ok = fwhm_px is not None and np.isfinite(fwhm_px) and fwhm_px > 0
    if weighting == "quality" and fwhm_ok:
        return 1.0 / (var * float(fwhm_px) ** 2)
    if weighting == "sharpness" and fwhm_ok:
        return 1.0 / float(fwhm_px) ** 4
    return 1.0 / var


def stack_step(night: str, solution_json, calibrated: dict, catalogs: dict, output, stack_params: dict,
               sky_mask=None, landscape_params: dict | None = None, threads: int = 1) -> None:
    """Reproject every accepted frame into the reference and combine; write the linear stack.

    sky_mask: optional sky_mask.fits of the night; with ground in it, the sky is stacked from
    sky pixels only and the ground frozen (nightstack.landscape), joined over
    ``landscape_params['feather_px']``. threads: with 2 or more the next tile is read while
    one is combined (stacking.stack_frames).

    ``stack_params["framing"]`` (reference | crop | maximize, nightstack.framing) chooses the
    box of reference pixels the stack covers; it is recorded in the FITS header and the info.
    """

    from .framing import framing_cards, output_box
    from .outputs import stack_header, write_stack_fits
    from .stacking import FrameWarp, stack_config_from_dict, stack_frames

    stack_params = dict(stack_params)
    framing = stack_params.pop("framing", "reference")
    sol = read_json(solution_json)
    cam = sol["camera"]
    ref_cam = Camera(cam["width_px"], cam["height_px"], cam["focal_px"], cam["k1"], cam["k2"])
    ref_id = sol["reference"]
    ref_meta = read_catalog(catalogs[ref_id]).meta
    target = np.asarray(ref_meta["channel_background"], float)
    warps, used = [], []
    for rec in sol["frames"]:
        if rec["status"] != "accepted":
            continue
        meta = read_catalog(catalogs[rec["frame"]]).meta
        scale = float(rec.get("flux_scale") or 1.0)
        if not np.isfinite(scale) or scale <= 0:
            scale = 1.0
        noise = np.asarray(meta["channel_noise"], float) / scale
        warps.append(FrameWarp(
            path=str(calibrated[rec["frame"]]),
            ref_camera=ref_cam,
            frame_camera=ref_cam.with_focal(rec["focal_px"]) if rec["frame"] != ref_id else ref_cam,
            rotation=np.asarray(rec["rotation"], float) if rec["frame"] != ref_id else np.eye(3),
            offset=np.asarray(meta["channel_background"], float),
            scale=np.full(len(target), scale),
            target_level=target,
            weight=frame_weight(noise, meta.get("fwhm_px_median"), stack_params.get("weighting", "none")),
            date_obs=rec.get("date_obs"),
        ))
        used.append(rec)
    cfg = stack_config_from_dict(stack_params)
    n_channels = int(ref_meta.get("n_channels", len(target)))
    box, framing_info = output_box(framing, warps, ref_cam.width_px, ref_cam.height_px)
    out_shape = (n_channels, box.height_px, box.width_px)
    framed = framing != "reference"
    landscape = _landscape_stack(sky_mask, landscape_params, str(calibrated[ref_id]))
    log.info("stacking night %s: %d frames", night, len(warps))
    progress = Progress(f"stacking night {night}, tiles", 1)
    image, coverage, info = stack_frames(
        warps, out_shape, cfg, progress=progress, origin_px=(box.x0_px, box.y0_px) if framed else None,
        fill_value=np.nan if framed else 0.0, landscape=landscape, threads=threads)
    if landscape is not None:
        info["landscape"] = {"ground_fraction": float(1 - landscape.sky.mean()),
                             "feather_px": landscape.feather_px, "frozen_pose": ref_id}
    info["framing"] = {**box.as_dict(), **framing_info,
                       "convention": "stack pixel (row i, column j) is reference pixel "
                                     "(x0_px + j, y0_px + i); 0-based"}
    exptimes = [r.get("exptime_s") for r in used if r.get("exptime_s")]
    dates = sorted(r["date_obs"] for r in used if r.get("date_obs"))
    hdr = stack_header({
        "software_version": SOFTWARE, "n_frames": len(used), "frames": [r["file"] for r in used],
        "total_exptime_s": float(np.sum(exptimes)) if exptimes else None,
        "date_obs_start": dates[0] if dates else None, "date_obs_end": dates[-1] if dates else None,
        "method": cfg.method, "night": night, "reference": sol.get("reference_file") or ref_id,
    })
    hdr.extend(framing_cards(box))
    write_stack_fits(output, image, hdr, coverage=coverage)
    write_json(Path(output).with_suffix(".json"), {"frames": [r["file"] for r in used], "info": info})
    log.info("night %s: stacked %d frames (%s)", night, len(used), info)


def _ground_in_stack(sky_mask, header, shape) -> np.ndarray | None:
    """Ground pixels (bool (h, w)) of a stack of ``shape`` whose header may place it on the
    reference grid (framing cards NSREFX0/NSREFY0); None when the night is all sky. Pixels
    outside the reference frame count as sky."""
    from .landscape import reference_window

    if not sky_mask:
        return None
    sky = read_sky_mask(sky_mask)
    if sky.all():
        return None
    x0, y0 = int(header.get("NSREFX0", 0)), int(header.get("NSREFY0", 0))
    height, width = shape
    window = reference_window(sky.astype(np.float32), (y0, y0 + height, x0, x0 + width), 1.0)
    return window < 0.5


def _landscape_stack(sky_mask, landscape_params, reference_path):
    """LandscapeStack of a night whose sky mask holds ground, else None (all sky)."""
    from .landscape import LandscapeStack

    if not sky_mask:
        return None
    sky = read_sky_mask(sky_mask)
    if sky.all():
        return None
    cfg = landscape_config_from_dict(landscape_params)
    return LandscapeStack(sky=sky, feather_px=cfg.feather_px, frozen_path=reference_path,
                          sky_fraction=read_sky_fraction(sky_mask))


def outputs_step(stack_linear, out_fits, out_tiff, out_png, background_params: dict, output_params: dict,
                 out_model=None, sky_mask=None) -> None:
    """Final gradient removal, then stack.fits (float32 + provenance), 16-bit TIFF, PNG preview.

    Pixels no frame covers (NaN, framing maximize) stay NaN in the FITS, are left out of the
    gradient fit and are black in the TIFF and PNG.

    out_model: optional path of the light-pollution model (FITS, ADU, binned to <= 256 px on the
    long side; see outputs.write_background_model). It is fitted even when ``after_stack`` is
    off (then it is only shown, not subtracted). sky_mask: optional sky_mask.fits of the
    night; the model is then fitted on the sky alone (the ground is no light pollution).
    """
    from astropy.io import fits

    from .framing import FRAMING_KEYWORDS
    from .outputs import (
        bin_model,
        frame_names_from_header,
        stack_header,
        write_background_model,
        write_preview_png,
        write_stack_fits,
        write_tiff16,
    )

    with fits.open(stack_linear) as hdul:
        image = np.asarray(hdul[0].data, dtype=np.float32)
        header = hdul[0].header.copy()
        # native copies: a view would keep the file's memory map, and so the 24 MP image
        # pages read through it (290 MB), alive after the file is closed
        coverage = np.array(hdul["COVERAGE"].data, dtype=np.int16) if "COVERAGE" in hdul else None
    frames = frame_names_from_header(header)
    text = {k: header_text_decoded(header[k]) if k in header else None
            for k in ("DATE-BEG", "DATE-END", "STACKMTH", "NIGHT", "REFFRAME")}
    remove = background_params.get("after_stack", True)
    if remove or out_model:
        ground = _ground_in_stack(sky_mask, header, image.shape[-2:])
        # the fit masks non-finite pixels itself, and uncovered (NaN) pixels stay NaN through
        # the subtraction (nightstack.background)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # uncovered
            # a 24 MP colour stack is 290 MB: corrected in place, the model binned as it is made
            corrected, model = remove_background(
                image, background_config_from_dict(_bg_only(background_params)), not_sky=ground,
                in_place=remove, model_reducer=bin_model)
        if remove:
            image = corrected
        del corrected
        if out_model:
            write_background_model(out_model, model, removed=remove, night=text["NIGHT"],
                                   stack_shape=image.shape[-2:])
        del model
    meta = {
        "software_version": SOFTWARE,
        "n_frames": int(header.get("NCOMBINE", len(frames))),
        "frames": frames,
        "total_exptime_s": header.get("EXPTIME"),
        "date_obs_start": text["DATE-BEG"],
        "date_obs_end": text["DATE-END"],
        "method": text["STACKMTH"],
        "night": text["NIGHT"],
        "reference": text["REFFRAME"],
    }
    hdr = stack_header(meta)
    hdr.extend([(k, header[k], header.comments[k]) for k in FRAMING_KEYWORDS if k in header])
    write_stack_fits(out_fits, image, hdr, coverage=coverage)
    write_tiff16(out_tiff, image)  # NaN -> 0 (black) in both
    max_side = output_params.get("png_max_side_px") or None
    write_preview_png(out_png, image, max_side_px=max_side)
    log.info("wrote %s, %s, %s", out_fits, out_tiff, out_png)


# --------------------------------------------------------------------------- demo


def demo_step(folder, params: dict) -> None:
    """Generate the demo night into ``folder`` (files moved in once all are written)."""
    import shutil

    from .demo import DemoConfig, generate_night

    folder = Path(folder)
    cfg = DemoConfig(**{k: v for k, v in params.items() if k != "folder"})
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-", dir=folder.parent) as tmp:
        generate_night(Path(tmp) / "night", cfg)
        src = Path(tmp) / "night"
        files = sorted(p for p in src.rglob("*") if p.is_file())
        # truth.json last, so a complete set of frames exists before it appears
        files.sort(key=lambda p: p.name == "truth.json")
        for p in files:
            dest = folder / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), dest)
    log.info("demo night generated in %s", folder)


# --------------------------------------------------------------------------- star trails


def trails_step(night: str, calibrated: list, output, trails_params: dict, sky_mask=None) -> None:
    """Star-trail mode: no registration; frames in time order, lighten (or average) stack.
    sky_mask: optional sky_mask.fits of the night: its ground stays frozen (no gap copies)."""
    from astropy.io import fits

    from .outputs import stack_header, write_stack_fits
    from .trails import stack_trails, trails_config_from_dict

    usable = []
    for path in calibrated:
        hdr = fits.getheader(path)
        source = _source(hdr, Path(path).name)
        if hdr.get("NSSTATUS") != "ok":
            log.warning("night %s: frame %s rejected: %s", night, source, _long_reason(hdr))
            continue
        date = header_text_decoded(hdr["DATE-OBS"]) if "DATE-OBS" in hdr else ""
        usable.append((date, source, str(path), hdr.get("EXPTIME")))
    if not usable:
        raise NightstackError(f"night '{night}' has no usable frame for star trails")
    usable.sort()
    cfg = trails_config_from_dict(trails_params)
    progress = Progress(f"star trails of night {night}", len(usable))
    sky = read_sky_mask(sky_mask) if sky_mask else None
    image, info = stack_trails([u[2] for u in usable], cfg, progress=progress, sky=sky)
    skipped = {s["path"] for s in info.get("skipped", [])}
    used = [u for u in usable if u[2] not in skipped]
    exptimes = [u[3] for u in used if u[3]]
    dates = [u[0] for u in used if u[0]]
    hdr = stack_header({
        "software_version": SOFTWARE, "n_frames": len(used), "frames": [u[1] for u in used],
        "total_exptime_s": float(np.sum(exptimes)) if exptimes else None,
        "date_obs_start": dates[0] if dates else None, "date_obs_end": dates[-1] if dates else None,
        "method": f"trails-{cfg.method}", "night": night, "reference": None,
    })
    write_stack_fits(output, image, hdr)
    write_json(Path(output).with_suffix(".json"), {"frames": [u[1] for u in used], "info": info})
    log.info("night %s: star trails from %d frames", night, len(used))


# --------------------------------------------------------------------------- nights combined


def _read_night_stack(night: str, stack_fits, solution_json):
    """A night's stack.fits and solution.json -> (NightStack, header)."""
    from astropy.io import fits

    from .combine import NightStack, as_planes

    cam = read_json(solution_json)["camera"]
    camera = Camera(cam["width_px"], cam["height_px"], cam["focal_px"], cam["k1"], cam["k2"])
    with fits.open(stack_fits) as hdul:
        image = as_planes(hdul[0].data)
        header = hdul[0].header.copy()
    return NightStack(night, image, camera), header


def _night_record(res, header) -> dict:
    """The combined solution.json entry of one night."""
    rec = {"night": res.name, "status": res.status, "reason": res.reason,
           "n_frames": int(header.get("NCOMBINE", 0)), "n_stars": res.n_stars}
    if res.status == "rejected":
        return rec
    from .combine import rotation_record

    cam = res.camera
    rec.update(camera={"width_px": cam.width_px, "height_px": cam.height_px,
                       "focal_px": cam.focal_px, "k1": cam.k1, "k2": cam.k2},
               channels="RGB" if res.warped.shape[0] == 3 else "L",
               **rotation_record(res.pose), zoom=res.pose.zoom,
               matched_stars=res.pose.n_pairs, residual_rms_px=_num(res.pose.rms_px),
               flux_scale=_num(res.flux_scale), noise_adu=_num(res.noise_adu), weight=res.weight)
    return rec


def combine_step(stacks: dict, solutions: dict, out_fits, out_json, combine_params: dict,
                 star_params: dict, reg_params: dict) -> None:
    """Register every night's stack on the reference night's, combine weighted by noise; write
    the combined linear stack and results/combined/solution.json (see nightstack.combine)."""
    from .combine import combine_nights, expected_noise
    from .outputs import frame_names_from_header, stack_header, write_stack_fits

    loaded = {n: _read_night_stack(n, stacks[n], solutions[n]) for n in stacks}
    params = {k: v for k, v in star_params.items() if k != "cfa_presmooth_px"}
    image, results, ref_name = combine_nights(
        [night for night, _ in loaded.values()], combine_params.get("reference", "auto"),
        star_config_from_dict(params), registration_config(reg_params))
    headers = {n: h for n, (_, h) in loaded.items()}
    used = [r for r in results if r.status != "rejected"]
    coverage = sum(int(headers[r.name].get("NCOMBINE", 1)) * np.isfinite(r.warped).all(axis=0)
                   for r in used)
    frames = [f"{r.name}/{f}" for r in used for f in frame_names_from_header(headers[r.name])]
    dates = sorted(str(headers[r.name][k]) for r in used for k in ("DATE-BEG", "DATE-END")
                   if k in headers[r.name])
    exptimes = [float(headers[r.name]["EXPTIME"]) for r in used if "EXPTIME" in headers[r.name]]
    hdr = stack_header({
        "software_version": SOFTWARE, "n_frames": len(frames), "frames": frames,
        "total_exptime_s": float(np.sum(exptimes)) if exptimes else None,
        "date_obs_start": dates[0] if dates else None, "date_obs_end": dates[-1] if dates else None,
        "method": "nights combined, noise-weighted", "night": "combined", "reference": ref_name,
    })
    write_stack_fits(out_fits, image, hdr, coverage=coverage)
    for r in results:
        if r.status == "rejected":
            log.warning("combined: night %s left out: %s", r.name, r.reason)
    write_json(out_json, {
        "software": SOFTWARE, "reference": ref_name,
        "convention": ("rotation turns reference-night camera directions into this night's; "
                       "pixels 0-based, x = column; values in the reference night's flux units"),
        "mono_colour_rule": "L = noise-weighted mean of all nights; colour (channel - L) from "
                            "the colour nights only",
        "expected_noise_adu": expected_noise(results), "n_nights": len(results),
        "n_used": len(used), "nights": [_night_record(r, headers[r.name]) for r in results],
    })
    log.info("combined %d of %d nights on the grid of night %s", len(used), len(results), ref_name)
