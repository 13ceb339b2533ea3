"""The evaluation commands, registered on the `batchgen` group: eval, score, report, export, make-tiny-scorers."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from batchgen.cli import fail, setup_logging

logger = logging.getLogger("batchgen")


@click.command("eval")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--report/--no-report", default=True, show_default=True, help="Write the HTML report at the end.")
@click.option("-v", "--verbose", is_flag=True)
def eval_command(spec, report, verbose):
    """Run an evaluation sweep: every arm's images, scores, statistics and the report; resumes into its output.

    Exit code 1 when an arm failed (the others are still scored and reported)."""
    bar = setup_logging(verbose, starts_ray=True)
    try:
        from batchgen.eval.spec import load_eval_spec
        from batchgen.eval.sweep import run_eval

        summary = run_eval(load_eval_spec(spec), report=report, progress=bar)
    except Exception as e:  # noqa: BLE001 - every failure ends in a message and an exit code
        logger.debug("failure", exc_info=True)
        fail(e)
    finally:
        if bar:
            bar.finish()
    click.echo(json.dumps(summary, indent=2, default=str))
    if "report" in summary:
        click.echo(f"report: {summary['report']}")
    failed = [a["name"] for a in summary["arms"] if a["status"] != "ok"]
    if failed:
        click.echo(f"batchgen: {len(failed)} of {len(summary['arms'])} arms failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@click.command()
@click.argument("output")
@click.argument("scoring", type=click.Path(dir_okay=False))
@click.option("-v", "--verbose", is_flag=True)
def score(output, scoring, verbose):
    """Score any batchgen OUTPUT with the scorers of SCORING (a YAML scoring section, or an eval spec); writes
    OUTPUT/scores/ and scores only images not scored yet."""
    setup_logging(verbose, starts_ray=True)
    try:
        import yaml

        from batchgen.eval.spec import parse_scoring
        from batchgen.eval.sweep import score_output

        tree = yaml.safe_load(Path(scoring).read_text()) or {}
        summary = score_output(output, parse_scoring(tree, scoring))
    except Exception as e:  # noqa: BLE001
        logger.debug("failure", exc_info=True)
        fail(e)
    click.echo(json.dumps(summary, indent=2))


@click.command()
@click.argument("output")
@click.option("--to", "dest", help="Where to write the report (folder or s3:// prefix); default OUTPUT/report.")
@click.option("--worst-k", type=int, default=8, show_default=True)
@click.option("--thumbnail", type=int, default=128, show_default=True, help="Thumbnail side in pixels.")
def report(output, dest, worst_k, thumbnail):
    """Write the static HTML report of an eval root or any batchgen OUTPUT; prints the path of index.html."""
    setup_logging(False)
    try:
        from batchgen.eval.report import build_report
        from batchgen.eval.results import load_results
        from batchgen.eval.spec import ReportSpec
        from batchgen.storage import open_storage

        results = load_results(output)
        where = build_report(results, dest or open_storage(output).uri_for("report"),
                             ReportSpec(worst_k=worst_k, thumbnail=thumbnail))
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(f"report: {where}")


@click.command()
@click.argument("output")
@click.argument("dest")
@click.option("--layout", type=click.Choice(["flat", "geneval", "t2i-compbench"]), default="flat", show_default=True)
def export(output, dest, layout):
    """Copy an eval's (or any output's) images into DEST in another suite's folder layout."""
    setup_logging(False)
    try:
        from batchgen.eval.export import export as export_images
        from batchgen.eval.results import load_results

        count = export_images(load_results(output), dest, layout)
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(f"exported {count} images to {dest} ({layout})")


@click.command("make-tiny-scorers")
@click.argument("directory", type=click.Path(file_okay=False))
def make_tiny_scorers_command(directory):
    """Write random-weight scorers (CLIP directory, aesthetic head, TorchScript extractor) for tests and demos."""
    setup_logging(False)
    from batchgen.eval.tiny import make_tiny_scorers

    for name, path in make_tiny_scorers(directory).items():
        click.echo(f"{name}: {path}")


COMMANDS = (eval_command, score, report, export, make_tiny_scorers_command)
