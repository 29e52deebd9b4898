"""Graph dumps: every variant of every compiled input signature, before and after each pass, as files to open.

Enabled by `Policy(dump_dir=...)` or the environment variable ``FISEDIT_DUMP_DIR``; `build_variants` then writes,
for each input signature it compiles, a folder ``<dump_dir>/<signature>/``:

    00_captured.{dot,svg,json}                 the captured ATen graph, before any pass
    sparse/01_annotate_spatial_layout.{...}     the graph after each pass of the sparse pipeline, in order
    record/01_....{...}, control/...            the same for the other variants
    index.html                                  a table of all of them in pass order, with links

and ``<dump_dir>/index.html`` lists the signatures. A DOT file is the graph as networkx holds it (written with
pydot): one box per fx node labelled with its op, shape, resolution, sparse or dense, block size and an estimate
of its dense MACs; sparse regions are clusters; gathers, scatters and record taps are coloured. The SVG is
rendered by Graphviz's ``dot`` where it is on PATH (``apt-get install graphviz``); without it the DOT files are
still written and one log line says so. The JSON has what the pass did: rewrites, nodes added and removed, op
counts before and after. See docs/dumps.md.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from . import environment
from .ir.signature import InputSignature
from .ir import LAYOUT, REGION, SPARSE, SpatialLayout, latent_input
from .passes import ops
from .passes.manager import PassRecord, op_counts, target_name
from .policy import Policy
from .runtime.mask_plan import MaskPlan

log = logging.getLogger("fisedit_compiler.dump")

DUMP_DIR_ENV = environment.DUMP_DIR
SVG_ENV = environment.DUMP_SVG  # "0": write DOT and JSON only, even where Graphviz is installed
DOT_TIMEOUT_S = 120  # `dot` takes minutes on a full-size U-Net's few thousand nodes; give up on one graph then

# Runtime ops by role, matched by function name so that ops added later to ir.ops colour by their name too.
GATHER_OPS = {"gather_active", "gather_windows"}
SCATTER_OPS = {"scatter_into_recorded"}
COLOURS = {
    "gather": "#9ecae1",  # blue: a region reads pixels (entry, conv windows)
    "scatter": "#fdae6b",  # orange: a region's result is written over the recorded tensor
    "record": "#a1d99b",  # green: the record variant saves a tensor or GroupNorm statistics
    "sparse": "#fff2a8",  # yellow: computes on gathered blocks
    "dense": "#ffffff",
    "input": "#e0e0e0",
}
LEGEND = ("blue: gathers   orange: scatters   green: record taps   yellow: sparse   white: dense   "
          "dashed boxes: sparse regions   MACs: estimated from dense shapes")


def dump_root(policy: Policy) -> Path | None:
    """Where graph dumps go: `policy.dump_dir`, else $FISEDIT_DUMP_DIR (`environment.current()`), else None (no
    dumps)."""
    root = getattr(policy, "dump_dir", None) or environment.current().dump_dir
    return Path(root) if root else None


# --- the graph as networkx ------------------------------------------------------------------------------------


def short_op(node: fx.Node) -> str:
    """``conv2d`` for ``aten.conv2d.default``, the function name for runtime ops, the node kind otherwise."""
    if node.op == "call_function":
        name = target_name(node.target)
        if name.startswith("aten."):
            name = name[len("aten."):]
        return name.removesuffix(".default")
    return {"placeholder": "input", "get_attr": "parameter", "output": "output"}.get(node.op, node.op)


def node_shape(node: object, gm: fx.GraphModule | None = None) -> tuple[int, ...] | None:
    """The dense shape of a node's tensor value: from capture's fake tensor, the layout annotation, or (for
    parameters) the attribute itself. None for non-tensor values."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape)
    layout = node.meta.get(LAYOUT)
    if isinstance(layout, SpatialLayout):
        return tuple(layout.shape)
    if node.op == "get_attr" and gm is not None:
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            value = getattr(gm, str(node.target), None)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return None


