"""CUDA kernels against the CPU kernels and tests/reference.py, plus graph capture, launch counts and timings.

    python3 tools/cuda_smoke.py [--quick] [--no-bench]

Needs a GPU and the extension built in place (python3 setup.py build_ext --inplace).
Prints one "ok"/"FAIL" line per check and the timings; exits 1 if a check failed.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import torch_lightning_cache  # noqa: E402,F401  (loads the ops)
from reference import ref_lightning  # noqa: E402

ops = torch.ops.lightning_cache
DEV = "cuda"
FAILS = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else "  " + str(detail)), flush=True)
    if not cond:
        FAILS.append(name)


def guarded(name, fn):
    try:
        fn()
    except Exception as e:  # a crash in one case must not hide the others
        check(name, False, f"{type(e).__name__}: {str(e)[:300]}")


def strided(t):
    """Same values, non-contiguous last-dim-unit layout (a slice of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    wide[..., 1 : 1 + t.shape[-1]] = t
    return wide[..., 1 : 1 + t.shape[-1]]


def concat_case(cache_dt, in_dt, B, L, H, Dk, Dv, q, starts, mask_kind, ring=False, check_bounds=True, layout="dense"):
    g = torch.Generator().manual_seed(hash((B, L, H, Dk, Dv, q, mask_kind, ring, layout)) % 2**31)
    kv0 = torch.randn(B, L, H, Dk + Dv, generator=g).to(cache_dt)
    idx0 = torch.tensor(starts, dtype=torch.long)
    key = torch.randn(B, q, H, Dk, generator=g).to(in_dt)
    value = torch.randn(B, q, H, Dv, generator=g).to(in_dt)
    am = cm = tt = None
    is_causal = False
    if mask_kind in ("2d_bool", "2d_int64", "2d_float", "2d_uint8"):
        base = torch.rand(B, L, generator=g) > 0.3
        am = {"2d_bool": base, "2d_int64": base.long(), "2d_float": base.float(), "2d_uint8": base.to(torch.uint8)}[
            mask_kind
        ]
        is_causal = True
    elif mask_kind == "2d_bool_nocausal":
        am = torch.rand(B, L, generator=g) > 0.3
    elif mask_kind == "4d_bool":
        am = torch.rand(B, 1, q, L, generator=g) > 0.3
    elif mask_kind == "causal":
        is_causal = True
    elif mask_kind == "explicit_causal":
        cm = torch.tril(torch.ones(L + 4, L + 4, dtype=torch.bool))
    elif mask_kind == "token_types":
        is_causal = True
        tt = torch.randint(0, 3, (B, q), generator=g)
    outs = {}
    for dev in ("cpu", DEV):
        kv, idx = kv0.clone().to(dev), idx0.clone().to(dev)
        k, v = key.to(dev), value.to(dev)
        if layout == "strided":
            k, v = strided(k), strided(v)
        mask = ops.concatenate_to_cache(
            kv, idx, k, v, None if am is None else am.to(dev), None if cm is None else cm.to(dev),
            None if tt is None else tt.to(dev), is_causal, ring, check_bounds,
        )
        outs[dev] = (kv.cpu(), idx.cpu(), mask.cpu())
        if dev == DEV:  # write_to_cache writes the same cache and positions
            kv2, idx2 = kv0.clone().to(dev), idx0.clone().to(dev)
            ops.write_to_cache(kv2, idx2, k, v, ring, check_bounds)
            outs["w"] = (kv2.cpu(), idx2.cpu())
    a, b = outs["cpu"], outs[DEV]
    same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    same_w = torch.equal(a[0], outs["w"][0]) and torch.equal(a[1], outs["w"][1])
    name = f"concat {cache_dt}/{in_dt} B{B} L{L} H{H} D{Dk}+{Dv} q{q} {mask_kind} ring={ring} cb={check_bounds} {layout}"
    check(name, same, f"kv {torch.equal(a[0], b[0])} idx {a[1].tolist()} vs {b[1].tolist()} mask {torch.equal(a[2], b[2])}")
    check("write_to_cache " + name, same_w)


def concat_suite(quick):
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    dtype_pairs = [(bf16, bf16), (f32, f32), (f16, f32), (bf16, f32), (f64, f64), (f32, f64), (bf16, f64), (f64, bf16)]
    if quick:
        dtype_pairs = dtype_pairs[:3]
    for cdt, idt in dtype_pairs:
        guarded(f"concat {cdt}/{idt}", lambda: concat_case(cdt, idt, 3, 64, 2, 16, 16, 5, [0, 7, 59], "2d_bool"))
    shapes = [(3, 64, 2, 16, 16), (3, 40, 2, 8, 24), (2, 37, 3, 5, 3), (1, 48, 4, 128, 128)]
    kinds = ["none", "causal", "2d_bool", "2d_uint8", "2d_int64", "2d_float", "2d_bool_nocausal", "4d_bool",
             "explicit_causal", "token_types"]
    for B, L, H, Dk, Dv in shapes[: 2 if quick else 4]:
        for kind in kinds:
            for q in (1, 4):
                starts = [min(s, L - q) for s in ([0, 5, L - q] * B)[:B]]
                for layout in ("dense", "strided"):
                    guarded(f"concat {kind}", lambda: concat_case(torch.bfloat16, torch.bfloat16, B, L, H, Dk, Dv, q,
                                                                 starts, kind, layout=layout))
        # ring: positions past L wrap
        guarded("ring", lambda: concat_case(torch.float32, torch.float32, B, L, H, Dk, Dv, 3,
                                            [(L + 5 + 7 * b) for b in range(B)], "2d_bool", ring=True))
        guarded("ring causal", lambda: concat_case(torch.float32, torch.float32, B, L, H, Dk, Dv, 3,
                                                   [(3 * L - 1 + b) for b in range(B)], "causal", ring=True))
    # hostile positions with checks off: row skipped whole, mask row false, index kept
    hostile = [-5, 64, 2**63 - 1, -(2**63), 62, 2**63 - 3]
    for ring in (False, True):
        for kind in ("causal", "2d_bool", "explicit_causal"):
            guarded("hostile", lambda: concat_case(torch.bfloat16, torch.bfloat16, 6, 64, 2, 16, 16, 3, hostile, kind,
                                                   ring=ring, check_bounds=False))

    def zero_batch():
        kv, idx = torch.zeros(0, 16, 2, 8, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV)
        k = torch.zeros(0, 1, 2, 4, device=DEV)
        m = ops.concatenate_to_cache(kv, idx, k, k, None, None, None, True, False, True)
        ops.write_to_cache(kv, idx, k, k, False, True)
        torch.cuda.synchronize()
        check("B=0 concatenate/write_to_cache", m.shape == (0, 1, 1, 16))

    guarded("B=0", zero_batch)


def lightning_case(Dk, Dv, n, state_dt, in_dt, slots_kind, B=3, H=2, slots=5, strided_in=False):
    g = torch.Generator().manual_seed(Dk * 1000 + Dv * 10 + n)
    S = slots if slots_kind != "none" else B
    state0 = torch.randn(S, H, Dk, Dv, generator=g).to(state_dt)
    q = torch.randn(B, n, H, Dk, generator=g).to(in_dt)
    k = torch.randn(B, n, H, Dk, generator=g).to(in_dt) / Dk**0.5
    v = torch.randn(B, n, H, Dv, generator=g).to(in_dt)
    slopes = torch.rand(H, generator=g) + 0.1
    sid = {"none": None, "perm": torch.tensor([4, 0, 2][:B]), "skip": torch.tensor([-1, 3, 1][:B]),
           "dup": torch.tensor([2, 2, 0][:B]), "oob": torch.tensor([7, 1, -9][:B])}[slots_kind]
    # oracle: ref_lightning (skip out-of-range ids, first occurrence wins)
    ref_state, ref_out = ref_lightning(state0, q, k, v, slopes, slot_ids=sid)
    for op_name in ("decode", "prefill"):
        st = state0.clone().to(DEV)
        qd, kd, vd = (x.to(DEV) for x in (q, k, v))
        if strided_in:
            qd, kd, vd = strided(qd), strided(kd), strided(vd)
        sd = None if sid is None else sid.to(DEV)
        if op_name == "decode":
            out = ops.lightning_decode(st, qd, kd, vd, slopes.to(DEV), sd, 1.0, False)
        else:
            out = ops.lightning_prefill(st, qd, kd, vd, slopes.to(DEV), None, sd, 2, 1.0, False)
        tol = dict(rtol=2e-2, atol=2e-2) if torch.bfloat16 in (state_dt, in_dt) or in_dt == torch.float16 else dict(
            rtol=1e-4, atol=1e-4)
        name = ("(needs the sanitizing prepare_slot_ids) " if op_name == "prefill" and slots_kind == "dup" else "")
        name += f"{op_name} Dk{Dk} Dv{Dv} n{n} {state_dt}/{in_dt} slots={slots_kind} strided={strided_in}"
        ok_out = torch.allclose(out.cpu().float(), ref_out.float(), **tol)
        ok_state = torch.allclose(st.cpu().float(), ref_state.float(), **tol)
        check(name, ok_out and ok_state,
              f"out {ok_out} ({(out.cpu().float() - ref_out.float()).abs().max():.3g}) state {ok_state}")


def lightning_suite(quick):
    dims = [(64, 64), (128, 128), (100, 40), (200, 96), (256, 128), (512, 33), (8, 8)]
    for Dk, Dv in dims[:3] if quick else dims:
        for n in (1, 3):
            guarded("decode", lambda: lightning_case(Dk, Dv, n, torch.float32, torch.float32, "none"))
    for slots_kind in ("perm", "skip", "dup", "oob"):
        guarded("slots", lambda: lightning_case(128, 128, 2, torch.float32, torch.float32, slots_kind))
    for sdt, idt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float32, torch.bfloat16)):
        guarded("dtypes", lambda: lightning_case(128, 64, 3, sdt, idt, "skip", strided_in=True))

    def zero():
        st = torch.zeros(0, 2, 8, 8, device=DEV)
        x = torch.zeros(0, 1, 2, 8, device=DEV)
        out = ops.lightning_decode(st, x, x, x, torch.ones(2, device=DEV), None, 1.0, True)
        torch.cuda.synchronize()
        check("decode B=0", out.shape == (0, 1, 2, 8))

    guarded("decode B=0", zero)


