"""The static HTML report: index.html with inline CSS, JS, data and SVG plots, plus thumbnails beside it, in a
local folder or under an s3:// prefix. It opens from file:// with no server and no network.

Thumbnails are named by their image's sha256 (`thumbs/ab/abcd....jpg`), so a rebuilt report makes only the new
ones; they load lazily with fixed sizes, so a page of ~10,000 images lays out at once and fetches only what is
on screen. Provenance (the full manifest row and scores) lives once in a JSON block: each arm's common fields
once, each image's own fields after; a click on any thumbnail shows it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from html import escape
from typing import Any

from batchgen.eval.plots import bar_plot, line_plot
from batchgen.eval.results import ArmResult, Results
from batchgen.eval.spec import ReportSpec
from batchgen.eval.stats import ALL, summarize, worst
from batchgen.storage import LocalStorage, Storage, open_storage

logger = logging.getLogger(__name__)

THUMBS_PREFIX = "thumbs/"
# Fields results.py derives from the manifest row (its `extra` holds them): not repeated in the provenance data.
HIDDEN_FIELDS = ("scores", "prompt_key", "metadata", "prompt_set", "prompt_id", "category")


def thumb_key(sha256: str) -> str:
    return f"{THUMBS_PREFIX}{sha256[:2]}/{sha256[:32]}.jpg"


def make_thumbnail(data: bytes, side: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.LANCZOS)  # never enlarges: small images stay small, CSS scales them
        out = io.BytesIO()
        image.save(out, "JPEG", quality=82)
    return out.getvalue()


def make_thumbnails(results: Results, dest: Storage, side: int, workers: int = 16) -> int:
    """Write the thumbnails that do not exist yet; returns how many were made."""
    existing = set(dest.list(THUMBS_PREFIX))
    todo: dict[str, tuple[Storage, str]] = {}
    for arm in results.arms:
        if not arm.rows:
            continue
        source = open_storage(arm.output)
        prefix = source.uri_for("")
        for row in arm.rows:
            key = thumb_key(row["sha256"])
            if key not in existing and row["image_uri"].startswith(prefix):
                todo[key] = (source, row["image_uri"][len(prefix):])

    def one(item: tuple[str, tuple[Storage, str]]) -> None:
        key, (source, image_key) = item
        dest.put(key, make_thumbnail(source.get(image_key), side), "image/jpeg")

    if todo:
        logger.info("making %d thumbnails", len(todo))
        with ThreadPoolExecutor(workers, thread_name_prefix="thumbs") as pool:
            list(pool.map(one, todo.items()))
    return len(todo)


def _common_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    first = rows[0]
    return {k: v for k, v in first.items()
            if k not in HIDDEN_FIELDS and all(r.get(k) == v for r in rows)}


def _json_script(element_id: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str, allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _clean(value: Any) -> Any:
    """Scores for the page: 6 significant digits (the Parquet tables keep every digit); no NaN in JSON."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g} <small>[{low:.3g}, {high:.3g}]</small>"


def _image_link(row: dict[str, Any], dest: Storage) -> str | None:
    """A link the browser can follow from the report: relative for local images next to a local report."""
    uri = row["image_uri"]
    if isinstance(dest, LocalStorage) and not uri.startswith(("s3://", "file://")):
        return os.path.relpath(uri, dest.root)
    return None


def _made_with(arm: ArmResult) -> str:
    """The sampling settings all the arm's images share, for outputs not made by an eval (no listed settings)."""
    common = _common_fields(arm.rows)
    if "model" in common:
        common["model"] = str(common["model"]).rstrip("/").rsplit("/", 1)[-1]
    names = ("model", "steps", "guidance_scale", "scheduler", "width", "height", "negative_prompt")
    return ", ".join(f"{k}={common[k]}" for k in names if k in common)


