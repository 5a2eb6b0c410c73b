"""``wanrender bench report RESULTS.jsonl -o report.html``: one static HTML file.

Everything is inline (CSS and hand-written SVG; no JavaScript, no CDN), so the
file opens offline and can be attached to an issue. Sections: summary table,
wanrender and ComfyUI side by side (when both engines rendered the same thing),
per-case stage breakdown, time and memory vs frames (with the card's limit),
telemetry timelines, failures with their log tails, and the environments.
"""

from __future__ import annotations

import time
from collections import defaultdict
from html import escape
from pathlib import Path

from wanrender.bench import peers
from wanrender.bench import results as res
from wanrender.bench.runner import STAGES
from wanrender.bench.svg import PALETTE, Band, HLine, Series, stacked_bars, style, xy_chart
from wanrender.bench.telemetry import peak_mib
from wanrender.errors import WanrenderError
from wanrender.media.atomic import atomic_write_text

GIB = 2**30
OFF_SCALE = 3.0  # a limit more than this many times the data's peak is named, not drawn
# Case fields that never split a series (they do not change the render or are the x axis).
_NOT_SERIES = ("name", "frames", "repeats", "timeout_s", "image_path", "image_sha256", "models_path", "warmup",
               "server", "workflow_path", "workflow_sha256")  # fmt: skip

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.st{font-weight:bold;padding:1px 6px;border-radius:3px;color:#fff}
.ok{background:#2a8a3a}.oom{background:#b35c00}.timeout{background:#7a4bb3}.crash{background:#b00}.error{background:#666}
pre.log{background:#111;color:#ddd;padding:8px;font-size:11px;max-height:360px;overflow:auto;white-space:pre-wrap}
.grid{display:flex;flex-wrap:wrap;gap:10px}.muted{color:#777;font-size:12px}
figure{margin:0 0 14px 0}figcaption{font-size:13px;font-weight:bold;margin:6px 0}
td.wrap{white-space:normal;overflow-wrap:anywhere;max-width:1100px}
"""


def _f(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _gib(v: float | None) -> str:
    return "—" if v is None else f"{v / GIB:.2f}"


def _timed_peak(row: dict, stored: str, column: str) -> float | None:
    """A peak over the timed renders (bytes): as stored, or for rows written before it
    was, from the row's own telemetry samples inside its timed phases."""
    m = row.get("memory") or {}
    if m.get(stored) is not None:
        return m[stored]
    tel = row.get("telemetry") or {}
    fields = tel.get("fields") or []
    if column not in fields:
        return None
    i, it = fields.index(column), fields.index("t")
    wins = [(a, b) for name, a, b in tel.get("phases") or [] if name != "warmup"]
    samples = tel.get("samples") or []
    return peak_mib([s[i] for s in samples], [any(a <= s[it] <= b for a, b in wins) for s in samples])


def _peak_cell(row: dict, stored: str, case_key: str, column: str) -> str:
    """The timed peak, with the whole case's (loading included) on hover."""
    whole = (row.get("memory") or {}).get(case_key)
    timed = _timed_peak(row, stored, column)
    if timed is None and whole is not None and row.get("status") != "ok":
        # a failed case has no timed render: its whole-case peak is the number to see
        return f'<span title="whole case, loading included (no timed render)">{_gib(whole)} (case)</span>'
    return f'<span title="whole case, loading included: {_gib(whole)} GiB">{_gib(timed)}</span>'


def _status(s: str) -> str:
    return f'<span class="st {escape(s)}">{escape(s)}</span>'


def _case(row: dict) -> dict:
    return row.get("case") or {}


def _env_tags(rows: list[dict]) -> dict[str, str]:
    """Short names (env 1, env 2, ...) for the environments, in order of appearance;
    empty when every row comes from one environment (no column needed then)."""
    fps = list(dict.fromkeys(r.get("env_fingerprint", "?") for r in rows))
    return {fp: f"env {i + 1}" for i, fp in enumerate(fps)} if len(fps) > 1 else {}


def _vram_cell(row: dict) -> str:
    if peers.engine(row) == "comfyui":  # no allocator peak from a server: its device-wide peak instead
        return (f'<span title="ComfyUI /system_stats: device-wide total - free, timed renders">'
                f"{_gib(peers.vram(row))} (device)</span>")  # fmt: skip
    return _gib((row.get("memory") or {}).get("torch_allocated_peak"))


def _knob(row: dict, case: dict, knob: str) -> str:
    """What the case asked for, and what its render ran with where that differs (``auto``
    resolved by the planner); ComfyUI's rows have none of wanrender's knobs."""
    if peers.engine(row) == "comfyui":
        return "—"
    asked, ran = str(case.get(knob)), (row.get("plan") or {}).get(knob)
    return escape(asked if ran in (None, asked) else f"{asked} → {ran}")


def _summary_table(rows: list[dict]) -> str:
    tags = _env_tags(rows)
    engines = len({peers.engine(r) for r in rows}) > 1
    head = ("case", "status") + (("engine",) if engines else ()) + ("frames", "size", "attention", "precision", "compile", "pass order", "total p50 s",
            "total p90 s", "s/step p50", "pass1 p50", "pass2 p50", "memory plan", "VRAM alloc GiB", "predicted GiB", "reserved GiB",
            "NVML GiB (timed)", "host RSS GiB (timed)", "energy J/video", "warm-up s") + (("environment",) if tags else ())  # fmt: skip
    out = ['<table id="summary-table"><thead><tr>' + "".join(
        f'<th class="{"l" if i < 2 else ""}">{escape(h)}</th>' for i, h in enumerate(head)) + "</tr></thead><tbody>"]  # fmt: skip
    for r in rows:
        c, m = _case(r), r.get("memory") or {}
        e = r.get("energy_j") or {}
        cells = [escape(r.get("label", r["key"])), _status(r["status"])] + (
            [escape(peers.engine(r))] if engines else []
        )
        cells += [str(c.get("frames", "")),
                 f"{c.get('width')}x{c.get('height')}", _knob(r, c, "attention"),
                 _knob(r, c, "precision"), _knob(r, c, "compile"), escape(str(c.get("pass_order"))),
                 _f(res.p50(r, "total")), _f((r.get("total") or {}).get("p90")), _f(res.p50(r, "s_per_step")),
                 _f(res.p50(r, "pass1")), _f(res.p50(r, "pass2")), escape(str(m.get("plan") or "")),
                 _vram_cell(r), _f(m.get("predicted_peak_gib"), 1), _gib(m.get("torch_reserved_peak")),
                 _peak_cell(r, "nvml_used_timed_peak", "nvml_used_peak", "gpu_mem_mib"),
                 _peak_cell(r, "host_rss_timed_peak", "host_rss_peak", "rss_mib"),
                 _f(e.get("p50"), 1), _f(r.get("warmup_s"), 2)]  # fmt: skip
        if tags:
            cells.append(escape(tags[r.get("env_fingerprint", "?")]))
        out.append(
            "<tr>" + "".join(f'<td class="{"l" if i < 2 else ""}">{v}</td>' for i, v in enumerate(cells)) + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _engines_section(rows: list[dict]) -> str:
    """wanrender and ComfyUI on the same render: p50s and ComfyUI/wanrender ratios."""
    found = peers.pairs(rows)
    if not found:
        return ""
    head = ["render", "wanrender case", "ComfyUI case"]
    for m in peers.METRICS:
        head += [f"{m} wanrender s", f"{m} ComfyUI s", f"{m} ratio"]
    head += ["VRAM wanrender GiB", "VRAM ComfyUI GiB (device)"]
    body = []
    for p in found:
        cells = [escape(p.render), f"{escape(p.wanrender.get('label', ''))} {_status(p.wanrender['status'])}",
                 f"{escape(p.comfyui.get('label', ''))} {_status(p.comfyui['status'])}"]  # fmt: skip
        for m in peers.METRICS:
            r = p.ratio(m)
            cells += [_f(p.value(p.wanrender, m)), _f(p.value(p.comfyui, m)), "—" if r is None else f"{r:.2f}x"]
        cells += [_gib(peers.vram(p.wanrender)), _gib(peers.vram(p.comfyui))]
        body.append(
            "<tr>" + "".join(f'<td class="{"l" if i < 3 else ""}">{v}</td>' for i, v in enumerate(cells)) + "</tr>"
        )
    th = "".join(f'<th class="{"l" if i < 3 else ""}">{escape(h)}</th>' for i, h in enumerate(head))
    return (f'<p class="muted">Rows of the two engines with the same image, frames, size, steps and seed. Ratio: '
            "ComfyUI's p50 over wanrender's (above 1: wanrender is faster). ComfyUI's VRAM is its server's "
            "/system_stats peak over the device (every process on the GPU counts), wanrender's is torch's "
            f'allocated peak.</p><table id="engines-table"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}'
            "</tbody></table>")  # fmt: skip


def _stage_section(ok: list[dict]) -> str:
    stages = [s for s in STAGES if any(s in (r.get("stages") or {}) for r in ok)]
    bars = [(r.get("label", r["key"]), {s: res.p50(r, s) or 0.0 for s in stages}) for r in ok]
    chart = stacked_bars(bars, stages, plot="stages", title="Where the time goes (p50 per stage, seconds)")
    head = "".join(f"<th>{escape(s)} p50 / p90</th>" for s in stages)
    body = []
    for r in ok:
        cells = []
        for s in stages:
            st = (r.get("stages") or {}).get(s) or {}
            cells.append(f"<td>{_f(st.get('p50'))} / {_f(st.get('p90'))}</td>")
        body.append(f'<tr><td class="l">{escape(r.get("label", r["key"]))}</td>{"".join(cells)}</tr>')
    table = f'<table id="stages-table"><thead><tr><th class="l">case</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return chart + table


def _distinct_labels(rows: list[dict]) -> dict[str, str]:
    """Each row's label, told apart where two rows share one: by environment, then by case hash."""
    tags = _env_tags(rows)
    out = {r["key"]: r.get("label") or r["key"] for r in rows}
    for extra in (lambda r: tags.get(r.get("env_fingerprint", "?")), lambda r: r["case_hash"][:8]):
        seen: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            seen[out[r["key"]]].add(r["key"])
        for r in rows:
            if len(seen[out[r["key"]]]) > 1 and extra(r):
                out[r["key"]] += f" ({extra(r)})"
    return out


def _series_names(rows: list[dict], tags: dict[str, str] | None = None) -> dict[str, str]:
    """Rows that differ only in frames share a series; its name lists what else varies
    (and the environment, when there are several: one series each)."""
    keys = sorted({k for r in rows for k in _case(r)} - set(_NOT_SERIES))
    varying = [k for k in keys if len({str(_case(r).get(k)) for r in rows}) > 1]
    if "width" in varying or "height" in varying:
        varying = [k for k in varying if k not in ("width", "height")] + ["size"]
    first = ("vram_cap_bytes", "attention", "precision", "compile", "size")  # what tells series apart, first
    varying.sort(key=lambda k: first.index(k) if k in first else len(first))
    out = {}
    for r in rows:
        c = _case(r)
        parts = [_short(k, c) for k in varying if k in ("size", "vram_cap_bytes") or c.get(k) is not None]
        if tags:
            parts.append(f"({tags[r.get('env_fingerprint', '?')]})")
        out[r["key"]] = " ".join(p for p in parts if p) or "all cases"
    return out


def _short(key: str, c: dict) -> str:
    """A legend-sized name for one field's value (the legend has ~30 characters)."""
    v = c.get(key)
    if key == "size":
        return f"{c.get('width')}x{c.get('height')}"
    if key == "vram_cap_bytes":
        return f"cap {v / GIB:.1f}G" if v else ""
    if key in ("attention", "precision"):
        return str(v)
    if key == "engine":
        return str(v or "wanrender")  # rows written before the engine field
    if key == "workflow":
        return Path(str(v)).name if v else ""
    if key == "compile":
        return "" if v == "off" else f"compiled ({v})"
    if key == "steps":
        return f"{v} steps"
    if key == "switch":
        return f"switch {v}"
    if key in ("interpolate", "memory_plan"):
        return f"{key} {v}"
    return f"{key}={v}"


def _grouped(rows: list[dict], value, tags: dict[str, str]) -> list[Series]:
    names = _series_names(rows, tags)
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        v = value(r)
        if v is not None:
            groups[names[r["key"]]].append((float(_case(r).get("frames", 0)), v))
    out = []
    for i, (n, p) in enumerate(sorted(groups.items())):
        color, dash = style(i)
        out.append(Series(n, tuple(p), color, dash=dash))
    return out


def _limits(rows: list[dict], peak: float, gpu: bool) -> tuple[tuple[HLine, ...], list[str]]:
    """The card's memory (or the host's RAM on a CPU run) and any emulated caps, in GiB."""
    found: dict[str, float] = {}
    for r in rows:
        m = r.get("memory") or {}
        if gpu and m.get("device_total"):
            found[f"card {m['device_total'] / GIB:.1f} GiB"] = m["device_total"] / GIB
        if m.get("cap"):
            found[f"cap {m['cap'] / GIB:.1f} GiB"] = m["cap"] / GIB
        if not gpu and (r.get("env") or {}).get("ram_gib"):
            found[f"host RAM {r['env']['ram_gib']} GiB"] = float(r["env"]["ram_gib"])
    lines, off = [], []
    for label, y in sorted(found.items(), key=lambda kv: kv[1]):
        if peak and y > OFF_SCALE * peak:
            off.append(label)
        else:
            lines.append(HLine(y, label))
    return tuple(lines), off


def _scaling_section(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    tags = _env_tags(rows)
    t = xy_chart(_grouped(ok, lambda r: res.p50(r, "total"), tags), plot="time-vs-frames", width=720, title="Render time vs frames (p50)",
                 x_label="frames", y_label="seconds (total, p50)")  # fmt: skip
    gpu = any((r.get("memory") or {}).get("torch_allocated_peak") for r in rows)
    key = "torch_allocated_peak" if gpu else "host_rss_peak"
    what = "peak VRAM (torch allocated)" if gpu else "peak host RSS (CPU run: no VRAM)"
    # Failed cases count too: an OOM at N frames is exactly the point this chart is for.
    measured = [r for r in rows if (r.get("memory") or {}).get(key)]
    series = _grouped(measured, lambda r: r["memory"][key] / GIB, tags)
    peak = max((p[1] for s in series for p in s.points), default=0.0)
    lines, off = _limits(rows, peak, gpu)
    v = xy_chart(
        series,
        plot="vram-vs-frames",
        title=f"{what} vs frames",
        x_label="frames",
        y_label="GiB",
        hlines=lines,
        width=720,
    )
    note = f'<p class="muted">Limits off the scale: {escape(", ".join(off))}.</p>' if off else ""
    return f'<div class="grid">{t}{v}</div>{note}'


def _timeline_charts(row: dict) -> list[str]:
    tel = row.get("telemetry") or {}
    fields, samples = tel.get("fields") or [], tel.get("samples") or []
    if not samples or "t" not in fields:
        return []
    col = {f: i for i, f in enumerate(fields)}
    ts = [s[col["t"]] for s in samples]
    bands = tuple(Band(a, b, n, "#eef3ff" if n != "warmup" else "#fff4e0") for n, a, b in tel.get("phases") or [])

    def series(name: str, f: str, scale: float = 1.0, color: str = PALETTE[0]) -> Series | None:
        if f not in col:
            return None
        pts = tuple((t, s[col[f]] * scale) for t, s in zip(ts, samples) if s[col[f]] is not None)
        return Series(name, pts, color, markers=False) if pts else None

    groups = [
        ("host CPU % (the case's process)", "%", [series("cpu %", "cpu_pct")], ()),
        ("host RSS", "GiB", [series("RSS", "rss_mib", 1 / 1024, PALETTE[1])], ()),
        ("GPU utilisation", "%", [series("gpu", "gpu_util"), series("memory", "mem_util", color=PALETTE[3])], ()),
        ("ComfyUI device VRAM in use (/system_stats, device-wide)", "GiB",
         [series("in use", "server_vram_mib", 1 / 1024, PALETTE[1])], ()),
        ("GPU memory used (NVML)", "GiB", [series("used", "gpu_mem_mib", 1 / 1024, PALETTE[1])],
         tuple(HLine(m / GIB, f"card {m / GIB:.0f} GiB") for m in [(row.get("memory") or {}).get("device_total")] if m)),
        ("GPU power", "W", [series("power", "power_w", color=PALETTE[2])], ()),
        ("GPU temperature", "°C", [series("temp", "temp_c", color=PALETTE[3])], ()),
        ("clocks", "MHz", [series("SM", "sm_mhz", color=PALETTE[4]), series("memory", "mem_mhz", color=PALETTE[5])], ()),
    ]  # fmt: skip
    out = []
    for title, unit, ss, hl in groups:
        ss = [s for s in ss if s is not None]
        if ss:
            out.append(xy_chart(ss, plot="telemetry", title=title, x_label="seconds since the case started", y_label=unit,
                                bands=bands, hlines=hl, width=460, height=190, legend=len(ss) > 1))  # fmt: skip
    return out


def _telemetry_section(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        charts = _timeline_charts(r)
        tel = r.get("telemetry") or {}
        extra = []
        if tel.get("throttle_reasons"):
            extra.append("throttle reasons while timed: " + ", ".join(tel["throttle_reasons"]))
        if tel.get("temp_max_c") is not None:
            extra.append(f"max temperature {tel['temp_max_c']} °C")
        if tel.get("note"):
            extra.append(tel["note"])
        cap = f"{escape(r.get('label', r['key']))} {_status(r['status'])}"
        body = "".join(charts) or '<p class="muted">no samples</p>'
        note = f'<p class="muted">{escape("; ".join(extra))}</p>' if extra else ""
        parts.append(
            f'<figure class="timeline"><figcaption>{cap}</figcaption><div class="grid">{body}</div>{note}</figure>'
        )
    return "".join(parts)


def _failures_section(rows: list[dict]) -> str:
    bad = [r for r in rows if r["status"] != "ok"]
    if not bad:
        return '<p class="muted">No failures.</p>'
    out = []
    for r in bad:
        out.append(f'<div class="failure" data-status="{escape(r["status"])}"><h3>{escape(r.get("label", r["key"]))} '
                   f'{_status(r["status"])}</h3><p>{escape(r.get("message") or "")}</p>'
                   f'<p class="muted">exit code {r.get("returncode")}, {r.get("wall_s")} s, log {escape(str(r.get("log")))}</p>'
                   f'<pre class="log">{escape(r.get("log_tail") or "(empty log)")}</pre></div>')  # fmt: skip
    return "".join(out)


ENV_COMPARED = ("driver", "cuda", "cudnn", "torch", "triton", "python", "wanrender", "git_commit")


def _env_diff(env: dict, base: dict) -> str:
    """What sets ``env`` apart from ``base``: versions, GPUs and environment variables."""
    diffs = [f"{k} {base.get(k)} -> {env.get(k)}" for k in ENV_COMPARED if env.get(k) != base.get(k)]
    gpus = [[f"{g.get('name')} ({g.get('memory_gib')} GiB)" for g in e.get("gpus") or []] for e in (base, env)]
    if gpus[0] != gpus[1]:
        diffs.append(f"GPUs {', '.join(gpus[0]) or 'none'} -> {', '.join(gpus[1]) or 'none'}")
    cpus = [(e.get("cpu") or {}).get("model") for e in (base, env)]
    if cpus[0] != cpus[1]:
        diffs.append(f"CPU {cpus[0]} -> {cpus[1]}")
    ep, bp = env.get("packages") or {}, base.get("packages") or {}
    diffs += [
        f"{k} {bp.get(k, 'absent')} -> {ep.get(k, 'absent')}"
        for k in sorted(set(ep) | set(bp))
        if ep.get(k) != bp.get(k)
    ]
    ev, bv = env.get("env_vars") or {}, base.get("env_vars") or {}
    diffs += [
        f"{k} {bv.get(k, 'unset')} -> {ev.get(k, 'unset')}" for k in sorted(set(ev) | set(bv)) if ev.get(k) != bv.get(k)
    ]
    return "; ".join(diffs) or "nothing recorded (another machine of the same kind)"


def _env_section(rows: list[dict]) -> str:
    envs: dict[str, dict] = {}
    for r in rows:
        envs.setdefault(r.get("env_fingerprint", "?"), r.get("env") or {})
    tags = _env_tags(rows)
    first = next(iter(envs.values()), {})
    out = []
    for fp, env in envs.items():
        gpus = ", ".join(f"{g.get('name')} ({g.get('memory_gib')} GiB)" for g in env.get("gpus") or []) or "none"
        cpu = env.get("cpu") or {}
        items = [("fingerprint", fp), ("GPUs", gpus), ("driver", env.get("driver")), ("CUDA", env.get("cuda")),
                 ("cuDNN", env.get("cudnn")), ("torch", env.get("torch")), ("triton", env.get("triton")),
                 ("Python", env.get("python")), ("wanrender", f"{env.get('wanrender')} {env.get('git_commit') or ''}"),
                 ("CPU", f"{cpu.get('model')} ({cpu.get('usable_cores')} usable cores)"), ("RAM GiB", env.get("ram_gib")),
                 ("OS", (env.get("os") or {}).get("distribution") or env.get("platform")),
                 ("packages", ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items())),
                 ("env vars", ", ".join(f"{k}={v}" for k, v in (env.get("env_vars") or {}).items()) or "none"),
                 ("taken", env.get("taken"))]  # fmt: skip
        if tags:
            items.insert(0, ("name", tags[fp]))
            if env is not first:
                items.insert(1, ("differs from env 1", _env_diff(env, first)))
        body = "".join(
            f'<tr><th class="l">{escape(k)}</th><td class="l wrap">{escape(str(v))}</td></tr>' for k, v in items
        )
        out.append(f'<table class="env">{body}</table>')
    return "".join(out)


def render(rows: res.Rows, source: str = "") -> str:
    labels = _distinct_labels(list(rows.latest_by_key().values()))
    latest = [{**r, "label": labels[r["key"]]} for r in rows.latest_by_key().values()]
    counts: dict[str, int] = defaultdict(int)
    for r in latest:
        counts[r["status"]] += 1
    ok = [r for r in latest if r["status"] == "ok"]
    skipped = f", {rows.skipped_lines} unreadable line(s) skipped" if rows.skipped_lines else ""
    status_line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    sections = [
        ("summary", "Summary", _summary_table(latest)),
        ("engines", "wanrender and ComfyUI side by side", _engines_section(latest)),
        ("stages", "Stage breakdown", _stage_section(ok)),
        ("scaling", "Time and memory vs frames", _scaling_section(latest)),
        ("telemetry", "Telemetry timelines", _telemetry_section(latest)),
        ("failures", "Failures", _failures_section(latest)),
        ("environment", "Environment", _env_section(latest)),
    ]
    body = "".join(
        f'<section id="{sid}"><h2>{escape(title)}</h2>{html}</section>'
        for sid, title, html in sections
        if html or sid != "engines"
    )  # that one only when both engines rendered the same thing
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>wanrender bench report</title>'
            f"<style>{CSS}</style></head><body><h1>wanrender bench report</h1>"
            f'<p class="muted">{escape(source)} — {len(latest)} case(s): {escape(status_line)}{escape(skipped)}; '
            f'written {escape(time.strftime("%Y-%m-%d %H:%M:%S"))}. Timings exclude the warm-up render; '
            f"p50/p90 over the timed repeats.</p>{body}</body></html>")  # fmt: skip


def write_report(results: Path, out: Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise WanrenderError(f"-o {out}: a folder — name the HTML file, e.g. -o {out / 'report.html'}")
    rows = res.read_results(results)
    src = Path(results) / "results.jsonl" if Path(results).is_dir() else Path(results)
    if out.exists() and out.resolve() == src.resolve():
        raise WanrenderError(f"-o {out} is the results file itself — write the report elsewhere, e.g. -o report.html")
    html = render(rows, str(src))
    try:
        atomic_write_text(out, html)  # a failed write leaves an earlier report as it was
    except OSError as e:
        raise WanrenderError(f"-o {out}: cannot write the report ({e.strerror}) — pick a writable place") from None
    return out
