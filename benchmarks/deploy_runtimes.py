"""R chosen in the runtime a ViT is deployed with: export cost, search cost, and whether R changes.

DeiT-S with random weights (``timm.create_model("deit_small_patch16_224", pretrained=False)``;
latency does not depend on the weights), batch 1, POMT at block 3, one thread, this CPU. In one
process, side by side where it compares timings:

1. export + check (ONNX Runtime vs PyTorch) + OpenVINO IR of POMT at R=56: seconds;
2. the token graph (one export, kept-token axis fixed per n at compile) against a static
   export per n, interleaved in the same runtime: time ratio per n (1.0 = times the same);
3. ``find_r`` in eager PyTorch fp32, PyTorch bf16 and OpenVINO (its default precision, bf16
   on AMX CPUs), with the same accuracy profile: wall time, R, verified speed-up;
4. the full grid in OpenVINO (every n): is OpenVINO's R on a dominated count, and how does
   its verified speed-up compare with the full grid's best R, verified side by side.

Accuracy: the FIXED SYNTHETIC smooth A(n) of ``benchmarks/selection_speed.py`` (random weights
have none to measure). The machine is shared: ratios measured side by side are what to read.

    PYTHONPATH=. python benchmarks/deploy_runtimes.py [--skip-full-grid] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pomt  # noqa: E402
from pomt import Console, Reuse, SearchConfig, Target, Timing, find_r  # noqa: E402
from pomt.deploy.export import export_onnx  # noqa: E402
from pomt.deploy.graphs import RuntimeModel  # noqa: E402
from pomt.deploy.runtimes import compile_onnx  # noqa: E402
from pomt.deploy.targets import Call  # noqa: E402
from pomt.models import token_layout  # noqa: E402
from pomt.offline.grid import full_grid  # noqa: E402
from pomt.offline.profiles import AccuracyPoint, AccuracyProfile  # noqa: E402
from pomt.offline.selection import select_r  # noqa: E402
from pomt.offline.verify import paired_speedups  # noqa: E402
from pomt.timing import interleaved_samples, median_interval, paired_ratio  # noqa: E402
from pomt.weights import weights_fingerprint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_speed import synthetic_accuracy  # noqa: E402


def accuracy_profile(model: torch.nn.Module) -> AccuracyProfile:
    layout = token_layout(model)
    acc = synthetic_accuracy(layout.n_total, layout.prefix)
    return AccuracyProfile(
        model="deit_small_patch16_224", device="synthetic", img_size=(224, 224), n_total=layout.n_total,
        prefix=layout.prefix, points=[AccuracyPoint(n, a, 1024) for n, a in sorted(acc.items())],
        num_samples=1024, num_classes=1000, seed=0, class_balanced=True, dataset="synthetic A(n)",
        weights=weights_fingerprint(model),
    )  # fmt: skip


def dominated(lat: dict[int, float], n: int) -> bool:
    return any(v <= lat[n] for m, v in lat.items() if m > n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--skip-full-grid", action="store_true")
    parser.add_argument("--steps", default="1234", help="which parts to run (e.g. 34)")
    parser.add_argument("--full-grid-time", type=float, default=0.1, help="s per point of the full grid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict = {"machine": "2-core Xeon shared with 3 other engineers' tests; 1 thread"}
    torch.manual_seed(0)
    model = pomt.create_model("deit_small_patch16_224", pretrained=False).eval()
    n_total, layer = 197, 3
    work = Path(tempfile.mkdtemp(prefix="pomt-deploy-bench-"))

    # 1. export + check of one configuration
    if "1" in args.steps:
        export_one(model, work, out, layer)
    graphs = {
        rt: RuntimeModel(model, rt, layer=layer, batch_size=1, workdir=work / rt)
        for rt in ("openvino", "onnxruntime")
    }
    out["token_graph_export_s"] = graphs["openvino"].export_s
    if "2" in args.steps:
        token_graph_vs_static(model, work, out, graphs, layer, n_total)
    if "3" in args.steps or "4" in args.steps:
        ov_search = searches(model, work, out, layer, n_total)
    if "4" in args.steps and not args.skip_full_grid:
        full_grid_check(model, work, out, graphs, ov_search, layer, n_total, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"deploy_runtimes_{args.steps}.json").write_text(
        json.dumps(out, indent=1, default=str) + "\n"
    )


def export_one(model, work, out, layer) -> None:
    start = time.perf_counter()
    with pomt.pruned(model, "pomt", r=56, layer=layer):
        record = export_onnx(model, work / "pomt_r56.onnx", Target(runtime="openvino", batch_size=1))
    out["export_check_ir_s"] = time.perf_counter() - start
    out["export_only_s"] = record.export_s
    out["export_max_abs_diff"] = record.max_abs_diff
    print(f"1. DeiT-S POMT R=56: export {record.export_s:.1f} s, export+check+IR {out['export_check_ir_s']:.1f} s, "
          f"|ORT - torch| {record.max_abs_diff:.2g}")  # fmt: skip


def token_graph_vs_static(model, work, out, graphs, layer, n_total) -> None:
    """2. token graph vs a static export per n, interleaved in each runtime."""
    out["token_graph_vs_static"] = {}
    x = graphs["openvino"]._x
    for n in (112, 111, 141):
        start = time.perf_counter()
        with pomt.pruned(model, "pomt", r=n_total - n, layer=layer):
            static = export_onnx(model, work / f"static_{n}.onnx", example=torch.from_numpy(x))
        export_s = time.perf_counter() - start
        for rt, graph in graphs.items():
            run_static, _ = compile_onnx(static.path, rt, threads=1)
            run_token = graph.session(n)
            feeds = {"x": x}
            token_feeds = feeds | {"kept_tokens": np.zeros(n, np.float32)}
            samples = interleaved_samples(
                {"static": lambda r=run_static, f=feeds: r(f), "token": lambda r=run_token, f=token_feeds: r(f)},
                rounds=40, warmup=5,
            )  # fmt: skip
            ratio = paired_ratio(samples["token"], samples["static"])
            out["token_graph_vs_static"][f"{rt} n={n}"] = {"ratio": ratio, "static_export_s": export_s}
            print(f"2. {rt} n={n}: token graph / static export time ratio {ratio:.3f} (static export {export_s:.1f} s, "
                  f"static {np.median(samples['static']):.2f} ms)")  # fmt: skip


def searches(model, work, out, layer, n_total):
    """3. find_r in each runtime, same accuracy profile (bf16 on a copy: casting back is lossy)."""
    acc_path = work / "accuracy.json"
    accuracy_profile(model).save(acc_path)
    config = SearchConfig()
    out["find_r"] = {}
    for label, target in (
        ("torch fp32", Target(batch_size=1, device="cpu")),
        ("torch bf16", Target(batch_size=1, device="cpu", dtype="bfloat16")),
        ("openvino", Target(runtime="openvino", batch_size=1, device="cpu")),
    ):
        start = time.perf_counter()
        subject = copy.deepcopy(model) if "bf16" in label else model
        search = find_r(subject, None, target, layer=layer, search=config, reuse=Reuse(accuracy_path=acc_path),
                        console=Console(progress=False, log=lambda line: None))  # fmt: skip
        wall = time.perf_counter() - start
        sel = search.selection
        out["find_r"][label] = {
            "wall_s": wall, "r": sel.r, "n_star": sel.n_star, "points": len(search.latency.points),
            "sampling": search.latency.sampling, "precision": search.latency.precision,
            "verified_speedup": sel.measured_speedup, "interval": sel.measured_speedup_interval,
            "unpruned_ms": search.latency.latency_ms[n_total],
        }  # fmt: skip
        print(f"3. find_r {label}: {wall:.1f} s, {len(search.latency.points)} points ({search.latency.sampling}), "
              f"R={sel.r} (n*={sel.n_star}), verified x{sel.measured_speedup}, precision {search.latency.precision}, "
              f"L(N)={search.latency.latency_ms[n_total]:.2f} ms")  # fmt: skip
        if label == "openvino":
            ov_search = search
    fp32 = out["find_r"]["torch fp32"]["wall_s"]
    out["openvino_over_torch_find_r_time"] = out["find_r"]["openvino"]["wall_s"] / fp32
    print(f"3. find_r time openvino / torch fp32: {out['openvino_over_torch_find_r_time']:.2f} (target <= 3)")
    out["acc_path"] = str(acc_path)
    return ov_search


def full_grid_check(model, work, out, graphs, ov_search, layer, n_total, args) -> None:
    """4. the full grid in OpenVINO: dominated? verified against the grid's best R."""
    acc_path, config = Path(out["acc_path"]), SearchConfig()
    if True:
        start = time.perf_counter()
        full = pomt.profile_latency(model, Target(runtime="openvino", batch_size=1), layer=layer, progress=False,
                                    search=SearchConfig(grid=full_grid(2, n_total)),
                                    timing=Timing(min_run_time=args.full_grid_time))  # fmt: skip
        out["full_grid_s"] = time.perf_counter() - start
        lat = full.latency_ms
        out["full_grid_dominated"] = sum(dominated(lat, n) for n in lat)
        best = select_r(full, AccuracyProfile.load(acc_path), alpha=config.alpha)
        n_ov = ov_search.selection.n_star
        out["openvino_n_star_dominated_on_full_grid"] = dominated(lat, n_ov) if n_ov in lat else None
        out["full_grid_n_star"] = best.n_star
        pairs = {}
        for name, n in (("search", n_ov), ("full grid", best.n_star)):
            if n == n_total:
                pairs[name] = (1.0, 1.0, 1.0)
                continue
            samples, _ = paired_speedups(Call(graphs["openvino"].call(n)), Call(graphs["openvino"].call(n_total)),
                                         max_time=3.0, min_pairs=60, groups=6)  # fmt: skip
            pairs[name] = median_interval(samples)
        out["verified_side_by_side"] = {k: list(v) for k, v in pairs.items()}
        full.save(Path(args.out) / "deploy_runtimes_openvino_full_grid.json")
        print(f"4. OpenVINO full grid ({out['full_grid_s']:.0f} s): {out['full_grid_dominated']} of {len(lat)} counts "
              f"dominated; search n*={n_ov} dominated: {out['openvino_n_star_dominated_on_full_grid']}; "
              f"full grid n*={best.n_star}; speed-ups re-verified: search x{pairs['search'][0]:.3f} "
              f"[{pairs['search'][1]:.3f}, {pairs['search'][2]:.3f}], full grid x{pairs['full grid'][0]:.3f} "
              f"[{pairs['full grid'][1]:.3f}, {pairs['full grid'][2]:.3f}]")  # fmt: skip


if __name__ == "__main__":
    main()
