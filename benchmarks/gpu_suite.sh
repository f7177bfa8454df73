#!/usr/bin/env bash
# The GPU measurements of the tracker's issue 18, in one command that stays under 8 minutes on
# one H200 (each item has its own time limit, so one hung item cannot eat the others' time):
#
#   env        JAX/jaxlib/Python versions, the device, the parameters of jax.nn.dot_product_attention
#   parity     jaxlm bench experiments/gpt2_124m.py --attention-parity (bf16): cuDNN flash attention
#              against the reference, causal; the refusal of cuDNN with document masking; the
#              cudnn+mask probe (does JAX's cuDNN kernel keep documents apart given the mask?)
#   gpt2_124m  GPT-2-124M at seq 1024, auto attention, bf16: a small batch x remat sweep (target MFU 45%)
#   llama_1b   the llama-1b preset at seq 2048, the same way (target MFU 55%)
#   profile    the fastest 124M point again, 3 steps traced with jax.profiler; its log lists the
#              15 ops that took the most time
#   decode     benchmarks/bench_decode.py at batch 1 and 64 on the 124M preset
#
#   benchmarks/gpu_suite.sh [--dry-run] [OUTDIR]     # OUTDIR defaults to $OUT
#   benchmarks/gpu_suite.sh --plan                   # print each item: name, time limit, command
#
# --dry-run runs every item end to end on the CPU at tiny shapes (the same experiment files with
# shrunk shapes, few steps), so that a bug costs no GPU time; --plan runs nothing (tests check the
# real run's commands and limits with it, so a typo in an override costs no GPU time either).
#
# OUTDIR receives four files (the device tool returns at most 8, none in folders): summary.json
# (every figure, the targets, each item's status), suite.log, results.tar.gz (each item's JSON and
# log) and profile.trace.json.gz (the trace, for ui.perfetto.dev). It needs only what the GPU
# machine has: jaxlm runs from this checkout (PYTHONPATH), and nothing on these paths imports
# grain. Exit 0 when every item succeeded, 1 when one did not, 2 on bad arguments, 3 without a GPU.
set -uo pipefail

usage="usage: benchmarks/gpu_suite.sh [--dry-run] [--plan] [OUTDIR]  (OUTDIR defaults to \$OUT)"
dry=0
plan=0
outdir=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --plan) plan=1 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    -*) echo "error: unknown option '$arg'; $usage" >&2; exit 2 ;;
    *)
      if [[ -n $outdir ]]; then echo "error: one OUTDIR, got '$outdir' and '$arg'; $usage" >&2; exit 2; fi
      outdir=$arg
      ;;
  esac
done
outdir=${outdir:-${OUT:-}}
if ((!plan)); then
  if [[ -z $outdir ]]; then echo "error: no OUTDIR given and \$OUT is not set; $usage" >&2; exit 2; fi
  if [[ -e $outdir/summary.json ]]; then
    echo "error: $outdir already holds a suite's results (summary.json); give an empty or new OUTDIR" >&2
    exit 2
  fi
  mkdir -p "$outdir" || { echo "error: cannot create OUTDIR '$outdir'" >&2; exit 2; }
  outdir=$(cd "$outdir" && pwd)
fi

cd "$(dirname "$0")/.." || exit 2  # the repository root: jaxlm is imported from this checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-$(command -v python3 || command -v python)}
jaxlm=("$py" -m jaxlm.cli)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
mkdir "$work/.py"
# One compilation cache for the suite's processes: the profile item recompiles the fastest point's
# step, and every point shares its model's init. Kept in $work, so no figure of a later run of the
# suite comes from this one's cache.
export JAX_COMPILATION_CACHE_DIR="$work/.jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

