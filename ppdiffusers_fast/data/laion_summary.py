"""Summaries as ``summary.json`` and a human-readable ``summary.md`` (LAION filter, downloads)."""
import json
import os


def summary_markdown(summary):
    """The summary dict of :func:`~ppdiffusers_fast.data.laion_filter.filter_laion` as markdown."""
    config = summary["config"]
    lines = ["# LAION filter summary", "",
             f"- input files read: {summary['files_read']}, skipped: {len(summary['files_skipped'])}",
             f"- rows read: {summary['rows_read']}",
             f"- rows kept: {summary['rows_kept']}",
             f"- rows removed: {summary['rows_removed']}",
             f"- seconds: {summary['seconds']}", "",
             "## Thresholds", ""]
    lines += [f"- {key}: {value}" for key, value in config.items()]
    lines += ["", "## Rows removed per rule (first failing rule)", "", "| rule | rows removed |", "|---|---:|"]
    lines += [f"| {rule} | {count} |" for rule, count in summary["removed_by_rule"].items()]
    lines += ["", "## Columns found", "", "| file | mapping (canonical = column) |", "|---|---|"]
    for path, mapping in summary["columns_found"].items():
        lines.append(f"| {path} | {', '.join(f'{k}={v}' for k, v in mapping.items())} |")
    if summary["files_skipped"]:
        lines += ["", "## Files skipped", ""]
        lines += [f"- {item['file']}: {item['error']}" for item in summary["files_skipped"]]
    lines += ["", "## Outputs", ""] + [f"- {name}" for name in summary["outputs"]]
    return "\n".join(lines) + "\n"


def write_json_and_markdown(summary, markdown, output_dir, stem="summary"):
    """Write ``<stem>.json`` (the dict) and ``<stem>.md`` (the text) into ``output_dir``, each via a temporary file."""
    os.makedirs(output_dir, exist_ok=True)
    for name, text in ((f"{stem}.json", json.dumps(summary, indent=2)), (f"{stem}.md", markdown)):
        path = os.path.join(output_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)


def write_summary(summary, output_dir):
    """Write the filter's ``summary.json`` and ``summary.md`` into ``output_dir``."""
    write_json_and_markdown(summary, summary_markdown(summary), output_dir)