_MATMULS = {ops.aten.mm.default, ops.aten.bmm.default, ops.aten.matmul.default, ops.aten.addmm.default,
            ops.aten.baddbmm.default}


def estimate_macs(node: fx.Node, gm: fx.GraphModule | None = None) -> int | None:
    """Dense multiply-accumulates of a node from its shapes, for the ops that dominate a U-Net (convolution,
    linear, attention, matmuls); None for other ops or unknown shapes. A sparse node's real count is this times
    the fraction of its map that a mask activates (with halo), which is only known at run time."""
    if node.op != "call_function":
        return None
    out = node_shape(node, gm)
    target = node.target
    name = getattr(target, "__name__", "")
    try:
        if target is ops.CONV or name == "conv_windows":
            weight = node_shape(node.args[1], gm)
            return math.prod(out) * math.prod(weight[1:])
        if target is ops.aten.linear.default:
            return math.prod(out) * node_shape(node.args[1], gm)[-1]
        if target is ops.SDPA or name == "active_query_attention":
            q, k, v = (node_shape(a, gm) for a in node.args[:3])
            return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
        if target in _MATMULS:
            return math.prod(out) * node_shape(node.args[-1], gm)[-2]
    except (TypeError, IndexError):  # a shape we could not find: no estimate rather than a wrong one
        return None
    return None


