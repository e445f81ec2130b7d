"""Print the fastest correct variant of the probe's JSON for one cache dtype on the
256 x 1,400 case, as shell assignments, if it beats main's by 5% or more."""
import json
import sys

cases = json.load(open(sys.argv[1]))["cases"]["decode-256x1400"][sys.argv[2]]
main = next(r for r in cases if r["mode"] is None)
ok = [r for r in cases if r["mode"] in ("swap", "swap_v") and "time_us" in r and r["rel_err"] < 0.01]
best = min(ok, key=lambda r: r["time_us"], default=None)
if best and best["time_us"] < 0.95 * main["time_us"]:
    cfg = best["config"] or ([16, 128, 4, 3] if sys.argv[2] == "fp8" else [16, 64, 4, 2])
    print(f"MODE={best['mode']} TILE={','.join(map(str, cfg))}")
