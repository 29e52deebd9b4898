"""Graph dumps and `fisedit inspect`: the files exist for every pass, the DOT files parse back with networkx, and
what they say agrees with the graphs (node counts, op counts, rewrites, regions, MACs).

One `inspect` run on a tiny SD 2 U-Net (which compiles with `Policy(dump_dir=...)`) feeds most tests: compiling
and parsing a U-Net-sized DOT file are the slow parts.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil

import networkx as nx
import pydot
import pytest
import torch
from PIL import Image
from torch import nn

import fisedit_compiler as fisedit
from fisedit_compiler import dump, environment, inspect_cmd
from fisedit_compiler.build import build_variants
from fisedit_compiler.passes.pipelines import sparse_passes

LATENT = 16
POLICY = fisedit.Policy(block_size=4)


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """`fisedit inspect` on a tiny SD 2 U-Net with a mask image at image resolution; returns its output folder."""
    out = tmp_path_factory.mktemp("inspect")
    mask = Image.new("L", (8 * LATENT, 8 * LATENT), 0)
    mask.paste(255, (40, 24, 72, 64))  # image pixels: latents 5..8 x 3..7
    mask.save(out / "mask.png")
    parser = argparse.ArgumentParser()
    inspect_cmd.add_arguments(parser)
    args = parser.parse_args(["--arch", "sd2", "--size", "tiny", "--latent-size", str(LATENT), "--block-size", "4",
                              "--mask", str(out / "mask.png"), "--no-svg", "--out", str(out)])
    summary = inspect_cmd.run(args)
    assert summary["macs_sparse"] < summary["macs_dense"]
    return out


def signature_folder(out):
    (folder,) = [p for p in (out / "graphs").iterdir() if p.is_dir()]
    return folder


def load_json(path):
    return json.loads(path.read_text())


def test_inspect_writes_every_file_it_promises(inspected):
    summary = load_json(inspected / "summary.json")
    for name in summary["files"]:
        assert (inspected / name).is_file(), name
    assert summary["macs_sparse"] < summary["macs_dense"]
    assert summary["replay_max_abs_deviation"] < 1e-4  # contract 2: a sparse call on the recorded input
    assert 0 < summary["mask_fraction"] < 0.2
    rows = list(csv.DictReader(open(inspected / "layers.csv")))
    sparse = [r for r in rows if r["mode"] == "sparse"]
    # blocks of 4, at a map smaller than that the whole map (the policy's largest divisor of its size)
    assert sparse and all(int(r["block"]) == min(4, int(r["resolution"].split("x")[0])) for r in sparse)
    assert all(int(r["macs_sparse"]) < int(r["macs_dense"]) for r in sparse if r["resolution"] == f"{LATENT}x{LATENT}")
    assert "| **total** |" in (inspected / "layers.md").read_text()
    levels = Image.open(inspected / "mask_levels.png")
    assert levels.width > 3 * levels.height  # the mask and one panel per resolution, side by side


def test_dumps_cover_every_pass_of_every_variant_in_order(inspected):
    folder = signature_folder(inspected)
    assert (folder / "00_captured.dot").is_file() and (folder / "00_captured.json").is_file()
    sparse_names = [load_json(p)["pass"] for p in sorted((folder / "sparse").glob("*.json"))]
    assert sparse_names == [p.name for p in sparse_passes(POLICY)]
    html = (folder / "index.html").read_text()
    links = re.findall(r'href="([^"]+\.json)"', html)
    assert links[0] == "00_captured.json"
    for variant in ("sparse", "record"):
        files = sorted(p.relative_to(folder).as_posix() for p in (folder / variant).glob("*.json"))
        assert files and [link for link in links if link.startswith(variant + "/")] == files
        assert all((folder / f).with_suffix(".dot").is_file() for f in files)
    assert folder.name in (inspected / "graphs" / "index.html").read_text()


def test_json_rewrites_match_op_counts(inspected):
    folder = signature_folder(inspected)
    gn = load_json(folder / "sparse" / "04_cached_group_norm.json")
    assert gn["pass"] == "cached_group_norm" and gn["rewrites"] > 0
    assert gn["ops_after"]["group_norm_recorded_stats"] == gn["rewrites"]
    assert "group_norm_recorded_stats" not in gn["ops_before"]
    assert gn["ops_before"]["aten.group_norm.default"] - gn["ops_after"].get("aten.group_norm.default", 0) == gn["rewrites"]
    taps = load_json(next((folder / "record").glob("*_insert_record_taps.json")))
    assert taps["ops_after"]["record"] + taps["ops_after"]["group_norm_recording_stats"] == taps["rewrites"]
    for path in (folder / "sparse").glob("*.json"):
        step = load_json(path)
        assert step["nodes_after"] - step["nodes_before"] == len(step["nodes_added"]) - len(step["nodes_removed"])


@pytest.mark.filterwarnings("ignore:'setParseAction' deprecated")  # pydot 4.0's parser on pyparsing 3.3
def test_dot_parses_back_with_the_graphs_nodes_regions_and_macs(inspected):
    folder = signature_folder(inspected)
    summary = load_json(folder / "sparse" / "04_cached_group_norm.json")
    (parsed,) = pydot.graph_from_dot_file(str(folder / "sparse" / "04_cached_group_norm.dot"))
    graph = nx.nx_pydot.from_pydot(parsed)  # what nx.nx_pydot.read_dot returns, parsed once
    assert graph.number_of_nodes() == summary["nodes_after"]
    ops = dump.op_count_of(graph)
    assert ops["group_norm_recorded_stats"] == summary["rewrites"]
    assert ops["conv2d"] == summary["ops_after"]["aten.conv2d.default"]
    regions = load_json(folder / "sparse" / "02_find_sparse_regions.json")["rewrites"]
    clusters = [s for s in parsed.get_subgraph_list() if s.get_name().startswith("cluster_")]
    assert len(clusters) == regions > 0
    # dense MACs estimated from shapes in the dump = MACs FlopCounterMode measured on the captured graph
    measured = {r["node"]: int(r["macs_dense"]) for r in csv.DictReader(open(inspected / "layers.csv"))}
    estimated = {n: int(d["macs"].strip('"')) for n, d in graph.nodes(data=True) if "macs" in d}
    assert estimated and all(estimated[n] == measured[n] for n in estimated if n in measured)
    assert {d.get("op") for n, d in graph.nodes(data=True) if n in estimated} >= {"conv2d", "linear"}


# --- dumps of a small graph: switches and Graphviz ----------------------------------------------------------------


class TinyConvNet(nn.Module):
    """Enough of a U-Net for the passes: conv, GroupNorm, SiLU, residual, at the latents' resolution."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, sample, return_dict=True):
        return (self.conv_out(nn.functional.silu(self.norm(self.conv_in(sample)))) + sample,)