# ---- what runs: shapes, sweep points, time limits (seconds) -------------------------------------
common=(model.attention=auto model.compute_dtype=bfloat16)
if ((dry)); then
  # One CPU device, like the one GPU of the real run (same mesh, same batch divisibility);
  # LLVM without optimisation, which halves the compile time a dry run is made of.
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  total=900 lim_env=60 lim_parity=120 lim_124m=240 lim_1b=240 lim_point=120 lim_profile=120 lim_decode=120
  steps=(--steps 2 --warmup 1 --matmul-n 128)
  # The ceiling's dozens of small compiles would be a third of the dry run's time; tests/test_bench.py
  # covers it, and the real run measures it here, for the fastest point.
  profile_steps=(--steps 2 --warmup 1 --matmul-n 128 --skip-ceiling)
  shape_124m=(model.n_layers=2 model.d_model=64 model.n_heads=4 model.d_ff=256 model.seq_len=64
    model.vocab_size=512)
  shape_1b=(model.n_layers=2 model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.head_dim=16
    model.d_ff=128 model.seq_len=64 model.vocab_size=512)
  points_124m=("train.batch_size=4 model.remat=none" "train.batch_size=8 model.remat=save_matmuls")
  points_1b=("train.batch_size=4 train.micro_batches=1 model.remat=save_matmuls")
  decode_args=(--preset tiny --batch 2 --prompt-len 4 --new-tokens 8 --repeats 1)
else
  # 8 minutes in all (480 s); the limits add up to 470, leaving the summary and packing 10.
  total=470 lim_env=30 lim_parity=55 lim_124m=130 lim_1b=150 lim_point=80 lim_profile=50 lim_decode=55
  steps=(--steps 8 --warmup 2)
  profile_steps=(--steps 3 --warmup 1)
  shape_124m=()
  shape_1b=()
  # The most likely to fit first: a point cut short by its item's limit leaves the earlier ones.
  points_124m=("train.batch_size=32 model.remat=none" "train.batch_size=64 model.remat=none"
    "train.batch_size=64 model.remat=save_matmuls")
  points_1b=("train.batch_size=16 train.micro_batches=1 model.remat=save_matmuls"
    "train.batch_size=16 train.micro_batches=1 model.remat=none"
    "train.batch_size=32 train.micro_batches=1 model.remat=save_matmuls")
  decode_args=(--batch 1 64)
  # Fill the GPU: the sweep asks how large a batch fits (JAX's default is 75%).
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
fi
deadline=$((SECONDS + total))

say() { ((plan)) || echo "$*" | tee -a "$work/suite.log"; }

pack() {  # into OUTDIR: the summary, the suite's log, one tarball of every item's JSON and log
  [[ -f $work/summary.json ]] && cp "$work/summary.json" "$outdir/"
  cp "$work/suite.log" "$outdir/"
  tar czf "$outdir/results.tar.gz" -C "$work" --exclude=./.py --exclude=./.jax_cache --exclude=./profile .
}
trap '((plan)) || pack; rm -rf "$work"' EXIT
trap 'exit 143' TERM INT  # so the EXIT trap packs what was measured

