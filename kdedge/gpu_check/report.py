"""The GPU check's short text summary."""

from __future__ import annotations

from typing import Any


def summary_text(report: dict[str, Any], steps: bool = True) -> str:
    """The short text summary: header, one line per step (unless ``steps`` is False: the
    command has printed them as they ran), the latency and throughput tables."""
    env = report.get("env") or {}
    versions = env.get("versions") or {}
    gpu = ((env.get("gpu") or {}).get("name")
           or {"no-gpu": "no GPU", "rehearsal": "CPU rehearsal"}.get(report["mode"], "?"))
    lines = [f"kdedge GPU check, {report['started']}, mode {report['mode']}, device {report['device']} ({gpu})",
             (f"torch {versions.get('torch')}, onnxruntime {versions.get('onnxruntime')}, "
              f"python {env.get('python')}; {report['seconds']:.0f} s of {report['budget_s']:.0f} s"),
             (f"result: {report['result']} ({report['counts']['pass']} passed, {report['counts']['fail']} failed, "
              f"{report['counts']['skip']} skipped)")]
    if steps:
        lines.append("")
    for s in report["steps"] if steps else []:
        lines.append(f"{s['status'].upper():4} {s['part']:10} {s['name']:44} {s['seconds']:6.1f} s  "
                     f"{s['detail']}".rstrip())
    profiles = report["results"].get("profiles") or {}
    if profiles:
        lines += ["", "torch target latency, median ms (p99), kdedge profile --batch 1,8:",
                  f"{'bundle':22} {'graph':8} {'batch':>5} {'eager':>18} {'cuda graphs':>18}"]
        for fam in sorted({k.rsplit('-', 1)[0] for k in profiles}):
            eager, graphed = profiles.get(f"{fam}-eager"), profiles.get(f"{fam}-graphs")
            if eager is None:
                continue
            for g in ("stage0", "chain"):
                for b in ("1", "8"):
                    cells = []
                    for p in (eager, graphed):
                        v = p["latency_ms"].get(g, {}).get(b) if p else None
                        cells.append(f"{v['median']:.3f} ({v['p99']:.3f})" if v else "-")
                    lines.append(f"{fam:22} {g:8} {b:>5} {cells[0]:>18} {cells[1]:>18}")
    tp = report["results"].get("throughput")
    if tp:
        shape = "x".join(map(str, tp["input"]))
        lines += ["", (f"HNE training step ({tp['config']}, batch {tp['batch']}, input {shape}), "
                       f"median ms of forward + backward; {tp['machine']}"),
                  f"{'N':>3} {'grouped':>9} {'per-node':>9} {'per-member':>11} {'member/grouped':>15}"]
        def ms(v: Any) -> str:
            return "-" if v is None else f"{v:.2f}"

        for r in tp["rows"]:
            lines.append(f"{r['members']:>3} {ms(r['grouped_ms']):>9} {ms(r['per_node_ms']):>9} "
                         f"{ms(r['per_member_ms']):>11} {ms(r['member_over_grouped']):>15}")
    return "\n".join(lines) + "\n"