def graph_suite():
    B, L, H, D = 4, 64, 2, 16
    kv = torch.zeros(B, L, H, 2 * D, device=DEV, dtype=torch.bfloat16)
    idx = torch.tensor([0, 3, 60, 10], device=DEV)
    kv_ref, idx_ref = kv.clone(), idx.clone()
    kv_w, idx_w = kv.clone(), idx.clone()
    state = torch.randn(B, H, D, D, device=DEV)
    state_ref = state.clone()
    slopes = torch.rand(H, device=DEV) + 0.1
    k = torch.randn(B, 1, H, D, device=DEV, dtype=torch.bfloat16)
    am = torch.ones(B, L, dtype=torch.bool, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up
        for _ in range(2):
            ops.concatenate_to_cache(kv.clone(), idx.clone(), k, k, am, None, None, True, False, False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = ops.concatenate_to_cache(kv, idx, k, k, am, None, None, True, False, True)
        ops.write_to_cache(kv_w, idx_w, k, k, False, True)
        out = ops.lightning_decode(state, k.float(), k.float(), k.float(), slopes, None, 1.0, True)
    for step in range(6):
        graph.replay()
        m_ref = ops.concatenate_to_cache(kv_ref, idx_ref, k, k, am, None, None, True, False, False)
        o_ref = ops.lightning_decode(state_ref, k.float(), k.float(), k.float(), slopes, None, 1.0, False)
        torch.cuda.synchronize()
        ok = (torch.equal(kv, kv_ref) and torch.equal(idx, idx_ref) and torch.equal(mask, m_ref)
              and torch.equal(kv_w, kv_ref) and torch.equal(idx_w, idx_ref) and torch.equal(out, o_ref)
              and torch.equal(state, state_ref))
        check(f"CUDA graph replay {step} (row 2 overflows at step 4: skipped)", ok, f"idx {idx.tolist()} ref {idx_ref.tolist()}")


def count_kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return names


def launches():
    B, L, H, D = 8, 8192, 8, 128
    kv = torch.zeros(B, L, H, 2 * D, device=DEV, dtype=torch.bfloat16)
    idx = torch.zeros(B, dtype=torch.long, device=DEV)
    k = torch.randn(B, 1, H, D, device=DEV, dtype=torch.bfloat16)
    am = torch.ones(B, L, dtype=torch.bool, device=DEV)
    n1 = count_kernels(lambda: ops.concatenate_to_cache(kv, idx, k, k, am, None, None, True, False, False))
    check("concatenate_to_cache: one launch", len(n1) == 1, n1)
    n2 = count_kernels(lambda: ops.write_to_cache(kv, idx, k, k, False, False))
    check("write_to_cache: one launch", len(n2) == 1, n2)


def wall_us(fn, iters=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def gpu_us(fn, iters=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def bench():
    print(f"\n-- timings on {torch.cuda.get_device_name()}")
    bf16 = torch.bfloat16
    for B in (64, 1):
        H, D = 64, 128
        state = torch.randn(B, H, D, D, device=DEV)
        other = torch.empty_like(state)
        x = torch.randn(B, 1, H, D, device=DEV, dtype=bf16)
        slopes = torch.rand(H, device=DEV)
        dec = gpu_us(lambda: ops.lightning_decode(state, x, x, x, slopes, None, 1.0, False))
        cp = gpu_us(lambda: other.copy_(state))
        wall = wall_us(lambda: ops.lightning_decode(state, x, x, x, slopes, None, 1.0, False))
        print(f"decode B={B} H=64 D=128 f32 state, 1 token: {dec:.1f} us GPU ({wall:.1f} us wall/call); "
              f"state copy {cp:.1f} us -> ratio {dec / cp:.2f}")
    x4 = torch.randn(64, 4, 64, 128, device=DEV, dtype=bf16)
    state = torch.randn(64, 64, 128, 128, device=DEV)
    print(f"decode B=64 4 tokens: {gpu_us(lambda: ops.lightning_decode(state, x4, x4, x4, slopes, None, 1.0, False)):.1f} us")
    B, L, H, D = 8, 8192, 8, 128
    kv = torch.zeros(B, L, H, 2 * D, device=DEV, dtype=bf16)
    idx = torch.zeros(B, dtype=torch.long, device=DEV)
    k = torch.randn(B, 1, H, D, device=DEV, dtype=bf16)
    am = torch.ones(B, L, dtype=torch.bool, device=DEV)

    def reset():
        idx.zero_()

    for label, fn in [
        ("concat 1 tok is_causal", lambda: ops.concatenate_to_cache(kv, idx, k, k, None, None, None, True, False, False)),
        ("concat 1 tok is_causal + 2D bool mask",
         lambda: ops.concatenate_to_cache(kv, idx, k, k, am, None, None, True, False, False)),
        ("concat 1 tok 2D int64 mask",
         lambda: ops.concatenate_to_cache(kv, idx, k, k, am.long(), None, None, True, False, False)),
        ("write_to_cache 1 tok", lambda: ops.write_to_cache(kv, idx, k, k, False, False)),
    ]:
        reset()
        w = wall_us(fn, 100)
        reset()
        g = gpu_us(fn, 100)
        print(f"{label} (B=8 H=8 D=128 L=8192 bf16, check_bounds=False): {w:.1f} us wall/call, {g:.1f} us GPU")
    kv1 = torch.zeros(1, 4096, 8, 2 * 128, device=DEV, dtype=bf16)
    idx1 = torch.zeros(1, dtype=torch.long, device=DEV)
    kk = torch.randn(1, 2048, 8, 128, device=DEV, dtype=bf16)
    src = torch.randn(1, 2048, 8, 256, device=DEV, dtype=bf16)

    def w2048():
        idx1.zero_()
        ops.write_to_cache(kv1, idx1, kk, kk, False, False)

    g = gpu_us(w2048)
    z = gpu_us(lambda: idx1.zero_())
    c = gpu_us(lambda: kv1[:, :2048].copy_(src))
    print(f"write_to_cache 2048 tokens (B=1 H=8 D=128 bf16, 8 MiB): {g - z:.1f} us vs copy of the bytes {c:.1f} us")
    kvm = torch.zeros(1, 4096, 8, 2 * 128, device=DEV, dtype=bf16)

    def c2048():
        idx1.zero_()
        ops.concatenate_to_cache(kvm, idx1, kk, kk, None, None, None, True, False, False)

    print(f"concatenate 2048 tokens causal (mask 2048 x 4096): {gpu_us(c2048) - z:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    guarded("concat suite", lambda: concat_suite(args.quick))
    guarded("lightning suite", lambda: lightning_suite(args.quick))
    guarded("graph suite", graph_suite)
    if not args.quick:
        guarded("launches", launches)
    if not args.no_bench:
        guarded("bench", bench)
    print(f"\n{len(FAILS)} failed: {FAILS[:20]}")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
