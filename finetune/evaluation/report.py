"""An evaluation result as a text table and as flat scalar logs, each figure next to its real-vs-real baseline."""

from __future__ import annotations


def metrics_for_logging(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """Flatten an evaluation result into scalar logs, each figure with its baseline: {"eval/digits_fd": ..., ...}."""
    logs = {}
    for name in ("digits", "inception"):
        if name not in result:
            continue
        for key, value in result[name]["samples"].items():
            if isinstance(value, (int, float)) and key != "num_samples":
                logs[f"{prefix}{name}_{key}"] = float(value)
                if key in result[name]["baseline"]:
                    logs[f"{prefix}{name}_{key}_baseline"] = float(result[name]["baseline"][key])
    return logs


_ROWS = (
    ("fd", "Fréchet distance", "{:.4g}"),
    ("kid", "KID x 1e3", None),
    ("confident_fraction", "confident (p > 0.9)", "{:.3f}"),
    ("class_accuracy", "read as requested class", "{:.3f}"),
    ("predicted_class_histogram", "predicted class counts", "{}"),
    ("num_samples", "images", "{}"),
)


def _format_cell(scores: dict, key: str, template: str | None) -> str:
    if key == "kid":
        return f"{scores['kid_mean'] * 1e3:.3f} ± {scores['kid_std'] * 1e3:.3f}"
    if key not in scores:
        return "-"
    return template.format(scores[key])


def format_report(result: dict) -> str:
    """A text table: each figure for the samples next to the real-vs-real baseline."""
    settings = result.get("settings", {})
    source = settings.get("pipeline") or settings.get("fake_dir", "samples")
    lines = [f"evaluation of {source}: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "pipeline")]
    for name, title in (("digits", "digits classifier features"), ("inception", "Inception-v3 pool3 features")):
        if name not in result:
            continue
        samples, baseline = result[name]["samples"], result[name]["baseline"]
        lines.append("")
        lines.append(f"{title}  (baseline: {result[name]['baseline_is']})")
        lines.append(f"  {'':26}{'samples':>34}    {'real-vs-real baseline':>34}")
        for key, label, template in _ROWS:
            if key != "kid" and key not in samples and key not in baseline:
                continue
            sample_cell, baseline_cell = _format_cell(samples, key, template), _format_cell(baseline, key, template)
            lines.append(f"  {label:26}{sample_cell:>34}    {baseline_cell:>34}")
    if any(name in result for name in ("digits", "inception")):
        lines += ["", *KID_AND_FD_NOTE]
    return "\n".join(lines)


KID_AND_FD_NOTE = (
    "Lower is better for both distances; a model is as good as real data when it reaches the baseline. FD is biased",
    "upward on few images, so the baseline uses as many held-out images as there are samples (the 'images' row).",
    "KID (Binkowski et al. 2018) is unbiased: it scatters around 0 for sets as alike as two draws of real data, and",
    "can be slightly negative (the digits' class-balanced held-out split sits near -12 x 1e-3).",
)
