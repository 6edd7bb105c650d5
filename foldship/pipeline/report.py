"""The files a run leaves for people and machines.

``report.json`` (every number), ``report.md`` (a summary read in ten seconds), ``latency.png``
(latency distributions, baseline vs compressed), ``latency_samples.json`` (the raw samples
behind the plot), and, for several run folders, ``sweep.md`` + ``accuracy_vs_size.png``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..files import atomic_path, atomic_write
from ..validators.speed import Speedup, change_text, recorded_speedup
from ..validators.stage import SIDES

PLOT_DPI = 80


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt_int(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def _fmt_size(size_bytes: int) -> str:
    return f"{size_bytes / 1024:.0f} KiB" if size_bytes < 10 * 2**20 else f"{size_bytes / 2**20:.1f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}x" if a is not None and b else "n/a"


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, compressed, change) rows shared by report.md and the terminal table."""
    base, comp = report["baseline"], report["compressed"]
    rows = [
        ("top-1 (ONNX Runtime)", f"{_fmt_pct(base['accuracy'])} ({base['correct']}/{base['total']})",
         f"{_fmt_pct(comp['accuracy'])} ({comp['correct']}/{comp['total']})",
         f"{100 * (comp['accuracy'] - base['accuracy']):+.1f} pt"),
    ]
    before = (report.get("recovery") or {}).get("before")
    if before:
        rows.append((f"top-1 before recovery ({before['backend']})", "",
                     f"{_fmt_pct(before['accuracy'])} ({before['correct']}/{before['total']})",
                     f"{100 * (before['accuracy'] - base['accuracy']):+.1f} pt"))
    if base.get("top5_accuracy") is not None:
        rows.append(("top-5 (ONNX Runtime)", _fmt_pct(base["top5_accuracy"]), _fmt_pct(comp["top5_accuracy"]),
                     f"{100 * (comp['top5_accuracy'] - base['top5_accuracy']):+.1f} pt"))
    rows.append(("top-1 agreement with baseline", "", _fmt_pct(report["agreement"]["top1_agreement"]), ""))
    if "params" in base:
        rows.append(("params", _fmt_int(base["params"]), _fmt_int(comp["params"]), _ratio(comp["params"], base["params"])))
    inputs = side_inputs(report)
    if inputs["baseline"][0] != inputs["compressed"][0]:  # a compressed engine with its own, smaller input
        rows.append(("input (C x H x W)", *("x".join(map(str, inputs[side][0])) for side in SIDES), ""))
    if report.get("mac_ratio") is not None:
        rows.append(("MACs / sample", _fmt_int(base.get("macs")), _fmt_int(comp.get("macs")), f"{report['mac_ratio']:.3f}x"))
    rows.append(("ONNX size", _fmt_size(base["size_bytes"]), _fmt_size(comp["size_bytes"]),
                 _ratio(comp["size_bytes"], base["size_bytes"])))
    for backend, batches in base["latency"].items():
        for batch, stats in batches.items():
            c = comp["latency"].get(backend, {}).get(batch)
            if c is None:
                continue
            rows.append((f"{backend} {batch} p50 / p90 / p99", _percentiles(stats), _percentiles(c),
                         change_text(recorded_speedup(report, backend, batch))))
            rows.append((f"{backend} {batch} throughput", f"{stats['throughput_per_s']:,.0f} /s",
                         f"{c['throughput_per_s']:,.0f} /s", _ratio(c["throughput_per_s"], stats["throughput_per_s"])))
        largest = max(batches, key=lambda k: int(k[5:]))
        base_peak, comp_peak = _stats_peak(batches[largest]), _stats_peak(comp["latency"].get(backend, {}).get(largest))
        if base_peak is not None and comp_peak is not None:
            rows.append((f"{backend} {largest} peak memory", f"{base_peak:.1f} MB", f"{comp_peak:.1f} MB",
                         _ratio(comp_peak, base_peak)))
    return rows


def _percentiles(stats: dict) -> str:
    return f"{stats['p50_ms']:.2f} / {stats['p90_ms']:.2f} / {stats['p99_ms']:.2f} ms"


def _stats_peak(stats: dict | None) -> float | None:
    """The peak memory of a measurement: the GPU allocator's where there is one, else host memory."""
    if not stats:
        return None
    return stats.get("peak_gpu_memory_mb") if stats.get("peak_gpu_memory_mb") is not None else stats.get("peak_memory_mb")


