"""`export`: write a compressed model in a format other tools load (GGUF, compressed-tensors, OpenVINO IR).

The model is named the way a cell is: a run record (``--record results/runs/<id>.json``), a
suite and one of its (model, method) groups (``--suite S --group N``; without ``--group`` the
groups are listed), or a model and a method given inline (``--model M --method YAML``). The
model is loaded and compressed (the method's own stored forms, so a quantizer's integer grid
is written as itself where the format can hold it), then written with a manifest beside it
(``<out>.manifest.json``: per tensor, exact or how far it moved). A model the compressed-model
cache holds (``run`` put it there, or an earlier export) is read from it with its stored forms
instead of being compressed again; a model compressed here is kept there for the next run.

Examples::

    benchmark.py export --model smollm2-135m --format gguf --out /tmp/smollm2.gguf
    benchmark.py export --model smollm2-135m --method '{name: rtn, bits: 4, group_size: 32, symmetric: true}' \\
        --format gguf --out /tmp/rtn4.gguf
    benchmark.py export --record results/runs/<id>.json --format compressed-tensors --out /tmp/ct-model
    benchmark.py export --suite configs/quickstart.yaml --group 3 --format openvino --out /tmp/ov
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ("gguf", "compressed-tensors", "openvino")


def cell_from_args(args):
    from slimbench.errors import SuiteError
    from slimbench.sweep.suite import load_suite, suite_from_mapping
    from slimbench.sweep.yaml_limits import load_text

    if args.record:
        rec = json.loads(Path(args.record).read_text())
        model = {k: v for k, v in rec["model"].items() if k in ("name", "revision", "trust_remote_code")}
        doc = {"models": [model],
               "methods": [[{"name": s["name"], **s["params"]} for s in rec["method"]["steps"]]],
               "tasks": ["perplexity"], "hardware": rec.get("hardware", {})}
    elif args.suite:
        suite = load_suite(args.suite, check_models=False)
        groups = {}
        for c in suite.cells():
            groups.setdefault((c.model.model_dump_json(), c.method.model_dump_json()), c)
        cells = list(groups.values())
        if args.group is None or not 0 <= args.group < len(cells):
            lines = [f"  {i}: {c.model.name}  {c.method.label()}" for i, c in enumerate(cells)]
            raise SuiteError("choose one (model, method) group with --group N:\n" + "\n".join(lines),
                             source=args.suite, field="--group")
        return cells[args.group]
    else:
        method = load_text(args.method, "--method") if args.method else "baseline"
        doc = {"models": [args.model], "methods": [method], "tasks": ["perplexity"],
               "hardware": {"threads": args.threads}}
    source = args.record or "the command line (--model / --method)"
    return suite_from_mapping(doc, source, "export", check_models=False).cells()[0]


def refuse_execution_steps(cell) -> None:
    """Export writes weights; an acceleration step (an engine, a compiled graph, a KV cache, a
    generator) changes how the model runs, and an engine step may re-encode the weights in the
    engine's own format. Refused from the chain alone, before the model is loaded or compressed."""
    from slimbench.registry import METHODS

    steps = cell.method.steps
    executing = [s.name for s in steps if s.name in METHODS and METHODS.get(s.name).family == "acceleration"]
    if not executing:
        return
    kept = [{"name": s.name, **s.params} for s in steps if s.name not in executing]
    chain = json.dumps(kept[0] if len(kept) == 1 else kept)  # JSON is YAML: --method takes it as is
    hint = f"; export the compression steps alone: --model {cell.model.name} --method '{chain}'" if kept else ""
    raise SystemExit(f"export: the method chain {cell.method.label()} has execution steps ({', '.join(executing)}), "
                     f"which change how the model runs, not its weights{hint}")