def small_build(policy):
    return build_variants(fisedit.UNet2DConditionAdapter(TinyConvNet()), {"sample": torch.randn(1, 4, 8, 8)}, policy)


@pytest.mark.filterwarnings("ignore:'setParseAction' deprecated")
def test_environment_variable_turns_dumps_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FISEDIT_DUMP_SVG", "0")
    monkeypatch.delenv("FISEDIT_DUMP_DIR", raising=False)
    environment.reread()  # the package reads its variables once
    monkeypatch.chdir(tmp_path)  # a dump to a default, relative folder would land here
    written = []
    monkeypatch.setattr(dump.GraphDump, "_write", lambda self, *args: written.append(args))
    small_build(fisedit.Policy())
    assert not written and not list(tmp_path.iterdir())
    monkeypatch.undo()
    monkeypatch.setenv("FISEDIT_DUMP_SVG", "0")
    monkeypatch.setenv("FISEDIT_DUMP_DIR", str(tmp_path))
    environment.reread()  # the package reads its variables once
    variants = small_build(fisedit.Policy())
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (tmp_path / "index.html").is_file() and (folder / "index.html").is_file()
    (last,) = (folder / "sparse").glob(f"{len(variants.passes['sparse']):02d}_*.dot")
    graph = nx.nx_pydot.read_dot(last)
    assert graph.number_of_nodes() == len(variants.sparse.graph.nodes)


def test_without_graphviz_one_notice_and_no_svg(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(dump, "find_dot", lambda: None)
    monkeypatch.delenv("FISEDIT_DUMP_SVG", raising=False)
    environment.reread()  # the package reads its variables once
    with caplog.at_level(logging.INFO, logger="fisedit_compiler.dump"):
        small_build(fisedit.Policy(dump_dir=str(tmp_path)))
    assert [r.message for r in caplog.records if "Graphviz" in r.message] == [
        "graph dumps: Graphviz `dot` is not on PATH, writing DOT without SVG (apt-get install graphviz)"
    ]
    assert list(tmp_path.rglob("*.dot")) and not list(tmp_path.rglob("*.svg"))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed (apt-get install graphviz)")
def test_svg_next_to_every_dot_with_graphviz(tmp_path, monkeypatch):
    monkeypatch.delenv("FISEDIT_DUMP_SVG", raising=False)
    environment.reread()  # the package reads its variables once
    small_build(fisedit.Policy(dump_dir=str(tmp_path)))
    dots = list(tmp_path.rglob("*.dot"))
    assert dots and all(d.with_suffix(".svg").is_file() for d in dots)
    assert "<svg" in dots[0].with_suffix(".svg").read_text()


@pytest.mark.filterwarnings("ignore:'setParseAction' deprecated")
def test_a_plain_backend_call_dumps_the_graph_dynamo_gave(tmp_path, monkeypatch):
    """`torch.compile(model, backend="fisedit")` with FISEDIT_DUMP_DIR set: a plain call (no record() yet) writes
    the graph dynamo handed the backend, its DOT and its code."""
    monkeypatch.setenv("FISEDIT_DUMP_SVG", "0")
    monkeypatch.setenv("FISEDIT_DUMP_DIR", str(tmp_path))
    environment.reread()  # the package reads its variables once
    model = TinyConvNet()
    x = torch.randn(1, 4, 8, 8)
    compiled = torch.compile(model, backend="fisedit")
    with torch.no_grad():
        assert torch.allclose(compiled(x)[0], model(x)[0])
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name.startswith("dynamo-") and (tmp_path / "index.html").is_file()
    graph = nx.nx_pydot.read_dot(folder / "00_captured.dot")
    assert graph.number_of_nodes() > 0 and "conv" in (folder / "graph.py").read_text()
