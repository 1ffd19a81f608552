"""What is written beside every merged file: a model card for people and a config for programs.

``merged.safetensors`` gets ``merged.md`` (what was merged, how, from which files, how to load it
and how to make it again) and ``merged.config.json`` (per head an ``id2label`` map; the input as
timm's ``pretrained_cfg`` describes it). Both are made from the file's metadata and the
model's preprocessing.
"""
from __future__ import annotations

import json
from pathlib import Path

from .merged import RECORDS, write_atomic
from .wording import choice_evidence, choice_rule, refit_summary, size_summary
from .specs.format import Preprocess
from .visible import visible, visible_tree

CONFIG_FORMAT = "zipit-config/1"
ACCURACY_HEADING = "## Accuracy"


def card_paths(model_path: str | Path) -> tuple[Path, Path]:
    """(model card, config) beside ``model_path``: ``merged.md`` and ``merged.config.json``."""
    model_path = Path(model_path)
    return model_path.with_suffix(".md"), model_path.with_suffix(".config.json")


def _input(pre: Preprocess) -> dict:
    """The preprocessing in timm's ``pretrained_cfg`` terms."""
    return {"input_size": list(pre.shape), "crop_pct": round(pre.size / pre.resize, 4) if pre.resize else 1.0,
            "crop_mode": "center", "resize": pre.resize, "interpolation": "bilinear", "mean": list(pre.mean),
            "std": list(pre.std)}


def model_config(metadata: dict, pre: Preprocess) -> dict:
    params = {k: v for k, v in metadata["params"].items() if k not in RECORDS}
    return {
        "format": CONFIG_FORMAT, "architecture": metadata["spec_name"], "stop": metadata["stop"],
        "method": metadata["method"], "params": params, "dtype": metadata["dtype"],
        "heads": [{"name": h["name"], "source": h["source"], "num_classes": len(h["classes"]),
                   "id2label": {str(i): c for i, c in enumerate(h["classes"])},
                   "label2id": {c: i for i, c in enumerate(h["classes"])}} for h in metadata["heads"]],
        "pretrained_cfg": _input(pre),
        "sources": [{"file": s["file"], "sha256": s["sha256"]} for s in metadata["sources"]],
    }