def export_cell(cell, fmt: str, out: Path, args) -> dict:
    from tqdm import tqdm

    from slimbench.methods.quantization.export_grids import int8_layers, linear_grids
    from slimbench.sweep.artifacts import cache as artifacts
    from slimbench.sweep.cellrun import load_and_compress

    artifacts.configure(args.artifacts, disabled=args.no_artifact_cache)
    storage: dict = {}
    lm, report = load_and_compress(cell, tqdm, storage=storage)
    art = report.get("artifact") or {}
    if art.get("reused"):
        print(f"export: the compressed model of artifact-cache entry {art['key']} (not compressed again)")
    elif art.get("saved"):
        print(f"export: compressed now; kept in the artifact cache as {art['key']}")
    if getattr(lm.model, "engine", None) or lm.generator is not None or lm.cache_factory is not None:
        raise SystemExit("export: the method chain ends in an execution step (an engine, a KV cache or a "
                         "generator); export the compression steps alone")
    prov = {"model": cell.model.to_dict(), "method": cell.method.to_record(), "provenance": lm.provenance,
            "execution": report.get("execution"), "artifact": art.get("key") if art.get("reused") else None}
    grids = linear_grids(lm.model, storage)
    if fmt == "gguf":
        from slimbench.engines.export import gguf_export

        return gguf_export.export(lm, out, weights=args.weights, embeddings=args.embeddings, grids=grids,
                                  provenance=prov, progress=tqdm)
    if fmt == "compressed-tensors":
        from slimbench.engines.export import compressed_tensors

        return compressed_tensors.export(lm, out, dtype=args.dtype, grids=grids, int8=int8_layers(lm.model),
                                          provenance=prov)
    from slimbench.engines.export import manifest as mf
    from slimbench.engines.openvino import export_ir, ir_files, ir_weights, unavailable

    if unavailable():
        raise SystemExit(f"export: {unavailable()}")
    facts = export_ir(lm.model, out, grids)
    weights = ir_weights(out / "model.xml")
    manifest = {"format": "openvino-ir", "model": lm.name, "provenance": prov,
                "weights": f"{len(facts['grids'])} linear weights as the method's grid (u4/u8 codes, zero-points, "
                           "fp16 scales), the rest fp32 dense values",
                "export_seconds": facts["export_seconds"] + facts["convert_seconds"], "ir": weights,
                "files": mf.files_entry(ir_files(out / "model.xml"), out),
                "summary": mf.summarize(facts["grids"]), "tensors": facts["grids"]}
    mf.write(out, manifest)
    return manifest


def cmd_export(args: argparse.Namespace) -> int:
    if not (args.record or args.suite or args.model):
        raise SystemExit("export: name the model with --record, --suite or --model")
    out = Path(args.out)
    if out.exists():  # before any model is loaded or compressed
        raise SystemExit(f"export: --out {out} exists; choose a new path")
    cell = cell_from_args(args)
    refuse_execution_steps(cell)
    from slimbench.engines.export.gguf_meta import ExportRefused

    try:
        manifest = export_cell(cell, args.format, out, args)
    except ExportRefused as exc:
        raise SystemExit(f"export: {exc}") from None
    summary = manifest.get("summary", {})
    print(f"wrote {out} ({args.format}); manifest {out.name}.manifest.json")
    if summary:
        print(f"  tensors: {summary['exact']} of {summary['tensors']} bit-exact; approximated {summary['approximated']}"
              + (f"; re-quantized: {len(summary['requantized'])}" if summary.get("requantized") else ""))
    return 0


def register(sub) -> None:
    s = sub.add_parser("export", help="write a compressed model as GGUF, compressed-tensors or OpenVINO IR",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--format", choices=FORMATS, required=True)
    s.add_argument("--out", required=True, help="the GGUF file, or the folder (compressed-tensors, openvino)")
    s.add_argument("--record", help="a run record (results/runs/<id>.json): its model and method")
    s.add_argument("--suite", help="a suite file; with --group N, that (model, method) group")
    s.add_argument("--group", type=int, help="index of the (model, method) group in --suite (omit to list them)")
    s.add_argument("--model", help="a registered model, hub id or folder (with --method, default baseline)")
    s.add_argument("--method", help="a method as YAML: 'rtn' or '{name: rtn, bits: 4}' or a list of steps")
    s.add_argument("--threads", type=int, default=1, help="torch threads while compressing (with --model)")
    s.add_argument("--weights", default="auto", help="GGUF type of the linear weights: auto, F32, F16, BF16, "
                                                   "Q8_0, Q4_0, Q4_1 (auto: the method's grid where exact)")
    s.add_argument("--embeddings", default="auto", help="GGUF type of the embedding / output projection")
    s.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="compressed-tensors: dtype of dense tensors and scales")
    s.add_argument("--artifacts", help="the compressed-model cache to reuse and fill (default: as `run`)")
    s.add_argument("--no-artifact-cache", action="store_true", help="compress again; keep nothing")
    s.set_defaults(fn=cmd_export)
