"""Turn docs/benchmarks/*.json into docs/benchmarks/README.md with plots.

    python scripts/dashboard.py [--dir docs/benchmarks]

Recognises the JSON of bench_kernels.py, bench_offline.py, bench_latency.py and
bench_serving.py; each figure names the device and the ceiling or peer of its own run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench_common import DEFAULT_MAX_NUM_SEQS  # noqa: E402


def load(directory: Path) -> dict[str, list[tuple[str, dict]]]:
    kinds: dict[str, list[tuple[str, dict]]] = {
        "kernels": [], "tuning": [], "offline": [], "latency": [], "startup": [], "serving": []}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        if "decode" in data and "copy_bandwidth" in data:
            kinds["kernels"].append((path.name, data))
        elif "split_tuning" in data:
            kinds["tuning"].append((path.name, data))
        elif data.get("benchmark") == "startup":
            kinds["startup"].append((path.name, data))
        elif str(data.get("benchmark", "")).startswith("offline"):
            kinds["offline"].append((path.name, data))
        elif data.get("benchmark") == "latency":
            kinds["latency"].append((path.name, data))
        elif data.get("backend") == "openai":
            kinds["serving"].append((path.name, data))
    return kinds


def save_figure(fig, out_dir: Path, png: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / png, dpi=110)
    plt.close(fig)
    return png


def kernel_section(name, data, out_dir: Path) -> list[str]:
    info = data["info"]
    copy = data["copy_bandwidth"].get("copy_GBps")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for ctx in sorted({d["context"] for d in data["decode"]}):
        rows = sorted((d for d in data["decode"] if d["context"] == ctx and "frac_copy" in d),
                      key=lambda d: d["batch"])
        ax.plot([d["batch"] for d in rows], [100 * d["frac_copy"] for d in rows], "o-",
                label=f"context {ctx}")
    ax.set(xscale="log", xlabel="batch (sequences)", ylabel="% of device copy bandwidth",
           title=f"Paged attention decode, {info['device']}")
    ax.legend()
    png = save_figure(fig, out_dir, Path(name).with_suffix(".png").name)
    sh = info["shapes"]
    shapes = (f"{sh['num_q_heads']} query / {sh['num_kv_heads']} KV heads, head_dim "
              f"{sh['head_dim']}, page {sh['page_size']}, {sh['dtype']}")
    lines = [f"### Ragged paged attention kernel ({name})", "",
             f"{info['device']}, jax {info['jax']}, {shapes}; copy bandwidth "
             f"{copy:.0f} GB/s measured in the same run.{measured_code({'versions': info})}", "",
             f"![decode bandwidth]({png})", "",
             "Timing loop: median per call of a jitted loop of calls (its own cost included); "
             "device: the kernels' own time from the profiler's device timeline.", "",
             "| decode | loop (us) | GB/s | % of copy | device (us) | % of copy |",
             "|---|---|---|---|---|---|"]
    lines += [f"| B{d['batch']} ctx{d['context']} | {d['time_us']:.1f} | {d['GBps']:.0f} | "
              f"{100 * d['frac_copy']:.0f} | {d.get('device_time_us', float('nan')):.1f} | "
              f"{100 * d.get('device_frac_copy', float('nan')):.0f} |"
              for d in data["decode"] if "time_us" in d]
    p = data.get("prefill", {})
    if "TFLOPs" in p:
        lines += ["", f"Causal prefill of {p['tokens']} tokens: {p['TFLOPs']:.0f} TFLOP/s "
                      f"(cuDNN in the same run: {p.get('cudnn_TFLOPs', float('nan')):.0f})."]
    return lines + [""]


def tuning_section(name, data) -> list[str]:
    t = data["split_tuning"]
    copy = data["copy_bandwidth"].get("copy_GBps", float("nan"))
    lines = [f"### Split-KV tuning, batch 1 at context {t['context']} ({name})", "",
             f"{data['info']['device']}; copy bandwidth {copy:.0f} GB/s in the same run; "
             "time is the kernels' own (device timeline).", "",
             "| block_n | warps | stages | programs/SM | fused combine | splits | time (us) | % of copy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in t["candidates"]:
        c = r["cfg"]
        lines.append(f"| {c['block_n']} | {c['num_warps']} | {c['num_stages']} | "
                     f"{r['programs_per_sm']} | {'yes' if r['fused_combine'] else 'no'} | "
                     f"{r['num_kv_splits']} | {r.get('time_us', float('nan')):.1f} | "
                     f"{100 * r.get('frac_copy', float('nan')):.0f} |")
    return lines + [""]


def kv_cache_text(data) -> str:
    """The K/V cache a throughput run used, where its JSON records one (older ones do not)."""
    if not data.get("kv_cache_dtype"):
        return ""
    scales = f", scales {data['kv_cache_scales']}" if data.get("kv_cache_scales") else ""
    return f" K/V cache: {data['kv_cache_dtype']}{scales}."


def measured_code(data) -> str:
    """Which commit a result measured, where its JSON records one (older ones do not)."""
    # a top-level "commit" where the run's machine had a stale checkout of the repository
    commit = data.get("commit") or (data.get("versions") or {}).get("atom_jax_commit")
    if not commit or commit == "unknown":
        return ""
    return f" Code: {commit.split('+')[0][:10]}" + (" with uncommitted changes." if "+dirty" in commit else ".")


def startup_section(name, data) -> list[str]:
    s = data["startup"]
    lines = [f"### Start-up to first token ({name})", "",
             f"{data['model']} on {data['device']}, fresh processes, from process start to the "
             f"first generated token.{measured_code(data)}", "", "| | seconds | load | KV cache | compile (or cache load) |",
             "|---|---|---|---|---|"]
    for label in ("cold", "warm"):
        ph = s.get(f"{label}_phases_s") or {}
        lines.append(f"| {label} | {s.get(f'{label}_s')} | {ph.get('load_s', float('nan')):.1f} | "
                     f"{ph.get('kv_cache_s', float('nan')):.1f} | {ph.get('compile_s', float('nan')):.1f} |")
    return lines + [""]


def offline_section(name, data, out_dir: Path) -> list[str]:
    lines = [f"### Offline throughput ({name})", ""]
    if "atom_jax" in data:  # streams mode: atom-jax against transformers
        engines = {"atom-jax": data["atom_jax"]}
        if data.get("transformers"):
            engines["transformers"] = data["transformers"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, res in engines.items():
            pts = [(res[k]["streams"], res[k]["output_tok_per_s"]) for k in ("single", "multi")]
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set(xscale="log", xlabel="concurrent streams", ylabel="output tokens/s",
               title=f"Offline throughput, {data['device']}")
        ax.legend()
        png = save_figure(fig, out_dir, Path(name).with_suffix(".png").name)
        lines += [f"{data['model']} on {data['device']} ({data.get('cpus')} CPUs).", "",
                  f"![throughput]({png})", "",
                  "| engine | 1 stream tok/s | " + f"{data['streams']} streams tok/s |", "|---|---|---|"]
        lines += [f"| {k} | {v['single']['output_tok_per_s']:.1f} | {v['multi']['output_tok_per_s']:.1f} |"
                  for k, v in engines.items()]
    else:
        lines += [f"{data['requests']} requests on {data['device']}: "
                  f"{data['output_tok_per_s']:.0f} output tok/s, {data['total_tok_per_s']:.0f} total tok/s."
                  + kv_cache_text(data) + measured_code(data)]
    return lines + [""]


def latency_section(name, data) -> list[str]:
    d, p = data["decode"], data["prefill"]
    lines = [f"### Latency ({name})", "", f"{data['model']} ({data['dtype']}, {data['load_format']} weights) "
             f"on {data['device']}; copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s in the same run."
             f"{measured_code(data)}", "",
             f"- batch-1 decode: {d['tokens_per_s']:.1f} tokens/s, {d['achieved_gbs']:.0f} GB/s "
             f"({100 * d['fraction_of_copy_bandwidth']:.0f}% of copy)",
             f"- prefill of {p['tokens']} tokens: TTFT {1000 * p['ttft_s']:.0f} ms "
             f"({p.get('effective_tflops', float('nan')):.0f} TFLOP/s)",
             f"- engine start (load + compile): {data['engine_start_s']:.0f} s"]
    if uses_decode_kernel(data):
        lines.append(f"- decode kernel (`--decode-kernel {data['decode_kernel']['mode']}`): "
                     f"{data['decode_kernel']['steps']} decode steps through it, "
                     f"{data.get('block_size')}-token pages")
    s = data.get("startup")
    if s:
        lines.append(f"- start-up to first token, fresh processes: cold {s.get('cold_s')} s, "
                     f"warm {s.get('warm_s')} s")
    peer = data.get("hf_peer") or {}
    if "tokens_per_s" in peer:
        lines.append(f"- peer in the same run, {peer['name']} (transformers "
                     f"{peer['transformers']}, torch {peer['torch']}): "
                     f"{peer['tokens_per_s']:.1f} tokens/s batch-1 decode")
    ms = data.get("multi_step")
    if ms:
        timing = ms.get("startup_timing") or {}
        measured = (f" (start-up: {timing['host_ms']:.2f} ms of host time to queue a step, "
                    f"{timing['device_ms']:.2f} ms on the device)" if timing else "")
        state = (f"{ms['steps']} steps per launch for batches of up to {max(ms['buckets'])} sequences"
                 if ms["buckets"] else "off")
        lines.append(f"- multi-step decode: {state}{measured}")
    prof = data.get("decode_profile")
    if prof:
        lines += [f"- decode on the device timeline: {prof['gpu_busy_us_per_step']:.0f} us of "
                  f"kernels per token ({prof['kernels_per_step']:.0f} kernels); the largest:"]
        lines += [f"  - {k['name']}: {k['us_per_step']:.0f} us/token" for k in prof["top_kernels"][:6]]
    lines += [f"- note: {n}" for n in data.get("notes", [])]
    return lines + [""]


def _median_p99(run: dict, key: str) -> str:
    nan = float("nan")
    return f"{run.get(f'median_{key}_ms', nan):.1f} / {run.get(f'p99_{key}_ms', nan):.1f}"


def serving_section(runs, out_dir: Path) -> list[str]:
    """One plot and table per served setup (bench_serving's --label): throughput and latency
    percentiles against concurrency (or request rate)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, run in runs:
        groups.setdefault(run.get("label") or run.get("base_url") or "", []).append((name, run))
    lines = []
    for i, (label, group) in enumerate(groups.items()):
        group.sort(key=lambda r: r[1].get("max_concurrency") or r[1].get("request_rate") or 0)
        xs = [r.get("max_concurrency") or r.get("request_rate") for _, r in group]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.plot(xs, [r["output_throughput"] for _, r in group], "o-")
        a.set(xscale="log", xlabel="concurrency (or request rate)", ylabel="output tokens/s",
              title="Serving throughput")
        for key in ("ttft", "tpot", "itl"):
            # the median, then the other percentiles the runs recorded (p50 is the median)
            stats = [f"median_{key}_ms"] + sorted(
                k for k in group[0][1] if k.startswith("p") and k.endswith(f"_{key}_ms")
                and k != f"p50_{key}_ms")
            for k in stats:
                b.plot(xs, [r.get(k, float("nan")) for _, r in group], "o-", label=k[:-3])
        b.set(xscale="log", yscale="log", xlabel="concurrency (or request rate)", ylabel="ms",
              title="Latency percentiles")
        b.legend(fontsize=7)
        png = save_figure(fig, out_dir, "serving.png" if i == 0 else f"serving-{i + 1}.png")
        lines += ["### Serving", ""]
        if label:
            lines += [f"{label}; `scripts/bench_serving.py` against `python -m atom_jax.serve` "
                      "over HTTP (streamed completions).", ""]
        lines += [f"![serving]({png})", "",
                  "| concurrency | requests | output tok/s | total tok/s | TTFT median / p99 ms "
                  "| TPOT median / p99 ms | ITL median / p99 ms | result |",
                  "|---|---|---|---|---|---|---|---|"]
        for (name, r), x in zip(group, xs):
            lines.append(f"| {x} | {r.get('completed', '-')} | {r['output_throughput']:.0f} | "
                         f"{r.get('total_token_throughput', float('nan')):.0f} | "
                         f"{_median_p99(r, 'ttft')} | {_median_p99(r, 'tpot')} | "
                         f"{_median_p99(r, 'itl')} | [json]({name}) |")
        lines.append("")
    return lines


def uses_decode_kernel(data) -> bool:
    return bool((data.get("decode_kernel") or {}).get("steps"))


def throughput_row(data) -> str:
    """A throughput run's headline row: its model shape, and what it ran with other than
    a bf16 K/V cache and the benchmark's default sequence count."""
    notes = []
    if data.get("kv_cache_dtype", "bfloat16").startswith("float8"):
        notes.append("float8 K/V cache" + (", scales per token" if data.get("kv_cache_scales")
                                           else ""))
    if data.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS) != DEFAULT_MAX_NUM_SEQS:
        notes.append(f"{data['max_num_seqs']} sequences")
    return Path(data["model"]).stem + (f" ({', '.join(notes)})" if notes else "")