def format_count(n: int) -> str:
    """``1.2M`` for 1234567."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def latent_resolution(gm: fx.GraphModule) -> tuple[int, int] | None:
    try:
        shape = node_shape(latent_input(gm))
    except ValueError:
        return None
    return (shape[-2], shape[-1]) if shape and len(shape) == 4 else None


def block_sizes(gm: fx.GraphModule, policy: Policy):
    """res -> block side, by the rule the mask plan applies at run time (a plan of an empty mask asks it), or None
    where the side is not known when compiling: the cost model (`Policy.block_size=None`) picks it per mask."""
    latent = latent_resolution(gm)
    if latent is None or policy.block_size is None:
        return lambda res: None
    plan = MaskPlan(torch.zeros(latent, dtype=torch.bool), policy)
    return plan.block_size


def _role(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        return "input"
    name = getattr(node.target, "__name__", "")
    if name in GATHER_OPS:
        return "gather"
    if name in SCATTER_OPS:
        return "scatter"
    if name.startswith("record") or name == "group_norm_recording_stats":
        return "record"
    return "sparse" if node.meta.get(SPARSE) else "dense"


def to_networkx(gm: fx.GraphModule, policy: Policy, title: str = "") -> nx.DiGraph:
    """One networkx node per fx node (named like it), edges from inputs to users, with Graphviz attributes.

    Node attributes besides the drawing ones, each left out where it has no value: ``op``, ``tensor_shape``,
    ``res``, ``sparse`` ("sparse" or "dense", once `find_sparse_regions` has decided), ``block``, ``macs`` (the
    dense estimate), ``region``."""
    block_of = block_sizes(gm, policy)
    graph = nx.DiGraph(name=title)
    graph.graph["graph"] = {
        "rankdir": "TB", "fontname": "Helvetica", "labelloc": "t", "label": f"{title}\\n{LEGEND}",
        # Bounded crossing minimisation and straight edge segments: `dot` lays out a tiny U-Net's ~1300 nodes in
        # about a second with these, and needs minutes without.
        "nslimit": "1", "nslimit1": "1", "mclimit": "0.2", "remincross": "false", "splines": "polyline",
    }
    graph.graph["node"] = {"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "9"}
    graph.graph["edge"] = {"arrowsize": "0.5", "color": "#777777"}
    for node in gm.graph.nodes:
        shape = node_shape(node, gm)
        layout = node.meta.get(LAYOUT)
        res = getattr(layout, "res", None)
        # sparse or dense is decided by find_sparse_regions, and only means something for nodes with pixels
        sparse = {True: "sparse", False: "dense"}.get(node.meta.get(SPARSE), "") if res is not None else ""
        block = block_of(res) if sparse == "sparse" and res is not None else None
        macs = estimate_macs(node, gm)
        lines = [node.name] if node.name == short_op(node) else [node.name, short_op(node)]
        if shape is not None:
            lines.append(str(list(shape)))
        where = []
        if res is not None:
            where.append(f"{getattr(layout, 'kind', '?')}@{res[0]}x{res[1]}")
        if sparse:
            where.append(sparse + (f" b{block}" if block else ", block per mask" if sparse == "sparse" else ""))
        if where:
            lines.append(" ".join(where))
        if macs:
            lines.append(f"MACs {format_count(macs)}" + (" dense → x active area" if sparse == "sparse" else ""))
        role = _role(node)
        attrs = {
            "label": "\\n".join(lines),  # DOT's line break escape
            "tooltip": f"{node.op} {target_name(node.target) if node.op == 'call_function' else node.target}",
            "fillcolor": COLOURS[role],
            "op": short_op(node),
            # not `shape`: that is Graphviz's attribute for the node's outline
            "tensor_shape": str(list(shape)) if shape is not None else "",
            "res": f"{res[0]}x{res[1]}" if res is not None else "",
            "sparse": sparse,
            "block": str(block or ""),
            "macs": str(macs or ""),
            "region": str(node.meta.get(REGION, "")) if node.meta.get(SPARSE) else "",
        }
        if role == "input":
            attrs.update(fontsize="7", style="filled")
        if node.op == "output":
            attrs.update(shape="doubleoctagon")
        graph.add_node(node.name, **{k: v for k, v in attrs.items() if v != ""})  # smaller files, faster to parse
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def write_dot(graph: nx.DiGraph, path: Path) -> None:
    """Write `graph` as DOT with pydot, drawing nodes that share a ``region`` attribute as one cluster.

    Every node is declared with its attributes at the top level; a cluster only names its members, so
    `networkx.nx_pydot.read_dot` reads every node back with its attributes."""
    import pydot  # here, not at the top: only dumps need it, and it costs an import of pyparsing

    dot = nx.nx_pydot.to_pydot(graph)
    regions: dict[str, list[str]] = {}
    for name, data in graph.nodes(data=True):
        if data.get("region"):
            regions.setdefault(data["region"], []).append(name)
    for region, members in sorted(regions.items(), key=lambda item: int(item[0])):
        cluster = pydot.Cluster(f"region_{region}", label=f"sparse region {region}", style="dashed",
                                color="#c08000", fontsize="10")
        for name in members:
            cluster.add_node(pydot.Node(name))
        dot.add_subgraph(cluster)
    path.write_text(dot.to_string(), encoding="utf-8")


def find_dot() -> str | None:
    """The Graphviz `dot` program, if installed."""
    return shutil.which("dot")


def render_svg(dot_path: Path) -> Path | None:
    """Render a DOT file to SVG next to it with Graphviz; None when that is not possible (no Graphviz, or SVGs
    switched off), or (and a log line) when Graphviz failed or took longer than `DOT_TIMEOUT_S`."""
    if not environment.current().dump_svg:
        return None
    program = find_dot()
    if program is None:
        return None
    svg = dot_path.with_suffix(".svg")
    try:
        subprocess.run([program, "-Tsvg", str(dot_path), "-o", str(svg)], check=True, capture_output=True,
                       timeout=DOT_TIMEOUT_S)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        log.warning("graph dumps: Graphviz could not render %s: %s", dot_path.name, e)
        return None
    return svg


# --- one signature's dumps --------------------------------------------------------------------------------------


def signature_folder(signature: InputSignature) -> str:
    """A readable, stable folder name: the latents' shape and a hash of the whole signature."""
    sample = next((shape for name, shape, *_ in signature.tensors if name == "['sample']"), None)
    digest = hashlib.sha1(repr(signature.tensors).encode()).hexdigest()[:8]
    return ("sample_" + "x".join(map(str, sample)) + "-" if sample else "") + digest


