"""Writing evaluation results: ``results.json`` (numbers + protocol) and ``results.md`` (the same as tables)."""
import json
import os
import tempfile

METRIC_LABELS = {
    "fid_flux": "FID-FLUX: student vs teacher reference ({extractor})",
    "clip_score_student": "CLIP score, student (mean cosine)",
    "clip_score_student_x100": "CLIP score, student (mean max(100 cos, 0))",
    "clip_score_teacher": "CLIP score, teacher (mean cosine)",
    "clip_score_teacher_x100": "CLIP score, teacher (mean max(100 cos, 0))",
    "fid_real_student": "FID vs real images, student ({extractor})",
    "fid_real_teacher": "FID vs real images, teacher ({extractor})",
}


def write_text_atomic(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _flatten(prefix, value, rows):
    if isinstance(value, dict):
        for key in value:
            _flatten(f"{prefix}.{key}" if prefix else str(key), value[key], rows)
    else:
        rows.append((prefix, value))


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_report(results):
    """Metrics table then protocol table (dotted keys) of a results dict."""
    extractor = results.get("protocol", {}).get("feature_extractor", {}).get("name", "")
    lines = ["# COCO evaluation", "", "| metric | value |", "| --- | --- |"]
    for key, value in results["metrics"].items():
        label = METRIC_LABELS.get(key, key).format(extractor=extractor)
        lines.append(f"| {label} | {_cell(value)} |")
    rows = []
    _flatten("", results.get("protocol", {}), rows)
    lines += ["", "## Protocol", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    return "\n".join(lines) + "\n"


def write_results(output_dir, results):
    """Write ``results.json`` and ``results.md`` into ``output_dir``; returns their paths."""
    json_path = os.path.join(output_dir, "results.json")
    markdown_path = os.path.join(output_dir, "results.md")
    write_text_atomic(json_path, json.dumps(results, indent=1, sort_keys=False) + "\n")
    write_text_atomic(markdown_path, markdown_report(results))
    return json_path, markdown_path
