"""An evaluation sweep end to end on S3 (moto): 2 arms x 6 prompts x 2 seeds plus an arm whose model cannot load;
then a rerun that generates and scores nothing."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import boto3
import numpy as np
import pytest

from batchgen.errors import JobConfigError
from batchgen.eval.results import load_results
from batchgen.eval.scoring import read_scores
from batchgen.eval.spec import parse_eval_spec
from batchgen.eval.sweep import run_eval
from batchgen.storage import open_storage
from tests.eval_data import synthetic_image
from tests.jobs import decode


def upload_folder(bucket: str, prefix: str, folder) -> str:
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def put_reference(bucket: str, prefix: str) -> str:
    """Six loose PNGs and a WebDataset shard of four."""
    s3 = boto3.client("s3")
    rng = np.random.default_rng(7)
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/img{i}.png", Body=synthetic_image(rng, 32))
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for i in range(4):
            data = synthetic_image(rng, 32)
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s3.put_object(Bucket=bucket, Key=f"{prefix}/shard-000.tar", Body=shard.getvalue())
    return f"s3://{bucket}/{prefix}"


def eval_tree(bucket: str, model_dir, broken_dir, scorers, clip_uri: str, reference: str, prompts_file) -> dict:
    return {
        "output": f"s3://{bucket}/eval",
        "prompts": [
            {"name": "animals", "prompts": ["a fox", "an owl at night", "a cat"]},
            {"name": "things", "source": str(prompts_file)},
        ],
        "seeds": [3, 11],
        "arms": {"grid": {"guidance_scale": [1.0, 6.0]}, "list": [{"name": "broken", "model": str(broken_dir)}]},
        "baseline": "g1",
        "job": {
            "model": {"source": str(model_dir), "device": "cpu", "dtype": "float32"},
            "sampling": {"steps": 2, "width": 32, "height": 32},
            "compute": {"batch_size": 12, "batches_per_call": 1, "min_actors": 1, "max_actors": 1,
                        "cpus_per_actor": 0.5, "torch_threads": 1, "no_progress_timeout_s": 120},
        },
        "scoring": {"clip": clip_uri, "aesthetic": str(scorers["aesthetic"]), "batch_size": 12,
                    "cpus_per_actor": 0.5,
                    "fid": {"reference": reference, "extractor": str(scorers["extractor"]), "image_size": 32,
                            "kid_subsets": 10, "kid_subset_size": 8}},
        "report": {"worst_k": 2, "bootstrap": 300},
    }


@pytest.mark.slow
def test_sweep_on_s3_pairs_noise_scores_every_image_and_reruns_as_a_no_op(
        ray_local, s3_bucket, tiny_model_dir, tiny_scorers, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    prompts_file = tmp_path / "things.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "teapot", "prompt": "a red teapot", "category": "colour"},
        {"id": "bench", "prompt": "a green bench and a blue bowl", "category": "colour"},
        {"id": "clock", "prompt": "a clock on a wall", "category": "counting"}]))
    clip_uri = upload_folder(s3_bucket, "scorers/clip", tiny_scorers["clip"])
    reference = put_reference(s3_bucket, "reference")
    spec = parse_eval_spec(eval_tree(s3_bucket, tiny_model_dir, broken, tiny_scorers, clip_uri, reference,
                                     prompts_file))

    first = run_eval(spec)

    arms = {a["name"]: a for a in first["arms"]}
    assert arms["g1"]["status"] == arms["g6"]["status"] == "ok"
    assert arms["broken"]["status"] == "failed" and "no unet/" in arms["broken"]["error"]
    assert arms["g1"]["generated"] == arms["g6"]["generated"] == 12
    assert arms["g1"]["scored"] == arms["g6"]["scored"] == 12
    results = load_results(f"s3://{s3_bucket}/eval")
    by_name = {a.name: a for a in results.arms}
    g1, g6 = by_name["g1"], by_name["g6"]
    # Scores for every image, with the scorer's weights hash; the manifests are untouched (no score column).
    for arm in (g1, g6):
        assert len(arm.rows) == 12 and all(set(r["scores"]) == {"clip_score", "aesthetic"} for r in arm.rows)
        scores = read_scores(arm.output)
        assert len(set(scores.column("weights_sha256").to_pylist())) == 3  # clip, aesthetic, features
        assert all(len(h) == 64 for h in scores.column("weights_sha256").to_pylist())
    # Paired noise: the same prompt x seed has the same id and seed in both arms, and the two images (guidance
    # 1 and 6 on a 2-step random model) are nearly the same picture; a different seed gives a different one.
    images = {(arm.name, r["id"]): (r, decode(open_storage(arm.output).get(r["image_uri"].rsplit("/eval/arms/"
              + arm.name + "/", 1)[1]))) for arm in (g1, g6) for r in arm.rows}
    for row in g1.rows:
        base_row, base = images[("g1", row["id"])]
        pair_row, pair = images[("g6", row["id"])]
        assert pair_row["seed"] == base_row["seed"] and pair_row["guidance_scale"] == 6.0
        other_seed = row["id"][: row["id"].rfind("/s")] + ("/s11" if row["seed"] == 3 else "/s3")
        _, unpaired = images[("g6", other_seed)]
        paired_r = np.corrcoef(base.ravel(), pair.ravel())[0, 1]
        unpaired_r = np.corrcoef(base.ravel(), unpaired.ravel())[0, 1]
        assert paired_r > 0.9 and unpaired_r < 0.5, (row["id"], paired_r, unpaired_r)
    # Statistics: per arm and per category, paired differences against the baseline, FID/KID per arm.
    root = open_storage(f"s3://{s3_bucket}/eval")
    summary = json.loads(root.get("_eval/stats/summary.json"))
    keys = {(s["arm"], s["category"], s["metric"]) for s in summary}
    for arm in ("g1", "g6"):
        for category in ("*", "animals", "colour", "counting"):
            assert (arm, category, "clip_score") in keys
    g6_all = next(s for s in summary if s["arm"] == "g6" and s["category"] == "*" and s["metric"] == "clip_score")
    assert g6_all["prompts"] == 6 and g6_all["images"] == 12
    assert g6_all["ci_low"] <= g6_all["mean"] <= g6_all["ci_high"] and g6_all["diff_ci_low"] <= g6_all["diff"]
    sets = json.loads(root.get("_eval/stats/sets.json"))
    assert set(sets) == {"g1", "g6"} and sets["g1"]["reference_images"] == 10 and sets["g1"]["fid"] > 0
    # The report, under the s3 prefix: a row per arm (the failed one too) and a thumbnail per image.
    html = root.get("report/index.html").decode()
    assert html.count("<tr class='arm'") == 3 and "failed" in html
    assert len(list(root.list("report/thumbs/"))) == 24

    second = run_eval(spec)

    arms = {a["name"]: a for a in second["arms"]}
    assert arms["g1"]["generated"] == arms["g6"]["generated"] == 0
    assert arms["g1"]["scored"] == arms["g6"]["scored"] == 0
    assert arms["broken"]["status"] == "failed"


def test_bad_scoring_inputs_fail_before_any_work(s3_bucket, tiny_model_dir, tiny_scorers, tmp_path):
    empty = tmp_path / "empty_reference"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    prompts_file = tmp_path / "things.txt"
    prompts_file.write_text("a red teapot\n")
    tree = eval_tree(s3_bucket, tiny_model_dir, tiny_model_dir, tiny_scorers, str(tiny_scorers["clip"]), str(empty),
                     prompts_file)
    with pytest.raises(JobConfigError, match=r"`scoring.fid.reference` '.*empty_reference' holds no images"):
        run_eval(parse_eval_spec(tree))
    tree["scoring"]["clip"] = str(tmp_path / "no_such_clip")
    with pytest.raises(JobConfigError, match=r"`scoring.clip` '.*no_such_clip' does not exist"):
        run_eval(parse_eval_spec(tree))
    tree["scoring"]["clip"] = f"s3://{s3_bucket}/no/such/clip"
    with pytest.raises(JobConfigError, match=r"`scoring.clip` 's3://.*/no/such/clip' does not exist"):
        run_eval(parse_eval_spec(tree))
    # Nothing was written: the checks ran before the prompt table, the arms and Ray.
    assert list(open_storage(f"s3://{s3_bucket}/eval").list()) == []


def test_ready_eval_spec_expands_to_valid_arm_jobs():
    from batchgen.eval.arms import build_arms
    from batchgen.eval.spec import load_eval_spec
    from tests.jobs import REPO

    spec = load_eval_spec(REPO / "jobs" / "eval_models.yaml")
    arms = build_arms(spec)
    assert [a.name for a in arms][:3] == ["stable-diffusion-v1-5-g3", "stable-diffusion-v1-5-g5",
                                          "stable-diffusion-v1-5-g7.5"]
    assert spec.baseline in [a.name for a in arms] and len(arms) == 6
    job = arms[4].job
    assert job.model.source == "s3://batchgen-models/sd15-finetune" and job.sampling.guidance_scale == 5.0
    assert job.sampling.scheduler == "dpmpp_2m_karras" and job.sampling.num_images == 1
    assert job.output.uri == "s3://batchgen-eval/evals/sd15-vs-ft/arms/sd15-finetune-g5"
    assert job.input.prompts == "s3://batchgen-eval/evals/sd15-vs-ft/_eval/prompts.parquet"


def test_bad_eval_specs_name_the_field(tmp_path):
    base = {"output": str(tmp_path / "e"), "prompts": [{"name": "p", "prompts": ["a fox"]}], "seeds": [0],
            "arms": {"grid": {"guidance_scale": [1.0, 2.0]}}}
    with pytest.raises(JobConfigError, match=r"`arms.grid` .*unknown axis 'cfg'"):
        parse_eval_spec({**base, "arms": {"grid": {"cfg": [1]}}})
    from batchgen.eval.arms import build_arms

    with pytest.raises(JobConfigError, match=r"`baseline` must name an arm .* but is 'g9'"):
        build_arms(parse_eval_spec({**base, "baseline": "g9"}))
    with pytest.raises(JobConfigError, match=r"arm 'g1'.*sampling.scheduler"):
        build_arms(parse_eval_spec({**base, "job": {"sampling": {"scheduler": "nope"}}}))


def test_a_grown_sweep_keeps_every_existing_row(tmp_path):
    """Adding prompts, seeds and arms leaves every existing (id, prompt, seed) row as it was, so each arm's job
    resumes and generates only the new rows; a new arm is a new output."""
    from batchgen.eval.arms import build_arms, prompt_table

    base = {"output": str(tmp_path / "e"), "seeds": [0, 1],
            "prompts": [{"name": "p", "prompts": ["a fox", "an owl"]}],
            "arms": {"grid": {"guidance_scale": [1.0, 2.0]}}}
    grown = {**base, "seeds": [0, 1, 5], "prompts": [{"name": "p", "prompts": ["a fox", "an owl", "a cat"]},
                                                       {"name": "q", "prompts": ["a teapot"]}],
             "arms": {"grid": {"guidance_scale": [1.0, 2.0, 4.0]}}}
    before = prompt_table(parse_eval_spec(base)).select(["id", "prompt", "seed"]).to_pylist()
    after = prompt_table(parse_eval_spec(grown)).select(["id", "prompt", "seed"]).to_pylist()
    assert len(after) == 3 * 3 + 1 * 3
    assert all(row in after for row in before)
    old_arms = {a.name: a.job for a in build_arms(parse_eval_spec(base))}
    new_arms = {a.name: a.job for a in build_arms(parse_eval_spec(grown))}
    assert all(new_arms[name] == job for name, job in old_arms.items())  # same output, same settings
    assert set(new_arms) - set(old_arms) == {"g4"}