class GraphDump:
    """Writes the graphs of one input signature as its variants are built; `build_variants` drives it:

        dump = GraphDump.for_inputs(policy, inputs)      # None when dumps are off
        dump.captured(captured)                          # before the first pass
        PassManager(..., observers=[dump])               # after each pass: dump(record, gm)
        dump.finish()                                    # the HTML indexes
    """

    def __init__(self, root: Path, signature: InputSignature, policy: Policy):
        self.root = Path(root)
        self.signature = signature
        self.policy = policy
        self.folder = self.root / signature_folder(signature)
        self.entries: list[dict[str, Any]] = []  # one per written graph, in pass order
        self._names: dict[str, set[str]] = {}  # per variant: node names of its last graph
        self._captured_names: set[str] = set()
        # until Graphviz fails or times out once (the other graphs of the signature are as large), if asked for
        self._svg = policy.dump_svg and environment.current().dump_svg
        if self._svg and find_dot() is None:  # one notice per signature dumped
            log.info("graph dumps: Graphviz `dot` is not on PATH, writing DOT without SVG (apt-get install graphviz)")
            self._svg = False

    @staticmethod
    def for_inputs(policy: Policy, inputs: dict[str, Any]) -> GraphDump | None:
        root = dump_root(policy)
        return None if root is None else GraphDump(root, InputSignature.of(inputs), policy)

    def _write(self, gm: fx.GraphModule, stem: Path, title: str, summary: dict[str, Any]) -> dict[str, Any]:
        stem.parent.mkdir(parents=True, exist_ok=True)
        dot_path = stem.with_suffix(".dot")
        write_dot(to_networkx(gm, self.policy, title), dot_path)
        svg = render_svg(dot_path) if self._svg else None
        if svg is None and find_dot() is not None:  # Graphviz failed, timed out or is switched off: stop trying
            self._svg = False
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1, sort_keys=False), encoding="utf-8")
        rel = stem.relative_to(self.folder).as_posix()
        entry = {**summary, "dot": rel + ".dot", "json": rel + ".json", "svg": rel + ".svg" if svg else None}
        self.entries.append(entry)
        return entry

    def captured(self, gm: fx.GraphModule) -> None:
        """Dump the graph as captured, before any pass."""
        self._captured_names = {n.name for n in gm.graph.nodes}
        counts = op_counts(gm)
        summary = {"variant": None, "index": 0, "pass": "captured", "signature": self.signature.describe(),
                   "nodes_after": len(gm.graph.nodes), "ops_after": dict(sorted(counts.items()))}
        self._write(gm, self.folder / "00_captured", "captured", summary)

    def __call__(self, record: PassRecord, gm: fx.GraphModule) -> None:
        """PassManager observer: dump `gm` as it is after the pass `record` describes."""
        variant = getattr(record, "variant", "sparse")
        before = self._names.get(variant, self._captured_names)
        after = {n.name for n in gm.graph.nodes}
        self._names[variant] = after
        index = sum(1 for e in self.entries if e["variant"] == variant) + 1
        changed = {op: [record.ops_before.get(op, 0), record.ops_after.get(op, 0)]
                   for op in sorted(set(record.ops_before) | set(record.ops_after))
                   if record.ops_before.get(op, 0) != record.ops_after.get(op, 0)}
        summary = {
            "variant": variant, "index": index, "pass": record.name, "rewrites": record.rewrites,
            "seconds": round(record.seconds, 4), "nodes_before": record.nodes_before,
            "nodes_after": record.nodes_after, "nodes_added": sorted(after - before),
            "nodes_removed": sorted(before - after), "ops_changed": changed,
            "ops_before": dict(sorted(record.ops_before.items())), "ops_after": dict(sorted(record.ops_after.items())),
        }
        self._write(gm, self.folder / variant / f"{index:02d}_{record.name}", f"{variant} after {record.name}",
                    summary)

    def finish(self) -> Path:
        """Write this signature's index.html and refresh the dump folder's; returns the former."""
        index = self.folder / "index.html"
        index.write_text(_signature_html(self.signature.describe(), self.entries), encoding="utf-8")
        (self.folder / "signature.txt").write_text(self.signature.describe() + "\n", encoding="utf-8")
        (self.root / "index.html").write_text(_root_html(self.root), encoding="utf-8")
        return index