class Page:
    """Builds index.html's sections from the results; `images` is the provenance table the script reads."""

    def __init__(self, results: Results, spec: ReportSpec, dest: Storage):
        self.results = results
        self.spec = spec
        self.dest = dest
        self.summary = summarize(results, spec)
        self.worst = worst(results, spec.worst_k)
        self.metrics = results.metrics
        self.arm_index = {arm.name: i for i, arm in enumerate(results.arms)}
        self.common = [_common_fields(arm.rows) for arm in results.arms]
        self.images: list[dict[str, Any]] = []
        self.image_of: dict[tuple[str, str, int], int] = {}
        for a, arm in enumerate(results.arms):
            for row in arm.rows:
                own = {k: v for k, v in row.items() if k not in HIDDEN_FIELDS and k not in self.common[a]}
                link = _image_link(row, dest)
                self.image_of[(arm.name, row["id"], row["sample_index"])] = len(self.images)
                self.images.append({"a": a, "r": own, "s": {m: _clean(v) for m, v in row["scores"].items()},
                                    **({"l": link} if link else {})})

    def thumb(self, arm: ArmResult, row: dict[str, Any], label: str = "") -> str:
        index = self.image_of[(arm.name, row["id"], row["sample_index"])]
        scores = ", ".join(f"{m} {v:.3g}" for m, v in row["scores"].items() if v is not None)
        title = f"{arm.name} · seed {row['seed']}" + (f" · {scores}" if scores else "")  # the prompt heads the row
        side = self.spec.thumbnail
        caption = f"<figcaption>{escape(label)}</figcaption>" if label else ""
        return (f'<figure><img loading="lazy" decoding="async" width="{side}" height="{side}" data-i="{index}" '
                f'src="{escape(thumb_key(row["sha256"]))}" alt="" title="{escape(title)}">{caption}</figure>')

    def arms_table(self) -> str:
        by_key = {(r["arm"], r["metric"]): r for r in self.summary if r["category"] == ALL}
        sets = sorted({k for arm in self.results.arms for k in arm.set_metrics})
        head = ["arm", "status", "settings", "images"]
        for metric in self.metrics:
            head += [f"{metric} mean [95% CI]", f"{metric} Δ vs baseline [95% CI]", f"{metric} seed sd"]
        head += [{"fid": "FID", "kid_mean": "KID", "kid_std": "KID sd"}.get(s, s) for s in sets]
        lines = ["<table id='arms'><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
                 + "</tr></thead><tbody>"]
        baseline = self.results.baseline or (self.results.arms[0].name if self.results.arms else "")
        for arm in self.results.arms:
            error = arm.error or ""
            status = "ok" if arm.status == "ok" else (f"<span class='bad' title='{escape(error)}'>failed</span>: "
                                                      f"{escape(error[:80])}{'…' if len(error) > 80 else ''}")
            settings = ", ".join(f"{k}={v}" for k, v in arm.settings.items()) or _made_with(arm)
            name = escape(arm.name) + (" <small>(baseline)</small>" if arm.name == baseline else "")
            cells = [name, status, escape(settings), str(len(arm.rows))]
            for metric in self.metrics:
                record = by_key.get((arm.name, metric))
                record = record or {}
                cells.append(_interval(record.get("mean"), record.get("ci_low"), record.get("ci_high")))
                cells.append(_interval(record.get("diff"), record.get("diff_ci_low"), record.get("diff_ci_high")))
                spread = record.get("seed_spread")
                cells.append(f"{spread:.3g}" if spread is not None else "—")
            cells += [f"{arm.set_metrics[s]:.4g}" if s in arm.set_metrics else "—" for s in sets]
            lines.append(f"<tr class='arm' data-arm='{escape(arm.name)}'>" + "".join(f"<td>{c}</td>" for c in cells)
                         + "</tr>")
        return "\n".join(lines) + "</tbody></table>"

    def plots(self) -> str:
        out = []
        settings = {}
        for arm in self.results.arms:
            if arm.rows:
                first = arm.rows[0]
                model = str(first["model"]).rstrip("/").rsplit("/", 1)[-1]
                settings[arm.name] = (float(first["guidance_scale"]), f"{first['scheduler']} · {model}")
        by_key = {(r["arm"], r["metric"], r["category"]): r for r in self.summary}
        for metric in self.metrics:
            series: dict[str, list] = defaultdict(list)
            for name, (guidance, label) in settings.items():
                record = by_key.get((name, metric, ALL))
                if record:
                    series[label].append((guidance, record["mean"], record["ci_low"], record["ci_high"]))
            if series:
                out.append(line_plot(series, f"{metric} vs guidance", "guidance scale", metric))
            groups: dict[str, list] = defaultdict(list)
            for (name, m, category), record in by_key.items():
                if m == metric and category != ALL:
                    groups[category].append((name, record["mean"], record["ci_low"], record["ci_high"]))
            if groups:
                out.append(bar_plot(groups, f"{metric} by category (mean, 95% CI)", metric))
        for key, label in (("fid", "FID"), ("kid_mean", "KID")):
            series = defaultdict(list)
            for arm in self.results.arms:
                if key in arm.set_metrics and arm.name in settings:
                    guidance, name = settings[arm.name]
                    series[name].append((guidance, arm.set_metrics[key], None, None))
            if series:
                out.append(line_plot(series, f"{label} vs guidance (lower is better)", "guidance scale", label))
        return "\n".join(out) or "<p>No scores yet: run <code>batchgen score</code> or an eval with scorers.</p>"

    def worst_section(self) -> str:
        if not self.worst:
            return "<p>No scores.</p>"
        arms = {arm.name: arm for arm in self.results.arms}
        rows_by_key = {(arm.name, r["id"], r["sample_index"]): r for arm in self.results.arms for r in arm.rows}
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for w in self.worst:
            row = rows_by_key[(w["arm"], w["id"], w["sample_index"])]
            groups[(w["metric"], w["arm"])].append(self.thumb(arms[w["arm"]], row, f"{w['value']:.3g}"))
        return "\n".join(f"<h3>{escape(metric)} · {escape(arm)}</h3><div class='strip'>{''.join(cells)}</div>"
                         for (metric, arm), cells in sorted(groups.items()))

    def contact_sheets(self) -> str:
        arms = [arm for arm in self.results.arms if arm.rows]
        if len(arms) == 1:  # nothing to compare across: a grid of captioned thumbnails
            arm = arms[0]
            cells = [self.thumb(arm, row, f"{row['prompt'][:40]} · seed {row['seed']}") for row in arm.rows]
            return f"<div class='strip grid'>{''.join(cells)}</div>"
        cells: dict[str, dict[tuple[str, int], dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
        prompts: dict[tuple[str, str], str] = {}
        for arm in arms:
            for row in arm.rows:
                cells[row["prompt_set"]][(row["prompt_id"], int(row["seed"]))][arm.name] = row
                prompts[(row["prompt_set"], row["prompt_id"])] = row["prompt"]
        out = []
        for prompt_set in sorted(cells):
            head = "".join(f"<th>{escape(arm.name)}</th>" for arm in arms)
            lines = [f"<details open><summary>{escape(prompt_set)} ({len(cells[prompt_set])} prompt × seed)"
                     f"</summary><table class='sheet'><thead><tr><th>prompt · seed</th>{head}</tr></thead><tbody>"]
            for (prompt_id, seed), by_arm in sorted(cells[prompt_set].items()):
                text = prompts[(prompt_set, prompt_id)]
                row_cells = "".join(
                    f"<td>{self.thumb(arm, by_arm[arm.name]) if arm.name in by_arm else '—'}</td>" for arm in arms)
                lines.append(f"<tr><th title='{escape(text)}'>{escape(text[:60])}<br><small>{escape(prompt_id)} · "
                             f"seed {seed}</small></th>{row_cells}</tr>")
            out.append("\n".join(lines) + "</tbody></table></details>")
        return "\n".join(out) or "<p>No images.</p>"

    def render(self) -> str:
        failed = [a for a in self.results.arms if a.status != "ok"]
        warning = "".join(f"<p class='bad'>arm {escape(a.name)} failed: {escape(a.error or '')}</p>" for a in failed)
        total = sum(len(a.rows) for a in self.results.arms)
        arms = [{"name": a.name, "common": self.common[i]} for i, a in enumerate(self.results.arms)]
        return PAGE.format(
            title=escape(self.results.root), total=total, arms=len(self.results.arms), warning=warning,
            table=self.arms_table(), plots=self.plots(), worst=self.worst_section(), sheets=self.contact_sheets(),
            side=self.spec.thumbnail, data=_json_script("data", {"arms": arms, "images": self.images}),
            stats=_json_script("stats", self.summary), script=SCRIPT, style=STYLE)


def build_report(results: Results, dest: str, spec: ReportSpec) -> str:
    """Write thumbnails and index.html under `dest`; returns the URI of index.html."""
    storage = open_storage(dest)
    make_thumbnails(results, storage, spec.thumbnail)
    page = Page(results, spec, storage)
    storage.put("index.html", page.render().encode(), "text/html; charset=utf-8")
    return storage.uri_for("index.html")


STYLE = """
body{font:14px system-ui,sans-serif;margin:0 1.5em 3em;color:#222}
h1{font-size:1.3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
#arms td{white-space:nowrap}.bad{color:#b00}small{color:#666}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{background:#fff;border:1px solid #eee}
.pt{font-weight:600;font-size:13px}.pl{font-size:11px;fill:#333}
figure{margin:0;display:inline-block;text-align:center}figcaption{font-size:11px}
.grid figure{width:var(--side)}.grid figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
img[data-i]{width:var(--side);height:var(--side);object-fit:contain;image-rendering:pixelated;cursor:pointer;
background:#f4f4f4;display:block}
.strip{display:flex;flex-wrap:wrap;gap:6px}.sheet th{max-width:16em;font-weight:normal}
.sheet tbody tr,.grid figure{content-visibility:auto;contain-intrinsic-size:auto calc(var(--side) + 12px)}
#prov{position:fixed;top:0;right:0;width:30em;max-width:45vw;height:100vh;overflow:auto;background:#fff;
border-left:2px solid #888;padding:1em;box-shadow:-4px 0 12px #0002;display:none;font-size:12px}
#prov.open{display:block}#prov td{word-break:break-all}#prov img{max-width:100%;image-rendering:pixelated}
"""

SCRIPT = """
(function(){
  const data = JSON.parse(document.getElementById('data').textContent);
  const panel = document.getElementById('prov');
  function row(table, key, value){
    const tr = table.insertRow(); tr.insertCell().textContent = key;
    tr.insertCell().textContent = (value !== null && typeof value === 'object') ? JSON.stringify(value) : String(value);
  }
  function show(i){
    const image = data.images[i], arm = data.arms[image.a];
    panel.replaceChildren();
    const close = document.createElement('button'); close.textContent = 'close';
    close.onclick = () => panel.classList.remove('open');
    const title = document.createElement('h3'); title.textContent = arm.name + ' · ' + (image.r.id || arm.common.id);
    const big = document.createElement('img'); big.src = document.querySelector(`img[data-i="${i}"]`).src;
    panel.append(close, title, big);
    if (image.l){ const a = document.createElement('a'); a.href = image.l; a.textContent = 'full-size image';
      panel.append(document.createElement('br'), a); }
    const table = document.createElement('table');
    for (const [k, v] of Object.entries(image.s)) row(table, 'score: ' + k, v);
    const fields = Object.assign({}, arm.common, image.r);
    for (const k of Object.keys(fields).sort()) row(table, k, fields[k]);
    panel.append(table); panel.classList.add('open');
  }
  document.addEventListener('click', e => {
    const img = e.target.closest('img[data-i]');
    if (img) show(+img.dataset.i);
  });
})();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchgen report: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{style}:root{{--side:{side}px}}</style></head>
<body>
<h1>batchgen report: {title}</h1>
<p>{arms} arms, {total} images. Click any image for its full provenance (manifest row and scores).</p>
{warning}
<h2>Arms</h2>
{table}
<h2>Plots</h2>
<div class="plots">{plots}</div>
<h2>Worst images per metric</h2>
{worst}
<h2>Contact sheets</h2>
{sheets}
<aside id="prov"></aside>
{data}
{stats}
<script>{script}</script>
</body></html>
"""
