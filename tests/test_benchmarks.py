"""The U-Net call benchmark (benchmarks/unet_speed.py) runs end to end on a tiny config and writes every field.

No timing assertions: only that the measurements exist, are consistent, and that sparse calls on the recorded
input return the recorded output.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """The module of `benchmarks/<name>.py` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_benchmark(name: str, argv: list[str]) -> dict:
    """`main(argv)` of `benchmarks/<name>.py`, with torch's thread count restored after it."""
    threads = torch.get_num_threads()
    try:
        return _benchmark(name).main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_script_shadows_no_installed_module(script):
    """`python benchmarks/<script>.py` puts benchmarks/ first on sys.path: a script named like an installed module
    (transformers imports the `kernels` package) would be imported in its place, and every benchmark would fail."""
    assert importlib.util.find_spec(script) is None, (
        f"benchmarks/{script}.py has the name of an installed module: rename it")


@pytest.fixture(scope="module")
def unet_speed():
    return _benchmark("unet_speed")


@pytest.fixture(scope="module")
def result(unet_speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    result = unet_speed.main([
        "--size", "tiny", "--latent-size", "32", "--device", "cpu", "--repeats", "3", "--warmup", "0",
        "--masks", "ellipse:15,blobs:15", "--profile", "--out", str(out), "--quiet",
        "--block-size", "8",  # fixed: at 32x32 the cost model may keep every resolution dense (one block)
        "--max-sparse-downscale", "4",  # 4x4 dense: the profile covers a dense resolution too
        "--threads", "1",  # one thread: no timing is checked, and one thread suffers least from a busy machine
    ])
    assert torch.get_num_threads() == threads  # restored
    return result


def test_writes_json_and_markdown(result):
    paths = result["paths"]
    assert Path(paths["json"]).name.startswith("cpu-") and Path(paths["markdown"]).suffix == ".md"
    on_disk = json.loads(Path(paths["json"]).read_text())
    assert on_disk["masks"] == json.loads(json.dumps(result["masks"]))
    markdown = Path(paths["markdown"]).read_text()
    assert "| ellipse:15" in markdown and "| blobs:15" in markdown
    assert "### Per resolution" in markdown and "### Per layer" in markdown
    # the dense calls are timed again after the masks: the run's drift is reported beside the speed-ups
    after = result["dense_after"]
    assert len(after["seconds_all"]) == result["config"]["repeats"] and after["seconds"] > 0
    assert after["drift"] == pytest.approx(after["seconds"] / result["dense"]["seconds"] - 1)
    assert "Dense calls again after the masks" in markdown


def test_fields(result):
    config, machine = result["config"], result["machine"]
    assert (config["arch"], config["size"], config["latent_size"], config["batch"]) == ("sd2", "tiny", 32, 2)
    assert config["dtype"] == "fp32" and config["threads"] == 1 and config["policy"]["block_size"] == 8
    for key in ("torch", "cpu_count", "device_name", "date", "loadavg_at_start", "loadavg_at_end"):
        assert key in machine, key
    assert machine["torch"] == torch.__version__

    dense = result["dense"]
    assert dense["macs"] > 0 and dense["seconds"] > 0 and len(dense["seconds_all"]) == 3
    record = result["record"]
    assert record["first_call_seconds"] > 0 and math.isfinite(record["compile_seconds"])
    assert set(record["pass_seconds"]) >= {"sparse", "record"}
    assert record["record_vs_eager_max_abs_diff"] <= 1e-5
    assert result["cache_bytes_per_step"] > 0 and result["cache_steps"] == 1

    assert [m["name"] for m in result["masks"]] == ["ellipse:15", "blobs:15"]
    for m in result["masks"]:
        assert abs(m["coverage"] - 0.15) < 0.01, m["coverage"]
        assert 0 < m["sparse_macs"] < dense["macs"]
        assert m["macs_ratio"] == pytest.approx(dense["macs"] / m["sparse_macs"])
        assert m["sparse_seconds"] > 0 and len(m["sparse_seconds_all"]) == 3
        # every timed sparse call follows a dense one: the speed-up is the median ratio of those pairs
        pairs = [d / s for d, s in zip(m["paired_dense_seconds_all"], m["sparse_seconds_all"], strict=True)]
        assert m["speedup_pairs"] == pytest.approx(pairs)
        assert m["speedup"] == pytest.approx(statistics.median(pairs))
        assert m["speedup_fastest"] == pytest.approx(min(m["paired_dense_seconds_all"]) / min(m["sparse_seconds_all"]))
        assert m["speedup_vs_first_dense"] == pytest.approx(dense["seconds"] / m["sparse_seconds"])
        assert m["cpu_time_speedup"] > 0
        assert m["prep_seconds"] > 0 and m["prep_indices"] > 0
        # the direct preparation builds exactly the gather indices that the first sparse call builds
        assert m["indices_built_in_first_call"] == m["prep_indices"]
        assert math.isfinite(m["first_call_extra_seconds"])
        assert set(m["active_fraction"]) == {"32x32", "16x16", "8x8"}  # 4x4 stays dense
        assert m["block_size"]["32x32"] == 8 and m["resolution_mode"]["32x32"] == "sparse"
        assert m["macs_target_met"] is (m["macs_ratio"] >= m["target_macs_ratio"])
    assert result["masks"][1]["components"] > 1  # the blob mask is scattered


def test_render(unet_speed, result, tmp_path):
    copy = tmp_path / "copy.json"
    copy.write_text(Path(result["paths"]["json"]).read_text())
    unet_speed.main(["--render", str(copy)])
    assert copy.with_suffix(".md").read_text() == Path(result["paths"]["markdown"]).read_text()


def test_sparse_output_is_the_recorded_one(result):
    for m in result["masks"]:
        assert m["max_abs_diff"] <= 1e-4, m
        assert m["max_rel_diff"] <= 1e-5, m


def test_profile(result):
    p = result["profile"]
    assert p["mask"] == "ellipse:15"
    # per-node MACs add up to the whole call's
    assert p["macs_sum_dense"] == result["dense"]["macs"]
    assert p["macs_sum_sparse"] == result["masks"][0]["sparse_macs"]
    layers = p["layers"]
    ops = {row["op"] for row in layers}
    assert {"conv3x3", "linear", "attention(self)", "attention(cross)"} <= ops
    assert {row["mode"] for row in layers} <= {"sparse", "one block", "dense"}
    sparse_layers = [row for row in layers if row["mode"] != "dense"]
    assert sparse_layers and all(row["block"] == 8 for row in sparse_layers)
    # every layer is matched with the captured graph's node of the same name
    assert all(row["macs_dense"] is not None and row["seconds_dense"] is not None for row in layers)
    assert all(row["macs_sparse"] <= row["macs_dense"] for row in layers if row["op"].startswith("conv"))
    by_res = {row["resolution"]: row for row in p["per_resolution"]}
    assert by_res["32x32"]["mode"] == "sparse" and by_res["4x4"]["mode"] == "dense"
    assert by_res["32x32"]["block"] == result["masks"][0]["block_size"]["32x32"]
    assert by_res["32x32"]["macs_sparse"] < by_res["32x32"]["macs_dense"]
    assert sum(row["macs_sparse"] for row in p["per_resolution"]) == p["macs_sum_sparse"]
    categories = {row["category"] for row in p["per_category"]}
    assert {"gather/scatter", "conv3x3", "linear", "attention"} <= categories


def test_masks(unet_speed):
    for kind in ("ellipse", "blobs", "stroke"):
        for percent in (5, 15, 30):
            mask = unet_speed.make_mask(kind, percent, 96, seed=1234)
            assert mask.dtype == torch.bool and mask.shape == (96, 96)
            assert abs(mask.float().mean().item() - percent / 100) < 0.002
        assert torch.equal(unet_speed.make_mask(kind, 15, 96, 1234), unet_speed.make_mask(kind, 15, 96, 1234))
    assert unet_speed.connected_components(unet_speed.make_mask("ellipse", 15, 96, 0)) == 1
    stroke = unet_speed.make_mask("stroke", 10, 96, 0)  # one band from the left edge to the right one
    assert unet_speed.connected_components(stroke) == 1 and stroke[:, 0].any() and stroke[:, -1].any()
    rows = stroke.any(dim=1).nonzero()
    assert rows.max() - rows.min() > 30  # it waves


def test_cost_model_block_sizes(unet_speed, tmp_path):
    result = unet_speed.main([
        "--size", "tiny", "--latent-size", "32", "--device", "cpu", "--threads", "1", "--repeats", "3",
        "--warmup", "0", "--masks", "ellipse:5", "--out", str(tmp_path), "--quiet",
    ])
    assert result["config"]["policy"]["block_size"] is None  # the default: the cost model picks block sizes
    assert set(result["cost_model"]["constants"]) == {"layer", "conv", "gemm", "large"}
    assert "maps over 4096 active pixels: layer C128" in Path(result["paths"]["markdown"]).read_text()
    mask = result["masks"][0]
    for res, block in mask["block_size"].items():
        side = int(res.split("x")[0])
        assert side % block == 0
        assert mask["resolution_mode"][res] == ("one block" if block == side else "sparse")
    assert mask["sparse_macs"] <= result["dense"]["macs"] and mask["max_abs_diff"] <= 1e-4
    name = Path(result["paths"]["json"]).name
    assert name.startswith(f"cpu-{unet_speed.cpu_count()}core_sd2-tiny-32-fp32") and "_b" not in name


def test_arguments(unet_speed):
    with pytest.raises(SystemExit):
        unet_speed.parse_args(["--repeats", "2"])
    with pytest.raises(SystemExit):
        unet_speed.parse_args(["--masks", "square:10"])
    args = unet_speed.parse_args(["--arch", "sdxl", "--block-size", "4"])
    assert args.latent_size == 128 and unet_speed.policy_of(args).block_size == 4
    assert unet_speed.policy_of(unet_speed.parse_args(["--block-size", "auto"])).block_size is None


def test_the_vae_decode_benchmark_runs_on_a_tiny_vae(tmp_path):
    data = _run_benchmark("vae_decode", ["--size", "tiny", "--latent-size", "16", "--repeats", "1", "--masks", "5,30",
                                         "--threads", "1", "--out", str(tmp_path)])
    assert (tmp_path / "vae-decode_sd15-tiny-16.json").is_file()
    assert [row["mask_percent"] for row in data["masks"]] == [5, 30]
    for row in data["masks"]:
        assert row["outside_bit_identical"] and 0 < row["recomputed"] < 1
        assert row["macs"] < data["dense"]["macs"] and row["psnr_in_mask"] > row["psnr_in_mask_source"]
    assert data["masks"][0]["recomputed"] < data["masks"][1]["recomputed"]


def test_the_edit_comparison_benchmark_runs_on_a_tiny_pipeline(tmp_path):
    data = _run_benchmark("edit_vs_alternatives", ["--size", "tiny", "--latent-size", "16", "--steps", "4",
                                                   "--reuse", "1,2", "--threads", "1", "--out", str(tmp_path),
                                                   "--no-torch-compile"])  # compiling takes a minute
    runs = data["runs"]
    assert (tmp_path / "edit-vs-alternatives_sd15-tiny-16.md").is_file()
    assert runs["dense"]["seconds"] > 0 and runs["source_run"]["cache_bytes"] > 0
    assert "seconds" in runs["deepcache"] or "not installed" in runs["deepcache"]["skipped"]
    assert runs["ours_reuse1"]["decode_mode"] == "sparse"
    assert runs["dense_onednn"]["psnr_vs_dense"] > 60  # like for like: the same pipeline, another GEMM library
    contenders = [runs[k]["seconds"] for k in ("dense", "deepcache", "dense_onednn", "deepcache_onednn")
                  if "seconds" in runs.get(k, {})]
    assert runs["ours_reuse1"]["speedup_vs_fastest_like_for_like"] == pytest.approx(
        min(contenders) / runs["ours_reuse1"]["seconds"])
    assert runs["ours_reuse2"]["unet_macs"] < runs["ours_reuse1"]["unet_macs"]
    assert math.isfinite(runs["ours_reuse2"]["psnr_in_mask_vs_reference"])
    for run in (runs["source_run"], runs["ours_reuse1"]):  # where the cache lives: a budget, what went to disk
        assert run["cache_tier"]["budget_bytes"] > 0 and run["cache_tier"]["spilled_steps"] >= 0
    if "seconds" in runs["deepcache"]:  # DeepCache and our edit timed again, alternated
        h = runs["head_to_head"]
        assert len(h["deepcache_seconds"]) == len(h["ours_seconds"]) == 2 and h["reuse_interval"] == 1
        assert len(h["deepcache_onednn_seconds"]) == 2 and h["speedup_vs_deepcache_onednn"] > 0
        assert h["speedup_vs_deepcache"] == pytest.approx(
            statistics.median(d / o for d, o in zip(h["deepcache_seconds"], h["ours_seconds"])))
        assert "Head to head, 2 pairs" in (tmp_path / "edit-vs-alternatives_sd15-tiny-16.md").read_text()


def test_the_source_run_benchmark_runs_on_a_tiny_pipeline(tmp_path):
    """Both dense runs, the source run and the alternated rounds are timed; the source run's picture is the dense
    run's up to float rounding (record calls' linear layers may take another library)."""
    data = _run_benchmark("source_run", ["--size", "tiny", "--latent-size", "16", "--steps", "3", "--pairs", "2",
                                         "--out", str(tmp_path)])
    assert (tmp_path / "source-run_sd15-tiny-16.md").is_file()
    assert len(data["source_unet_seconds"]) == 3  # one U-Net call per step (CFG: batch 2)
    pairs = data["alternated_calls"]
    assert len(pairs["dense"]) == len(pairs["record"]) == len(pairs["dense_same_library"]) == 2
    ratios = [r / d for r, d in zip(pairs["record"], pairs["dense"])]
    assert pairs["overhead"] == pytest.approx(statistics.median(ratios) - 1)
    assert data["source_vs_dense_image"]["max_abs_difference"] <= 2
    assert data["cache_bytes"] > 0


def test_the_edit_quality_benchmark_judges_every_contender_on_the_embedded_model(tmp_path):
    data = _run_benchmark("edit_quality", ["--per-type", "2", "--steps", "4", "--types", "colour",
                                           "--set", "mask_dilation=1",  # (the default: results named by it)
                                           "--out", str(tmp_path), "--pictures", str(tmp_path / "pictures")])
    assert (tmp_path / "edit-quality_colour_mask_dilation-1.md").is_file() and data["drawn"] == 2
    assert data["policy_overrides"] == {"mask_dilation": 1}
    assert data["skipped"] + len(data["cases"]) == 2 and data["cases"]  # seed 0: the first source shows its object
    deepcache = importlib.util.find_spec("DeepCache") is not None
    for row in data["cases"]:
        assert set(row) >= {"dense", "p2p_dense", "ours_detected", "ours_gt"}
        assert ("deepcache" in row) == deepcache
        assert row["ours_detected"]["latents_outside_identical"] and row["ours_gt"]["latents_outside_identical"]
        assert row["ours_detected"]["mask_as_unaccelerated"]  # the same control steps detect the same mask
        assert row["ours_detected"]["psnr_vs_unaccelerated_in_region"] > 25  # (measured 29.4 dB)
        assert row["ours_detected"]["psnr_vs_p2p_in_mask"] > 15 and row["ours_gt"]["psnr_vs_p2p_in_mask"] > 15
        assert 0 < row["ours_gt"]["macs"] < row["dense"]["macs"]  # (0: its calls ran another U-Net than its own)
        assert 0 < row["ours_gt"]["ssim_outside"] <= 1 and 0 < row["dense"]["ssim_outside"] <= 1
    assert data["summary"]["colour"]["cases"] == len(data["cases"])
    assert (tmp_path / "pictures" / "colour.png").is_file() and data["cases"][0]["picture"] == "colour.png"
    assert (tmp_path / "pictures" / "edits.png").is_file()


@pytest.mark.slow  # two servers loading the shapes model, a warm-up each: twenty seconds
def test_the_serving_load_benchmark_serves_both_contenders_on_loopback(tmp_path):
    """Two users against each server (fisedit's sessions, dense regenerations): every request answered, the fisedit
    server's sessions evicted and reopened (one in memory), its memory sampled, the comparison computed."""
    pytest.importorskip("fastapi", reason="the HTTP API is an optional extra: pip install 'fisedit-compiler[serve]'")
    data = _run_benchmark("serve_load", ["--users", "2", "--edits", "2", "--steps", "2", "--max-live", "1",
                                         "--out", str(tmp_path)])
    assert (tmp_path / "serve-load_shapes-2u-1live.md").is_file()
    for kind, r in data["contenders"].items():
        assert r["edits"] == 4 and r["generates"] == 2 and not r["failed"] and not r["cut"], kind
        assert r["edit_p50"] <= r["edit_p95"] and r["rss_peak"] > 0
    service = data["contenders"]["fisedit"]["service"]
    assert service["evicted"] > 0 and service["reopened"] > 0 and service["sessions"] == 3  # the warm-up's too
    c = data["comparison"]
    assert c["throughput_ratio"] == pytest.approx(
        data["contenders"]["fisedit"]["edits_per_minute"] / data["contenders"]["dense"]["edits_per_minute"])


def test_the_memory_soak_keeps_a_tiny_session_within_its_stated_bound(tmp_path):
    """The soak's sequence on a tiny pipeline: every phase measured, the bound the session stated kept (its
    headroom is far above a tiny model's needs, so this checks the accounting, not the margin), no spill file left."""
    data = _run_benchmark("memory_soak", ["--arch", "sd15", "--latent-size", "16", "--size", "tiny", "--steps", "4",
                                          "--edits", "1", "--cache-dir", str(tmp_path / "spill"),
                                          "--out", str(tmp_path)])
    assert (tmp_path / "memory-soak_sd15-16-4.md").is_file() and (tmp_path / "memory-soak_sd15-16-4.svg").is_file()
    assert [p["phase"] for p in data["phases"]][:3] == ["generate", "edit (15% mask)", "edit (detected)"]
    assert data["bound_bytes"] == data["bound_base_bytes"] + data["budget_bytes"] + data["calls_bytes"]
    assert data["within_bound"] and data["disk_bytes_after_close"] == 0
    assert all(p["transients"] >= 0 for p in data["phases"])


def test_the_call_memory_benchmark_measures_each_call_kind(tmp_path):
    data = _run_benchmark("call_memory", ["--size", "tiny", "--latent-size", "16", "--steps", "2",
                                          "--out", str(tmp_path)])
    assert (tmp_path / "call-memory_sd15-16.md").is_file()
    peaks = data["call_peak_bytes"]
    assert set(peaks) >= {"record_maps", "sparse"} and all(n > 0 for n in peaks.values())
    assert peaks["sparse"] < peaks["record_maps"]  # a 15% mask's activations
    assert data["sparse_plan_bytes"] > 0 and data["step_record_bytes"] > 0