def dump_dynamo_graph(policy: Policy, gm: fx.GraphModule, example_inputs: list) -> Path | None:
    """What the `torch.compile` backend dumps when dynamo hands it a graph (dumps on): the graph as given, before any
    `record()` or `sparse()` call lowers it, in ``<dump_dir>/dynamo-<hash>/`` (`00_captured.*` and `graph.py`, its
    code). A plain call of the compiled model then leaves that much behind. Returns the folder's index."""
    root = dump_root(policy)
    if root is None:
        return None
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    signature = InputSignature.of(dict(zip(names, example_inputs)))
    dump = GraphDump(root, signature, policy)
    dump.folder = dump.root / f"dynamo-{signature_folder(signature)}"
    dump.captured(gm)
    (dump.folder / "graph.py").write_text(gm.print_readable(print_output=False), encoding="utf-8")
    return dump.finish()


# --- HTML ------------------------------------------------------------------------------------------------------

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; } table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; } th { background: #f0f0f0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } code { font-size: 90%; }
</style>"""


def _link(href: str | None, text: str) -> str:
    return f'<a href="{html.escape(href)}">{text}</a>' if href else f'<span style="color:#aaa">{text}</span>'


def _signature_html(signature: str, entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        added, removed = len(e.get("nodes_added", [])), len(e.get("nodes_removed", []))
        rows.append(
            f"<tr><td>{html.escape(str(e['variant'] or ''))}</td><td class=n>{e['index']}</td>"
            f"<td><code>{html.escape(e['pass'])}</code></td><td class=n>{e.get('rewrites', '')}</td>"
            f"<td class=n>{e['nodes_after']}</td><td class=n>{'+%d / -%d' % (added, removed) if 'rewrites' in e else ''}"
            f"</td><td>{_link(e['svg'], 'svg')} {_link(e['dot'], 'dot')} {_link(e['json'], 'json')}</td></tr>"
        )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>fisedit graphs</title>{_STYLE}</head><body>"
        f"<p><a href=\"../index.html\">all signatures</a></p><h1>Graph variants</h1>"
        f"<p>Input signature: <code>{html.escape(signature)}</code></p><p>{html.escape(LEGEND)}</p>"
        "<table><tr><th>variant</th><th>#</th><th>pass</th><th>rewrites</th><th>nodes</th><th>added / removed</th>"
        f"<th>files</th></tr>{''.join(rows)}</table></body></html>\n"
    )


def _root_html(root: Path) -> str:
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "index.html").is_file()):
        sig = folder / "signature.txt"
        described = sig.read_text(encoding="utf-8").strip() if sig.is_file() else ""
        rows.append(f"<li>{_link(folder.name + '/index.html', html.escape(folder.name))}: "
                    f"<code>{html.escape(described[:300])}</code></li>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>fisedit graph dumps</title>{_STYLE}</head>"
            f"<body><h1>Compiled input signatures</h1><ul>{''.join(rows)}</ul></body></html>\n")


def op_count_of(graph: nx.DiGraph) -> Counter:
    """Nodes per ``op`` attribute of a graph made by `to_networkx` or read back from a DOT file."""
    return Counter(data.get("op", "").strip('"') for _, data in graph.nodes(data=True))