def verdict(report: dict) -> str:
    gates = report["gates"]
    if not gates["results"]:
        return "**Gates:** none configured"
    failed = [g for g in gates["results"] if not g["passed"]]
    if not failed:
        return f"**Gates: PASSED** (all {len(gates['results'])})"
    return "**Gates: FAILED: " + ", ".join(f"{gate_label(g)} ({_fmt_value(g['value'])} "
                                           f"{'>' if g['rule'] == '<=' else '<'} {g['limit']})" for g in failed) + "**"


def gate_label(gate: dict) -> str:
    """A gate's name, with the target machine and backend it judged when it judged one."""
    return gate["name"] + (f" on {gate['target']} ({gate['backend']})" if gate.get("target") else "")


def _fmt_value(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _speedup_line(report: dict) -> str | None:
    speed = report.get("speed")
    if not speed:
        return None
    protocol = report["latency_protocol"]
    spread = (f"speedup interval {speed['low']:.2f}-{speed['high']:.2f} over {speed['blocks']} interleaved rounds "
              f"({100 * speed['confidence']:.0f} % confidence)" if speed.get("low") is not None else
              f"{speed['blocks']} interleaved round(s): too few for an interval")
    return (f"Speed on ONNX Runtime CPU: **{speed['sentence']}** ({spread}; {protocol['threads']} threads).")


def run_title(report: dict) -> str:
    """What the run built: the model, the method, and its ratio or, for a budgeted build, the budget."""
    if report.get("title"):
        return report["title"]
    if "method" not in report:
        return "validation"
    budget = (report.get("compression") or {}).get("budget")
    setting = (f"a {budget['goal']:.2f}x {'MAC' if budget['target'] == 'macs' else 'latency'} budget" if budget
               else f"ratio {report['ratio']}")
    smoke = " (RANDOM WEIGHTS: smoke test, accuracy meaningless)" if report["model"].get("random_weights") else ""
    method = "block removal" if budget and budget.get("removed_blocks") else report["method"]
    return f"{report['model']['name']} — {method} at {setting}{smoke}"


def render_markdown(report: dict) -> str:
    title = run_title(report)
    lines = [f"# foldship: {title}", "", verdict(report), "",
             "| metric | baseline | compressed | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    lines += [""]
    speed = _speedup_line(report)
    if speed:
        lines += [speed, ""]
    if report.get("residual_streams"):
        lines += [f"Repair: {repair_line(report)}. Groups: {report['groups_policy']} "
                  f"({report['compression']['groups_compressed']} of {len(report['compression']['groups'])} "
                  f"compressed); residual streams {report['residual_streams']}; seed {report['seed']}.", ""]
    lines += ["![latency distributions](latency.png)", ""]
    lines += recovery_lines(report.get("recovery"))
    lines += budget_lines((report.get("compression") or {}).get("budget"))
    lines += target_lines(report)
    lines += reconstruction_lines((report.get("compression") or {}).get("reconstruction"))
    if report["gates"]["results"]:
        lines += ["## Gates", "", "| gate | value | limit | result | measures |", "|---|---:|---:|---|---|"]
        for g in report["gates"]["results"]:
            lines.append(f"| {gate_label(g)} | {_fmt_value(g['value'])} | {g['rule']} {g['limit']} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} | {g.get('measures', '')} |")
        lines.append("")
    lines += _artifact_lines(report) + _per_class_lines(report)
    for skipped in report.get("skipped_artifacts", []):
        lines += [f"Not validated: {skipped['name']} ({skipped['reason']}).", ""]
    protocol, env = report["latency_protocol"], report["environment"]
    lines += ["## Protocol and environment", "", *_model_lines(report),
              *_input_lines(report),
              f"- Data: {report['data']['path']} ({report['data']['images']} images)." + calibration_note(report),
              f"- Latency: {protocol['warmup']} warm-up runs, then at least {protocol['min_runs']} runs and "
              f"{protocol['min_seconds']} s per measurement; {protocol['order']}; {protocol['threads']} threads; "
              f"ONNX Runtime optimization {protocol['onnxruntime']['optimization']}, spinning "
              f"{'on' if protocol['onnxruntime']['spinning'] else 'off'}; backends {', '.join(protocol['backends'])}.",
              f"- Environment: Python {env['python']}, torch {env['packages']['torch']}, onnxruntime "
              f"{onnxruntime_version(env)}, {env['cpu']} ({env['cpu_count']} cores)"
              + (f", GPU {env['gpu']['name']}" if env.get("gpu") else "") + "."]
    if report.get("stages"):
        lines.append("- Build time per stage (wall / user CPU / system CPU, s): " + "; ".join(
            f"{t['stage']} {t['wall_s']:.1f} / {t['user_s']:.1f} / {t['sys_s']:.1f}" for t in report["stages"]) + ".")
    return "\n".join(lines + [""])


def recovery_lines(recovery: dict | None) -> list[str]:
    """What recovery did and what it bought: top-1 and agreement before and after, and the loss curve."""
    if not recovery:
        return []
    budget, calibration = recovery["budget"], recovery["calibration"]
    planned = f"{budget['epochs']} epoch(s)" if "epochs" in budget else f"a {budget['minutes']:g}-minute budget"
    lines = ["## Recovery", "",
             f"Label-free distillation ({recovery['method']}) on {recovery['images']:,} unlabelled calibration images "
             f"(of {calibration['path']}'s {calibration['read']:,}; {calibration['dropped_near_copies']:,} dropped as "
             f"near-copies of the evaluation images), {planned}: {recovery['steps']} steps of {recovery['batch']} images "
             f"({recovery['epochs']:g} epochs) in {recovery['seconds']:.0f} s on {recovery['device']} "
             f"({recovery['threads']} threads, {recovery['images_per_second']:,.0f} images/s). "
             f"{recovery['optimizer']}, learning rate {recovery['lr']:g}, {recovery['schedule']}; "
             f"KL divergence at temperature {recovery['temperature']:g}; BatchNorm {recovery['batchnorm']}; "
             f"augmentation: {recovery['augmentation']}; seed {recovery['seed']}.", "",
             "| | top-1 | agreement with baseline | measured on |", "|---|---:|---:|---|"]
    for name in ("before", "after"):
        side = recovery.get(name)
        if side:
            lines.append(f"| {name} recovery | {_fmt_pct(side['accuracy'])} ({side['correct']}/{side['total']}) | "
                         f"{_fmt_pct(side['top1_agreement'])} | {side['backend']} ({side['artifact']}) |")
    return lines + ["", f"![distillation loss]({recovery['plot']})", ""]


def _model_lines(report: dict) -> list[str]:
    """Where a build's model and its weights came from: registry name, the user's code, or a file."""
    if "method" not in report:  # a validation of given files: the sources are listed elsewhere
        return []
    model = report["model"]
    source = model.get("source") or {}
    weights = (f"checkpoint {model['checkpoint']} (sha256 {model['checkpoint_sha256'][:12]})"
               if model.get("checkpoint") else "random weights" if model.get("random_weights") else None)
    kind = source.get("kind")
    if kind == "python":
        origin = (f"factory {source['factory']} of {source['module'] or source['file']} (your own code, "
                  f"sha256 {(source['sha256'] or '?')[:12]}), model_args {source['model_args'] or '{}'}")
    elif kind == "torch.export":
        origin = f"exported program {source['file']} (sha256 {source['sha256'][:12]}), weights inside"
    elif kind == "onnx":
        check = source.get("conversion_check") or {}
        origin = (f"ONNX file {source['file']} (sha256 {source['sha256'][:12]}, opset {source['opset']}), converted "
                  f"by {source['converter']} at opset {source['converted_at_opset']}"
                  + (f", matching ONNX Runtime to {check['max_abs_error']:.2g} on {check['images']} images"
                     if check else "") + "; the baseline is this file as given")
    elif kind:
        origin = f"{source.get('class', model['name'])} (a module built in Python)"
    else:
        origin = model["name"]
    return [f"- Model: {origin}" + (f"; {weights}" if weights else "") + "."]


def side_inputs(report: dict) -> dict[str, tuple[tuple[int, ...] | None, dict | None]]:
    """Each side's input shape and preprocessing (a ``Preprocessing`` as a dict; None: not recorded), as a
    run's report records them: the sides' own ``input`` entries, else the model's for both (reports of
    validated file pairs)."""
    model = report.get("model", {})
    shared = (model.get("input_shape"), model.get("preprocessing"))
    inputs = {}
    for side in SIDES:
        own = (report.get(side) or {}).get("input")
        shape, preprocessing = (own["shape"], own["preprocessing"]) if own else shared
        inputs[side] = (None if shape is None else tuple(shape), preprocessing)
    return inputs


def _input_lines(report: dict) -> list[str]:
    """The compressed engine's own input, where it is not the baseline's (pipeline/inputs.py)."""
    inputs = side_inputs(report)
    if inputs["baseline"] == inputs["compressed"]:
        return []
    described = {side: f"{'x'.join(map(str, shape))} (resize {p['resize']}, crop {p['crop']}, {p['interpolation']})"
                 for side, (shape, p) in inputs.items()}
    return [f"- Input: the compressed engine takes {described['compressed']}, the baseline "
            f"{described['baseline']}: the same pictures, the same part of each; MAC and latency changes compare "
            f"each model at its own input."]


def onnxruntime_version(env: dict) -> str | None:
    """The ONNX Runtime an environment fingerprint records (onnxruntime, or onnxruntime-gpu in its place)."""
    packages = env["packages"]
    return packages.get("onnxruntime") or (f"{packages['onnxruntime-gpu']} (gpu)" if packages.get("onnxruntime-gpu")
                                           else None)


def target_lines(report: dict) -> list[str]:
    """Latency measured on target machines (foldship bench RUN_DIR, merged with validate --latency)."""
    targets = report.get("targets")
    if not targets:
        return []
    lines = ["## Latency on targets", "",
             "Timed on each machine with `foldship bench` (the build's protocol: the models take turns block by "
             "block) and merged from its JSON; the rows above are the build machine's.", "",
             "| target | machine | backend | batch | baseline p50 / p99 ms | compressed p50 / p99 ms | speed |",
             "|---|---|---|---:|---:|---:|---|"]
    for name, entry in targets.items():
        machine = entry["machine"]
        described = (f"{machine['cpu']}, {machine['physical_cores']} cores, {machine['platform']}, onnxruntime "
                     f"{onnxruntime_version(machine)}")
        for backend, sides in entry["latency"].items():
            for key, base in sides["baseline"].items():
                comp = sides["compressed"][key]
                lines.append(f"| {name} | {described} | {backend} | {base['batch']} | {base['p50_ms']:.3f} / "
                             f"{base['p99_ms']:.3f} | {comp['p50_ms']:.3f} / {comp['p99_ms']:.3f} | "
                             f"{change_text(recorded_speedup(entry, backend, key))} |")
    return lines + [""]


def calibration_note(report: dict) -> str:
    """How many calibration images were used, and how many near-copies of evaluation images were left out."""
    calibration = report["data"].get("calibration")
    if not calibration:
        return ""
    return (f" Calibration: {calibration['images']} of {calibration['path']}'s {calibration['read']} images, "
            f"{calibration['dropped_near_copies']} dropped as near-copies of the evaluation images.")


def repair_line(report: dict) -> str:
    """The repair, and the compressed groups it does not apply to (e.g. Fold-AR where no BN follows)."""
    compressed = [g for g in report["compression"]["groups"] if g.get("repair")]
    skipped = [g for g in compressed if "not applicable" in g["repair"]]
    if report["repair"] == "none" or not skipped:
        return report["repair"]
    # a note is "<steps applied>; <step> not applicable: <why>", or "not applicable: <why>" for one step
    reasons = sorted({part.removeprefix("not applicable: ") for g in skipped for part in g["repair"].split("; ")
                      if "not applicable" in part})
    names = ", ".join(g["name"] for g in skipped[:6]) + (", ..." if len(skipped) > 6 else "")
    return (f"{report['repair']} (applied to {len(compressed) - len(skipped)} of {len(compressed)} compressed "
            f"groups; not applicable to {names}: {'; '.join(reasons)})")


def budget_lines(budget: dict | None) -> list[str]:
    """The budgeted plan: what it aimed at, what it reached, and every group it narrowed."""
    if not budget:
        return []
    goal = f"{budget['goal']:.2f}x {'MACs' if budget['target'] == 'macs' else 'latency'}"
    reached = f"{budget['mac_fraction']:.3f}x MACs" + (
        f" (the smaller input alone {budget['input_mac_fraction']:.3f}x)"
        if budget.get("input_mac_fraction", 1.0) < 1.0 else "") + (
        f", {budget['latency_fraction']:.3f}x latency" if budget.get("latency_fraction") is not None else "")
    removed = budget.get("removed_blocks") or []
    sentence = validated_sentence(budget, "**")
    checked = [sentence, ""] if sentence else []  # the latency goal against the build's own timing
    if removed:
        lines = ["## Budget", "",
                 f"Target {goal}, planned {reached} by removing {len(removed)} residual block(s) whole (every channel "
                 f"kept), the least added damage per MAC fraction saved first, measured on {budget['probe']}.", "",
                 "| removed block | share of the baseline's MACs | added damage (KL) |", "|---|---:|---:|"]
        lines += [f"| {b['block']} | {b['mac_share']:.4f} | {b['damage']:.3g} |" for b in removed]
        return lines + [""] + checked
    narrowed = [w for w in budget["widths"] if w["kept"] < w["width"]]
    lines = ["## Budget", "",
             f"Target {goal}, planned {reached}. Damage measured on {budget['probe']} with repair "
             f"{budget['survey_repair']}; {len(narrowed)} of {len(budget['widths'])} surveyed groups narrowed "
             f"(widths multiples of {budget['align']}), the rest kept whole.", "",
             "| group | kind | width | first pass | planned | KL per MAC fraction saved |", "|---|---|---:|---:|---:|---:|"]
    for w in narrowed:
        first = "" if w["first_pass_kept"] is None else w["first_pass_kept"]
        sensitivity = "" if w["sensitivity"] is None else f"{w['sensitivity']:.3g}"
        lines.append(f"| {w['group']} | {w['kind']} | {w['width']} | {first} | {w['kept']} | {sensitivity} |")
    return lines + [""] + checked


def validated_sentence(budget: dict | None, emphasis: str = "") -> str | None:
    """A latency goal against the build's validation timing, when that timing is the kind the plan made
    (``compression.budget.validated``); None otherwise. ``emphasis`` wraps "not met"."""
    check = (budget or {}).get("validated")
    if not check:
        return None
    spread = "" if check["latency_interval"] is None else f" ({'–'.join(f'{v:.2f}' for v in check['latency_interval'])})"
    met = "met" if check["met"] else f"{emphasis}not met{emphasis}"
    return (f"Validation timed the engine at {check['latency_fraction']:.3f}x the baseline's latency{spread} at batch "
            f"{check['batch']} on ONNX Runtime CPU: the {budget['goal']:.2f}x goal is {met} in this timing (the plan's "
            f"last round: {budget['latency_fraction']:.3f}x).")


def reconstruction_lines(section: dict | None) -> list[str]:
    """Layer-wise reconstruction: how many layers were re-solved, on what, and each one's error."""
    if not section:
        return []
    lines = ["## Reconstruction", "",
             f"{section['layers_reconstructed']} of {len(section['layers'])} layers re-solved on {section['images']} "
             f"calibration images ({section['positions_per_image']} sampled positions per image and layer, ridge "
             f"{section['ridge']:g}) in {section['seconds']:.1f} s. Error: {section['error']}.", "",
             "| layer | kind | unknowns per output | positions | error before | error after | result |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in section["layers"]:
        before, after = (f"{v:.4f}" if v is not None else "" for v in (r["error_before"], r["error_after"]))
        lines.append(f"| {r['name']} | {r['kind']} | {r['unknowns']} | {r['positions']} | {before} | {after} | "
                     f"{r['action']} |")
    return lines + [""]


def _artifact_lines(report: dict) -> list[str]:
    lines = ["## Every artifact: accuracy and parity with its source", "",
             "| artifact | precision | size | backend | top-1 | vs | max abs error | tolerance (atol / rtol) | "
             "smallest passing atol / rtol | parity |", "|---|---|---:|---|---:|---|---:|---|---|---|"]
    for entry in report["artifacts"]:
        size = _fmt_size(entry["size_bytes"]) if entry["size_bytes"] else ""
        checks = {c["backend"]: c for c in entry["parity"]}
        for backend, scores in entry["accuracy"].items():
            check = checks.get(backend)
            if check:
                tol, low = check["tolerance"], check["min_tolerance"]
                parity = (f"{check['reference']} | {check['max_abs_logit_error']:.2g} | {tol['precision']}: "
                          f"{tol['atol']:g} / {tol['rtol']:g} | {low['atol']:.2g} / {low['rtol']:.2g} | "
                          f"{'within' if check['within_tolerance'] else '**OUTSIDE**'}")
            else:
                parity = "(reference) | | | |"
            lines.append(f"| {entry['name']} | {entry['precision']} | {size} | {backend} | "
                         f"{_fmt_pct(scores['accuracy'])} | {parity} |")
    return lines + [""]


def _per_class_lines(report: dict, rows: int = 10) -> list[str]:
    base, comp = report["baseline"].get("per_class"), report["compressed"].get("per_class")
    if not base:
        return []
    pairs = [(b, c) for b, c in zip(base, comp) if b["total"]]
    pairs.sort(key=lambda bc: (bc[1]["accuracy"] - bc[0]["accuracy"], bc[0]["class"]))
    shown = pairs[:rows]
    title = "## Per-class top-1" if len(pairs) <= rows else f"## Per-class top-1 ({rows} largest drops)"
    lines = [title, "", "| class | images | baseline | compressed | change |", "|---:|---:|---:|---:|---:|"]
    for b, c in sorted(shown, key=lambda bc: bc[0]["class"]):
        lines.append(f"| {b['class']} | {b['total']} | {_fmt_pct(b['accuracy'])} | {_fmt_pct(c['accuracy'])} | "
                     f"{100 * (c['accuracy'] - b['accuracy']):+.1f} pt |")
    return lines + [""]


def write_report(folder: str | Path, report: dict, latency_samples: dict) -> None:
    """report.json, report.md, latency_samples.json and latency.png into ``folder``."""
    folder = Path(folder)
    atomic_write(folder / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write(folder / "latency_samples.json", json.dumps(latency_samples, separators=(",", ":")) + "\n")
    atomic_write(folder / "report.md", render_markdown(report))
    plot_latency(report, latency_samples, folder / "latency.png")
    if report.get("recovery"):
        plot_recovery(report["recovery"], folder / report["recovery"]["plot"])


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API: no global pyplot state, no display needed

    return Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})


def plot_latency(report: dict, latency_samples: dict, path: str | Path) -> None:
    """One panel per backend and batch: box plots of every timed artifact's samples, p50 and p99 marked."""
    panels = sorted({(backend, batch) for per_backend in latency_samples.values()
                     for backend, batches in per_backend.items() for batch in batches},
                    key=lambda p: (p[0], int(p[1][5:])))
    columns = max(1, len({batch for _, batch in panels}))
    rows = max(1, -(-len(panels) // columns))
    figure = _figure(5.2 * columns, 0.6 + 1.7 * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, (backend, batch) in zip(axes.flat, panels):
        # Baseline on top; reversed because box plots count positions from the bottom.
        names = [n for n in latency_samples if batch in latency_samples[n].get(backend, {})][::-1]
        data = [latency_samples[n][backend][batch] for n in names]
        boxes = ax.boxplot(data, orientation="horizontal", widths=0.6, patch_artist=True,
                           flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": "black"})
        for box, name in zip(boxes["boxes"], names):
            box.set_facecolor("lightgray" if name.startswith("baseline") else "tab:blue" if
                              name.startswith("compressed") else "tab:orange")
        ax.scatter([float(np.percentile(d, 99)) for d in data], range(1, len(data) + 1), marker="|", s=200,
                   color="crimson", zorder=3)
        ax.set_yticks(range(1, len(names) + 1), names)
        if max(max(d) for d in data) > 10 * min(min(d) for d in data):
            ax.set_xscale("log")  # one slow outlier would otherwise squash every box
        speedup = report.get("speedup", {}).get(backend, {}).get(batch)
        ax.set_title(f"{backend}, {batch}" + (f": {change_text(recorded_speedup(report, backend, batch))}" if speedup else ""), fontsize=10)
        ax.set_xlabel("latency per run (ms); box: p25-p75, line: p50, red: p99", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _save(figure, Path(path))


def plot_recovery(recovery: dict, path: str | Path) -> None:
    """The distillation loss (mean over each stretch of steps) against epochs."""
    figure = _figure(5.2, 3.0)
    ax = figure.subplots()
    curve = recovery["loss_curve"]
    ax.plot([p["epoch"] for p in curve], [p["loss"] for p in curve], marker=".", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"KL x T^2 (T = {recovery['temperature']:g})")
    before, after = recovery.get("before"), recovery.get("after")
    scores = "" if not (before and after) else (f": top-1 {100 * before['accuracy']:.1f} -> "
                                                  f"{100 * after['accuracy']:.1f} %")
    ax.set_title(f"distillation on {recovery['images']:,} images{scores}", fontsize=10)
    ax.grid(alpha=0.3)
    _save(figure, Path(path))


def load_run(folder: str | Path) -> dict:
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise BadInput(f"{folder} is not a run folder (no report.json); give folders written by foldship build")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path} is not valid JSON ({exc.msg}); rebuild that run") from None


def write_sweep(run_folders: list[str | Path], out: str | Path) -> dict:
    """Compare several runs (e.g. one per ratio): ``sweep.json``, ``sweep.md`` and ``accuracy_vs_size.png``."""
    runs = []
    for folder in run_folders:
        report = load_run(folder)
        comp, base = report["compressed"], report["baseline"]
        runs.append({
            "folder": str(folder), "model": report.get("model", {}).get("name"), "method": report.get("method"),
            "ratio": report.get("ratio"), "groups_policy": report.get("groups_policy"), "repair": report.get("repair"),
            "baseline_accuracy": base["accuracy"], "accuracy": comp["accuracy"],
            "baseline_size_bytes": base.get("size_bytes", base.get("onnx", {}).get("size_bytes")),
            "size_bytes": comp.get("size_bytes", comp.get("onnx", {}).get("size_bytes")),
            "mac_ratio": report.get("mac_ratio"), "speed": report.get("speed"),
            "top1_agreement": report["agreement"]["top1_agreement"], "gates_passed": report["gates"]["passed"],
        })
    runs.sort(key=lambda r: (str(r["method"]), str(r["repair"]), str(r["groups_policy"]), r["ratio"] or 0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = {"runs": runs}
    atomic_write(out / "sweep.json", json.dumps(sweep, indent=2) + "\n")
    lines = ["# foldship sweep: accuracy vs size", "", "![accuracy vs size](accuracy_vs_size.png)", "",
             "| run | method | repair | groups | ratio | top-1 | baseline | ONNX size | MAC ratio | speed (ONNX Runtime CPU) | agreement |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in runs:
        mac = "n/a" if r["mac_ratio"] is None else f"{r['mac_ratio']:.3f}"
        lines.append(f"| {Path(r['folder']).name} | {r['method']} | {r['repair']} | {r['groups_policy']} | {r['ratio']} | "
                     f"{_fmt_pct(r['accuracy'])} | {_fmt_pct(r['baseline_accuracy'])} | {_fmt_size(r['size_bytes'])} | "
                     f"{mac} | {speed_cell(r['speed'])} | {_fmt_pct(r['top1_agreement'])} |")
    atomic_write(out / "sweep.md", "\n".join(lines) + "\n")
    plot_accuracy_vs_size(runs, out / "accuracy_vs_size.png")
    return sweep


def speed_cell(speed: dict | None) -> str:
    """A report's headline speed for a table cell: the change and, when faster, the share realised."""
    if not speed:
        return "n/a"
    text = change_text(Speedup.from_dict(speed))
    share = speed.get("realised_share")
    return f"{text} at batch {speed['batch']}" + (f", {100 * share:.0f} % of possible"
                                                  if share is not None and speed["verdict"] == "faster" else "")


def plot_accuracy_vs_size(runs: list[dict], path: str | Path) -> None:
    """Top-1 against compressed ONNX size, one line per (method, groups), the baselines as stars."""
    figure = _figure(6.4, 4.2)
    ax = figure.subplots()
    series: dict[str, list[dict]] = {}
    for r in runs:
        label = f"{r['method']} + {r['repair']}, groups {r['groups_policy']}" if r["method"] else "runs"
        series.setdefault(label, []).append(r)
    for label, members in series.items():
        members.sort(key=lambda r: r["size_bytes"])
        ax.plot([r["size_bytes"] / 1024 for r in members], [100 * r["accuracy"] for r in members], marker="o", label=label)
        for r in members:
            ax.annotate(f"r={r['ratio']}" if r["ratio"] else Path(r["folder"]).name,
                        (r["size_bytes"] / 1024, 100 * r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    for model, base in {r["model"]: r for r in runs}.items():
        ax.plot([base["baseline_size_bytes"] / 1024], [100 * base["baseline_accuracy"]], marker="*", markersize=12,
                linestyle="none", color="black", label=f"baseline {model}")
    ax.set_xlabel("ONNX size (KiB)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, Path(path))