item() {  # item NAME LIMIT CMD...: CMD under `timeout`, output in NAME.log, a line in status.tsv
  local name=$1 limit=$2 left=$((deadline - SECONDS)) t0=$SECONDS rc
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$work/status.tsv"
    say "-- $name: skipped, the suite's $total s are spent"
    return 1
  fi
  local shown="$*"
  shown=${shown//"$py"/python}
  if ((plan)); then printf '%s\t%s\t%s\n' "$name" "$limit" "$shown"; return 0; fi
  say "-- $name (limit $limit s): $shown"
  timeout --kill-after=5 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >>"$work/status.tsv"
  tail -n 30 "$work/$name.log" | sed 's/^/   | /' >>"$work/suite.log"
  say "   $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)') after $((SECONDS - t0)) s"
  return $rc
}

sweep() {  # sweep KEY EXPERIMENT LIMIT POINT...: one `jaxlm bench` a point, all within LIMIT
  local key=$1 experiment=$2 limit=$3 end=$((SECONDS + $3)) point name kv k shape
  shift 3
  [[ $key == gpt2_124m ]] && shape=("${shape_124m[@]}") || shape=("${shape_1b[@]}")
  ((plan)) && printf '%s\t%s\t%s\n' "$key" "$limit" "sweep: $# points, each at most $lim_point s"
  for point in "$@"; do
    name=$key
    for kv in $point; do k=${kv%%=*}; name+="_${k##*.}-${kv#*=}"; done
    printf '%s\t%s\t%s\n' "$key" "$name" "$point" >>"$work/points.tsv"
    # shellcheck disable=SC2086  # a point is a list of overrides, split on purpose
    item "$name" $((end - SECONDS < lim_point ? end - SECONDS : lim_point)) "${jaxlm[@]}" bench \
      "$experiment" "${steps[@]}" --skip-ceiling --json "$work/$name.json" \
      --set "${common[@]}" "${shape[@]}" $point
  done
}

# ---- env: versions and the device; the real run refuses to start without a GPU ----------------
cat >"$work/.py/env.py" <<'EOF'
import importlib.util, inspect, json, platform, sys
import jax, jaxlib
out, need_gpu = sys.argv[1], sys.argv[2] == "1"
info = {
    "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
    "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
    "grain_installed": importlib.util.find_spec("grain") is not None,
    # whether this JAX's cuDNN attention takes sequence lengths / segment ids (document masking)
    "dot_product_attention_params": list(inspect.signature(jax.nn.dot_product_attention).parameters),
}
print(json.dumps(info))
json.dump(info, open(out, "w"), indent=1)
if need_gpu and info["backend"] != "gpu":
    sys.exit(f"error: no GPU here (jax backend {info['backend']!r}); on a CPU run with --dry-run")
EOF
say "gpu_suite $( ((dry)) && echo '--dry-run (CPU, tiny shapes)' || echo '(device)'), $(date -u +%FT%TZ)," \
  "results to $outdir"
if ! item env "$lim_env" "$py" "$work/.py/env.py" "$work/env.json" $((1 - dry)); then
  why=$(grep -m 1 '^error:' "$work/env.log" || echo "error: the env item failed; see env.log in results.tar.gz")
  say "$why; nothing else was run" >&2
  exit 3
fi
((plan)) || ! command -v nvidia-smi >/dev/null || nvidia-smi >>"$work/env.log" 2>&1

# ---- 1. attention parity -------------------------------------------------------------------------
parity_shape=()
((dry)) && parity_shape=(model.seq_len=64 model.d_model=64 model.n_heads=4)
item parity "$lim_parity" "${jaxlm[@]}" bench experiments/gpt2_124m.py --attention-parity \
  --json "$work/parity.json" --set model.compute_dtype=bfloat16 "${parity_shape[@]}"

# ---- 2, 3. the sweeps ----------------------------------------------------------------------------
sweep gpt2_124m experiments/gpt2_124m.py "$lim_124m" "${points_124m[@]}"
sweep llama_1b experiments/llama_1b.py "$lim_1b" "${points_1b[@]}"

# ---- 4. profile of the fastest 124M point ----------------------------------------------------------
best=$("$py" -c '
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
rows = [l.split("\t") for l in (work / "points.tsv").read_text().splitlines()]
done = [(json.loads((work / f"{n}.json").read_text())["tokens_per_s_per_device"], p)
        for k, n, p in rows if k == "gpt2_124m" and (work / f"{n}.json").is_file()]
print(max(done)[1] if done else "")' "$work")
((plan)) && best=${points_124m[0]}  # stands in for the fastest point, which only a run can tell
if [[ -n $best ]]; then
  # shellcheck disable=SC2086
  item profile "$lim_profile" "${jaxlm[@]}" bench experiments/gpt2_124m.py "${profile_steps[@]}" \
    --profile "$work/profile" --json "$work/profile.json" --set "${common[@]}" "${shape_124m[@]}" $best
  trace=$(find "$work/profile" -name perfetto_trace.json.gz 2>/dev/null | head -n 1)
  if [[ -n $trace ]] && (($(stat -c %s "$trace") < 15 * 1024 * 1024)); then
    cp "$trace" "$outdir/profile.trace.json.gz"
  elif [[ -n $trace ]]; then
    say "   profile: the trace is $(stat -c %s "$trace") bytes, over the 16 MiB a returned file may have; not kept"
  fi
else
  printf 'profile\tskipped\t0\t0\n' >>"$work/status.tsv"
  say "-- profile: skipped, no 124M point finished"
fi

# ---- 5. decode -------------------------------------------------------------------------------------
item decode "$lim_decode" "$py" benchmarks/bench_decode.py "${decode_args[@]}" --json "$work/decode.json"

# ---- summary ---------------------------------------------------------------------------------------
((plan)) && exit 0
cat >"$work/.py/summary.py" <<'EOF'
import json, pathlib, sys

work, outdir, dry, seconds = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
TARGETS = {"gpt2_124m": 0.45, "llama_1b": 0.55}  # MFU, from the issue
FIGURES = ("tokens_per_s_per_device", "mfu", "model_tflops_per_device", "fraction_of_matmul_peak",
           "compile_s", "peak_memory_gib", "batch")


def load(name):
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def rows(name):
    path = work / name
    return [line.split("\t") for line in path.read_text().splitlines()] if path.is_file() else []


def status(rc):
    if rc == "skipped":
        return "skipped"
    return {"0": "ok", "124": "time limit", "137": "time limit"}.get(rc, f"failed (exit {rc})")


items = {n: {"status": status(rc), "seconds": int(t), "limit_s": int(lim)} for n, rc, t, lim in rows("status.tsv")}
s = {"mode": "dry-run" if dry else "device", "seconds": seconds, "env": load("env"), "items": items}

parity = load("parity") or []
by_kind = {(r["backend"], r["batch"]): r for r in parity}
s["attention_parity"] = {
    "all_ok": bool(parity) and all(r.get("ok", True) for r in parity if not r.get("probe")),
    "cudnn_causal": by_kind.get(("cudnn", "causal")),
    "cudnn_packed": by_kind.get(("cudnn", "packed")),  # refused: cuDNN here cannot mask documents
    "cudnn_mask_probe": by_kind.get(("cudnn+mask", "packed")),
    "rows": parity,
}
points = rows("points.tsv")
for key, target in TARGETS.items():
    runs = []
    for k, name, overrides in points:
        if k == key:
            r = load(name) or {}
            figures = {f: r[f] for f in FIGURES if f in r} | ({"step_ms": 1e3 * r["step_s"]["median"]} if r else {})
            runs.append({"name": name, "overrides": overrides, "status": items[name]["status"]} | figures)
    done = [r for r in runs if "tokens_per_s_per_device" in r]
    best = max(done, key=lambda r: r["tokens_per_s_per_device"]) if done else {}
    mfu = best.get("mfu")
    s[key] = {"target_mfu": target, "best": best.get("name"), "best_mfu": mfu,
              "meets_target": None if mfu is None else mfu >= target, "points": runs}
prof = load("profile")
s["profile"] = prof and {
    "point": s["gpt2_124m"]["best"],
    "file": "profile.trace.json.gz" if (outdir / "profile.trace.json.gz").is_file() else None,
    "matmul_ceiling": prof["matmul_ceiling"],
} | {k: prof["profile"][k] for k in ("steps", "source", "modules", "op_ms_per_step", "top_ops")}
s["decode"] = load("decode")
json.dump(s, open(work / "summary.json", "w"), indent=1)


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


print(f"summary ({s['mode']}, {seconds} s): " + ", ".join(f"{n} {i['status']}" for n, i in items.items()))
for k in ("cudnn_causal", "cudnn_packed", "cudnn_mask_probe"):
    r = s["attention_parity"][k] or {}
    what = r.get("refused") or r.get("error") or ("ok" if r.get("ok") else "FAIL") + f" {r.get('errors')}"
    print(f"  parity {k:<17} {what[:150] if r else 'not run'}")
for key in TARGETS:
    m = s[key]
    verdict = {None: "no MFU on this device", True: "met", False: "NOT met"}[m["meets_target"]]
    print(f"  {key}: best {m['best']}, MFU {pct(m['best_mfu'])} (target {pct(m['target_mfu'])}: {verdict})")
    for r in m["points"]:
        figures = "" if "step_ms" not in r else (
            f"{r['tokens_per_s_per_device']:,.0f} tok/s, MFU {pct(r['mfu'])}, step {r['step_ms']:.1f} ms, "
            f"{r['peak_memory_gib']:.1f} GiB")
        print(f"    {r['status']:<10} {r['overrides']:<62} {figures}")
if s["profile"]:
    p = s["profile"]
    print(f"  profile of {p['point']} ({p['source']}; modules {', '.join(p['modules'])}): "
          f"top {len(p['top_ops'])} ops of {p['op_ms_per_step']:.3f} ms a step")
    for o in p["top_ops"]:
        print(f"    {o['ms_per_step']:9.3f} ms {100 * o['fraction']:5.1f}%  {o['op']}")
for r in (s["decode"] or {}).get("rows", []):
    print(f"  decode batch {r['batch']}: {r['new_tokens_per_s']:,.1f} new tokens/s, {r['ms_per_step']:.2f} ms a step")
sys.exit(0 if all(i["status"] == "ok" for i in items.values()) else 1)
EOF
"$py" "$work/.py/summary.py" "$work" "$outdir" "$dry" "$SECONDS" 2>&1 | tee -a "$work/suite.log"
exit "${PIPESTATUS[0]}"