def model_card(metadata: dict, pre: Preprocess, file_name: str, command: str | None = None) -> str:
    """The card's Markdown; every name that came from a file has its control characters written out."""
    metadata, file_name = visible_tree(metadata), visible(file_name)
    command = None if command is None else visible(command)
    cal, params = metadata["calibration"], metadata["params"]
    setting = ", ".join(f"{k} {v:g}" for k, v in params.items() if k not in RECORDS) or "no parameters"
    tuning, choice = params.get("tuning"), params.get("choice")
    if tuning and tuning.get("candidates") and metadata["method"] == "zipit":
        setting += (f" (chosen without labels among {len(tuning['candidates'])} candidates on "
                    f"{tuning['held_out_images']} held-out calibration images)")
    if choice and "interval" in choice:
        other = "permute" if choice.get("chosen") == "zipit" else "zipit"
        setting += f"; chosen by the default over {other} ({choice_rule(choice)}): {choice_evidence(choice)}"
    pre = _input(pre)
    size = pre["input_size"][1]
    resize = f"resize the shorter side to {pre['resize']} px, " if pre["resize"] else ""
    lines = [
        f"# {file_name}",
        "",
        f"A multi-head model merged by zipit {metadata['zipit_version']} from {len(metadata['sources'])} "
        f"`{metadata['spec_name']}` checkpoints without training: layers up to `{metadata['stop']}` are shared, "
        "each source keeps its own head after that.",
        "",
        f"- Method: `{metadata['method']}`, {setting}.",
        *([f"- Refit: {refit_summary(params['refit'])}."] if params.get("refit") else []),
        *([f"- Size: {size_summary(params['size'])}."] if params.get("size") else []),
        f"- Calibration: {cal['num_images']} unlabelled images from `{cal['folder']}` (seed {cal['seed']}"
        f"{', ' + str(cal['held_out']) + ' more held out for tuning' if cal.get('held_out') else ''}), "
        f"BatchNorm reset {'on' if cal['reset_bn'] else 'off'}.",
        f"- Input: {resize}centre-crop {size} px, RGB scaled to [0, 1], normalised with mean {pre['mean']} "
        f"and std {pre['std']} (bilinear).",
        "",
        "## Sources",
        "",
        "| file | sha256 | classes |",
        "| --- | --- | --- |",
        *[f"| `{s['file']}` | `{s['sha256']}` | {len(s['classes'])} |" for s in metadata["sources"]],
        "",
        "## Heads (outputs, in order)",
        "",
        "| # | head | classes |",
        "| --- | --- | --- |",
        *[f"| {i} | `{h['name']}` | {', '.join(h['classes'])} |" for i, h in enumerate(metadata["heads"])],
        "",
        *_widths(metadata["spaces"]),
        ACCURACY_HEADING,
        "",
        f"Not measured when the file was written. Measure it on a labelled folder (`DIR/<class>/<images>`): "
        f"`zipit eval {file_name} --data DIR` (it writes the figures here).",
        "",
        "## Use it",
        "",
        "```python",
        "import zipcli",
        f"model = zipcli.load_merged({file_name!r})   # one logits tensor per head",
        "```",
        "",
        f"Or without zipit: `zipit export {file_name} -o model.pt2`, then "
        "`torch.export.load('model.pt2').module()(images)`.",
    ]
    if command:
        lines += ["", "## Reproduce", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def _widths(spaces: list[dict]) -> list[str]:
    """The merged widths of a merge at a size, as a table (nothing for a full zip)."""
    if not any("width" in s for s in spaces):
        return []
    return ["## Merged widths", "", "| space | one model | merged |", "| --- | --- | --- |",
            *[f"| `{s['space']}` | {s['size']} | {s.get('width', s['size'])} |" for s in spaces], ""]


def card_files(metadata: dict, pre: Preprocess, model_path: str | Path,
               command: str | None = None) -> dict[Path, str]:
    """{path: text} of the card and the config for a merged file written to ``model_path``."""
    card, config = card_paths(model_path)
    return {card: model_card(metadata, pre, Path(model_path).name, command),
            config: json.dumps(model_config(metadata, pre), indent=2) + "\n"}


def accuracy_section(result: dict, data: str, images: int, limit: int | None) -> str:
    """The card's accuracy section for one ``zipit eval`` result of the merged file."""
    result, data = visible_tree(result), visible(data)
    sample = f"at most {limit} images per class of " if limit else ""
    lines = [ACCURACY_HEADING, "",
             f"Measured by `zipit eval` on {sample}`{data}` ({images} labelled images): each head on the images "
             "of its own classes, their average, and joint accuracy (softmax per head, argmax over every class).",
             "", "| head | images | accuracy |", "| --- | --- | --- |"]
    lines += [f"| `{h['name']}` | {h['images']} | {_fraction(h['accuracy'])} |" for h in result["heads"]]
    lines += [f"| average per task | | {_fraction(result['avg_task'])} |",
              f"| joint | {result['joint_images']} | {_fraction(result['joint'])} |"]
    return "\n".join(lines) + "\n"


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def with_accuracy(card: str, section: str) -> str | None:
    """``card`` with its accuracy section replaced by ``section``; None if it has no such section
    (a card written by hand or by another tool is left alone)."""
    start = card.find(f"\n{ACCURACY_HEADING}\n")
    if start < 0:
        return None
    end = card.find("\n## ", start + len(ACCURACY_HEADING) + 2)
    return card[:start + 1] + section + (card[end:] if end >= 0 else "")


def record_accuracy(model_path: str | Path, result: dict, data: str, images: int, limit: int | None = None) -> Path | None:
    """Write ``result`` (one merged file's ``zipit eval`` figures) into the model card beside
    ``model_path``, atomically; the card's path, or None when there is no card zipit can update."""
    card = card_paths(model_path)[0]
    if not card.is_file():
        return None
    updated = with_accuracy(card.read_text(encoding="utf-8"), accuracy_section(result, data, images, limit))
    if updated is None:
        return None
    write_atomic(card, lambda tmp: Path(tmp).write_text(updated, encoding="utf-8"), force=True, suffix=".md")
    return card
