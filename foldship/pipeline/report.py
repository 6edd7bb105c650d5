"""report.json (for machines) and report.md (for people) of a build."""
from __future__ import annotations


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt_int(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, compressed, change) rows shared by report.md and the terminal table."""
    base, comp = report["baseline"], report["compressed"]
    rows = [
        ("params", _fmt_int(base["params"]), _fmt_int(comp["params"]), f"{comp['params'] / base['params']:.3f}x"),
        ("MACs / sample", _fmt_int(base["macs"]), _fmt_int(comp["macs"]), f"{report['mac_ratio']:.3f}x"),
        ("top-1 (ONNX Runtime)", f"{_fmt_pct(base['accuracy'])} ({base['correct']}/{base['total']})",
         f"{_fmt_pct(comp['accuracy'])} ({comp['correct']}/{comp['total']})",
         f"{100 * (comp['accuracy'] - base['accuracy']):+.1f} pt"),
        ("ONNX size", f"{base['onnx']['size_bytes'] / 1024:.0f} KiB", f"{comp['onnx']['size_bytes'] / 1024:.0f} KiB",
         f"{comp['onnx']['size_bytes'] / base['onnx']['size_bytes']:.3f}x"),
    ]
    for backend, batches in base["latency"].items():
        for batch, stats in batches.items():
            c = comp["latency"][backend][batch]
            rows.append((f"{backend} {batch} p50", f"{stats['p50_ms']:.2f} ms", f"{c['p50_ms']:.2f} ms",
                         f"{report['speedup'][backend][batch]:.2f}x speed"))
    return rows


def render_markdown(report: dict) -> str:
    gates = report["gates"]
    verdict = "PASSED" if gates["passed"] else "FAILED: " + ", ".join(g["name"] for g in gates["results"] if not g["passed"])
    lines = [
        f"# foldship build: {report['model']['name']} — {report['method']} at ratio {report['ratio']}",
        "",
        f"**Gates: {verdict}**" if gates["results"] else "**Gates:** none configured",
        "",
        "| metric | baseline | compressed | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    agreement = report["agreement"]
    lines += [
        "",
        f"- Top-1 agreement of compressed with baseline: {_fmt_pct(agreement['top1_agreement'])}; "
        f"ONNX Runtime reproduces PyTorch's top-1 on {report['onnx_parity']['baseline_top1_match']} (baseline) and "
        f"{report['onnx_parity']['compressed_top1_match']} (compressed) of {report['baseline']['total']} images.",
        f"- Speedup achieved as a fraction of the MAC reduction (largest batch, ONNX Runtime): "
        f"{report['speedup_vs_mac_ratio']:.2f}.",
        f"- Repair: {report['repair']}. Groups: {report['groups_policy']} ({report['compression']['groups_compressed']} of "
        f"{len(report['compression']['groups'])} compressed); residual streams {report['residual_streams']}; "
        f"compression took {report['compression']['seconds']:.2f} s.",
        f"- Seed {report['seed']}; data {report['data']['path']} ({report['data']['images']} images).",
    ]
    if gates["results"]:
        lines += ["", "| gate | value | limit | result |", "|---|---:|---:|---|"]
        for g in gates["results"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
            lines.append(f"| {g['name']} | {value} | {g['rule']} {g['limit']} | {'pass' if g['passed'] else 'FAIL'} |")
    env = report["environment"]
    lines += ["", f"Environment: Python {env['python']}, torch {env['packages']['torch']}, onnxruntime "
              f"{env['packages']['onnxruntime']}, {env['cpu']} ({env['cpu_count']} cores)", ""]
    return "\n".join(lines)
