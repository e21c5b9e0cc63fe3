"""Frame quality scoring and rejection (nightstack.quality) on synthetic and real nights."""

import numpy as np
import pytest

from nightstack.errors import NightstackError
from nightstack.quality import (
    QualityConfig,
    judge_frames,
    quality_config_from_dict,
    rejected_frames,
    score_frames,
)


def good_night(n=20, seed=1):
    """Records of n similar frames; the first is the reference (residual 0)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        recs.append({
            "frame": f"good_{i:02d}",
            "fwhm_px": float(rng.normal(2.5, 0.08)),
            "ellipticity": float(rng.uniform(0.05, 0.2)),
            "n_stars": int(rng.normal(500, 25)),
            "background_adu": float(rng.normal(1000, 15)),
            "noise_adu": float(rng.normal(20, 0.5)),
            "residual_rms_px": 0.0 if i == 0 else float(rng.normal(0.3, 0.03)),
        })
    return recs


def bad_night():
    recs = good_night()
    base = dict(recs[5])
    fwhm_med = float(np.median([r["fwhm_px"] for r in recs]))
    bad = {
        "blurred": {"fwhm_px": 2 * fwhm_med},
        "trailed": {"ellipticity": 0.7},
        "cloudy": {"n_stars": 50},
        "twilight": {"background_adu": 5000.0, "noise_adu": 45.0},
        "misregistered": {"residual_rms_px": 1.2},
    }
    for name, change in bad.items():
        recs.append({**base, "frame": name, **change})
    return recs



def test_exactly_the_bad_frames_are_rejected_with_reasons():
    scores = score_frames(bad_night())
    verdict = judge_frames(scores, QualityConfig())
    assert len(verdict) == 25
    rejected = rejected_frames(verdict)
    assert set(rejected) == {"blurred", "trailed", "cloudy", "twilight", "misregistered"}
    # each reason names the quantity, and its own value appears in it
    assert "FWHM" in rejected["blurred"] and "1.5x" in rejected["blurred"]
    blurred = next(s for s in scores if s.frame == "blurred")
    assert f"{blurred.fwhm_px:.2f}" in rejected["blurred"]
    # the median quoted is that of all 25 frames, and the ratio is value / median
    median = float(np.median([s.fwhm_px for s in scores]))
    assert f"median {median:.2f} px" in rejected["blurred"]
    assert f"{blurred.fwhm_px / median:.2f}x" in rejected["blurred"]
    assert 1.9 < blurred.fwhm_px / median < 2.1
    assert "ellipticity 0.70" in rejected["trailed"] and "0.5" in rejected["trailed"]
    stars_median = float(np.median([s.n_stars for s in scores]))
    assert f"50 stars is {100 * 50 / stars_median:.0f}% of the night's median {stars_median:.0f}" in rejected["cloudy"]
    bg_median = float(np.median([s.background_adu for s in scores]))
    assert (f"background 5000.0 ADU is {5000 / bg_median:.1f}x the night's median {bg_median:.1f} ADU"
            in rejected["twilight"])
    rms = [s.residual_rms_px for s in scores if s.residual_rms_px > 0]  # the reference's 0 is no measurement
    rms_median = float(np.median(rms))
    assert (f"residual RMS 1.20 px is {1.2 / rms_median:.1f}x the night's median {rms_median:.2f} px"
            in rejected["misregistered"])
    # one reason per failed test: no frame carries a second, spurious one
    assert all(";" not in r for r in rejected.values())


def test_tight_night_loses_nothing():
    rng = np.random.default_rng(3)
    recs = good_night(30)
    for r in recs:
        r["fwhm_px"] = float(rng.uniform(2.00, 2.10))
    recs[7]["fwhm_px"] = 2.10  # the worst is many MADs out on some draws, but only 5% worse
    recs[8]["fwhm_px"] = 2.00
    verdict = judge_frames(score_frames(recs), QualityConfig())
    assert rejected_frames(verdict) == {}


def test_identical_frames_mad_zero_loses_nothing():
    recs = [{"frame": f"f{i}", "fwhm_px": 2.0, "ellipticity": 0.1, "n_stars": 300,
             "background_adu": 500.0, "noise_adu": 10.0, "residual_rms_px": 0.2} for i in range(5)]
    recs[4]["fwhm_px"] = 2.2  # infinitely many sigmas (MAD 0) but only 1.1x
    recs[3]["background_adu"] = 900.0  # 1.8x: under the 2x ratio
    assert rejected_frames(judge_frames(score_frames(recs))) == {}
    recs[2]["fwhm_px"] = 3.2  # 1.6x and MAD 0: rejected, with a readable reason
    rejected = rejected_frames(judge_frames(score_frames(recs)))
    assert set(rejected) == {"f2"} and "far more than" in rejected["f2"]


def test_two_frame_night_only_absolute_limits():
    recs = bad_night()
    two = [dict(recs[1]), {**recs[2], "fwhm_px": 10.0, "n_stars": 3, "background_adu": 1e5,
                           "residual_rms_px": 1.4}]
    assert rejected_frames(judge_frames(score_frames(two))) == {}
    two[1]["ellipticity"] = 0.8
    rejected = rejected_frames(judge_frames(score_frames(two)))
    assert set(rejected) == {two[1]["frame"]} and "ellipticity" in rejected[two[1]["frame"]]


def test_all_bad_keeps_the_sharpest():
    recs = good_night(6)
    for i, r in enumerate(recs):
        r["ellipticity"] = 0.8
    recs[3]["fwhm_px"] = 1.9  # the sharpest
    verdict = judge_frames(score_frames(recs))
    assert verdict[recs[3]["frame"]] == ""
    others = [v for f, v in verdict.items() if f != recs[3]["frame"]]
    assert len(others) == 5 and all(v and recs[3]["frame"] in v and "sharpest" in v for v in others)
    # a single bad frame is kept as well
    assert judge_frames(score_frames(recs[:1])) == {recs[0]["frame"]: ""}


def test_missing_values_are_never_judged():
    recs = bad_night()
    recs.append({"frame": "bare"})  # e.g. a frame rejected before star detection
    recs.append({"frame": "partial", "fwhm_px": None, "n_stars": 480, "residual_rms_px": None})
    scores = score_frames(recs)
    bare = next(s for s in scores if s.frame == "bare")
    assert np.isnan(bare.fwhm_px) and np.isnan(bare.residual_rms_px) and np.isnan(bare.n_stars)
    partial = next(s for s in scores if s.frame == "partial")
    assert partial.n_stars == 480 and isinstance(partial.n_stars, int)
    rejected = rejected_frames(judge_frames(scores))
    assert set(rejected) == {"blurred", "trailed", "cloudy", "twilight", "misregistered"}


def test_reference_zero_residual_does_not_shift_statistics():
    # half of the frames at residual 0 (references of sub-nights) must not make 0.3 px look bad
    recs = good_night(10)
    for r in recs[:5]:
        r["residual_rms_px"] = 0.0
    assert rejected_frames(judge_frames(score_frames(recs))) == {}


def test_config_from_dict():
    cfg = quality_config_from_dict({"max_ellipticity": 0.3, "min_fwhm_ratio": "1.2"})
    assert cfg.max_ellipticity == 0.3 and cfg.min_fwhm_ratio == 1.2 and cfg.max_rms_mad == 6.0
    assert quality_config_from_dict(None) == QualityConfig()
    with pytest.raises(NightstackError, match="max_fwhm"):
        quality_config_from_dict({"max_fwhm": 3})
    with pytest.raises(NightstackError, match="max_ellipticity"):
        quality_config_from_dict({"max_ellipticity": -1})
    with pytest.raises(NightstackError, match="frame"):
        score_frames([{"fwhm_px": 2.0}])
    with pytest.raises(NightstackError, match="twice"):
        score_frames([{"frame": "a"}, {"frame": "a"}])
    # a stricter ellipticity limit rejects more of the same night
    verdict = judge_frames(score_frames(good_night()), QualityConfig(max_ellipticity=0.1))
    ell = {r["frame"]: r["ellipticity"] for r in good_night()}
    assert {f for f, v in verdict.items() if v} == {f for f, e in ell.items() if e > 0.1}


def test_real_als_m27_night_keeps_all_frames(shared_data):
    """Star statistics of the six real als_m27 frames (2x2-binned luminance) pass as one night."""
    from astropy.io import fits

    from nightstack.stars import detect_stars

    folder = shared_data("als_m27_asi224mc")
    records = []
    for path in sorted(folder.glob("*.fits")):
        raw = fits.getdata(path).astype(np.float32)
        h, w = raw.shape[0] // 2 * 2, raw.shape[1] // 2 * 2
        lum = raw[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        meta = detect_stars(lum).meta
        records.append({"frame": path.stem, "fwhm_px": meta["fwhm_px_median"],
                        "ellipticity": meta["ellipticity_median"], "n_stars": meta["n_stars"],
                        "background_adu": meta["background_adu"], "noise_adu": meta["noise_adu"]})
    scores = score_frames(records)
    for s in scores:
        print(f"{s.frame}: FWHM {s.fwhm_px:.2f} px, ell {s.ellipticity:.3f}, {s.n_stars} stars, "
              f"bg {s.background_adu:.1f} ADU, noise {s.noise_adu:.2f} ADU")
    assert all(s.n_stars > 20 and 0.5 < s.fwhm_px < 6 for s in scores)
    verdict = judge_frames(scores)
    print(verdict)
    assert rejected_frames(verdict) == {}
    # the same night with one frame's figures spoiled: only that one goes
    spoiled = [dict(r) for r in records]
    spoiled[2]["fwhm_px"] *= 2.5
    spoiled[4]["n_stars"] = int(spoiled[4]["n_stars"] * 0.1)
    rejected = rejected_frames(judge_frames(score_frames(spoiled)))
    assert set(rejected) == {records[2]["frame"], records[4]["frame"]}