def headline_section(kinds) -> list[str]:
    """One row per model shape (and one more where a latency run used the decode kernel,
    or a throughput run a float8 K/V cache or another sequence count): the figures the GPU
    goals are about."""
    rows: dict[str, dict] = {}
    for _, d in kinds["latency"]:
        row = Path(d["model"]).stem
        kernel = uses_decode_kernel(d)
        if kernel:
            row += f" (decode kernel, {d.get('block_size')}-token pages)"
        rows.setdefault(row, {}).update(
            decode=d["decode"]["tokens_per_s"], ttft=1000 * d["prefill"]["ttft_s"],
            device=d["device"])
        if kernel and d.get("startup"):   # the usual rows take theirs from startup-*.json
            rows[row].update(cold=d["startup"].get("cold_s"), warm=d["startup"].get("warm_s"))
    for _, d in kinds["offline"]:
        if d.get("benchmark") in ("offline-1k1k", "offline-nanovllm") and d.get("model"):
            key = "tput_1k1k" if d["benchmark"] == "offline-1k1k" else "tput_nano"
            rows.setdefault(throughput_row(d), {})[key] = d["output_tok_per_s"]
    for _, d in kinds["startup"]:
        s = d["startup"]
        rows.setdefault(Path(d["model"]).stem, {}).update(cold=s.get("cold_s"), warm=s.get("warm_s"))
    if not rows:
        return []

    def cell(row, key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"
    lines = ["## Headline", "", "| model shape | batch-1 decode tok/s | 8k-token TTFT ms | "
             "1k x 1k output tok/s | nano-vllm workload output tok/s | start-up cold / warm s |",
             "|---|---|---|---|---|---|"]
    for model, r in sorted(rows.items()):
        lines.append(f"| {model} | {cell(r, 'decode', '.1f')} | {cell(r, 'ttft', '.0f')} | "
                     f"{cell(r, 'tput_1k1k', '.0f')} | {cell(r, 'tput_nano', '.0f')} | "
                     f"{cell(r, 'cold', '.1f')} / {cell(r, 'warm', '.1f')} |")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="docs/benchmarks")
    args = ap.parse_args(argv)
    directory = Path(args.dir)
    kinds = load(directory)
    lines = ["# Benchmarks", "", "Made by `python scripts/dashboard.py` from the JSON files here; "
             "each comes from a script in scripts/ and names its device, versions and shapes.", ""]
    lines += headline_section(kinds)
    for name, data in kinds["kernels"]:
        lines += kernel_section(name, data, directory)
    for name, data in kinds["tuning"]:
        lines += tuning_section(name, data)
    for name, data in kinds["latency"]:
        lines += latency_section(name, data)
    for name, data in kinds["startup"]:
        lines += startup_section(name, data)
    for name, data in kinds["offline"]:
        lines += offline_section(name, data, directory)
    if kinds["serving"]:
        lines += serving_section(kinds["serving"], directory)
    (directory / "README.md").write_text("\n".join(lines))
    print(f"wrote {directory / 'README.md'}")


if __name__ == "__main__":
    main()
