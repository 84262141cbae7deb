"""CUDA kernels against the CPU kernels and tests/reference.py, plus graph capture, launch counts and timings.

    python3 tools/cuda_smoke.py [--quick] [--no-bench] [--fused-only] [--device cuda|cpu]

Needs a GPU and the extension built in place (python3 setup.py build_ext --inplace).
Prints one "ok"/"FAIL" line per check and the timings; exits 1 if a check failed.
``--device cpu`` dry-runs the script's own logic without a GPU (the CPU is then compared
with itself; graph capture, launch counts and timings are skipped).

Exactness: pool writes, quantized writes (int8 and fp8 codes, scales) and dequantize_kv
must equal the CPU kernel bit for bit. Both backends quantize with the same
C10_HOST_DEVICE code (csrc/quantize_rule.h): one IEEE division amax / code_max, one
division x / scale, rintf (ties to even) or c10's software e4m3fn conversion; nvcc is not
given --use_fast_math, so division is correctly rounded and the codes cannot differ. A
mismatch is reported with its largest code difference (and a separate "within 1 code"
line says whether it is a rounding-tie difference or a real bug).
"""

import argparse
import os
import sys
import time
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the in-place build and the reference
import torch_lightning_cache  # noqa: E402,F401  (loads the ops)
from reference import (  # noqa: E402
    ref_cached_attention, ref_dequantize_kv, ref_lightning, ref_lightning_accept, ref_lightning_packed,
    ref_quantize_kv_tokens, ref_quantized_write, ref_rewind_cache,
)

ops = torch.ops.lightning_cache
DEV = "cuda"  # --device
FAILS = []


def sync():
    if torch.device(DEV).type == "cuda":
        torch.cuda.synchronize()


def seeded(*key):
    """A CPU generator seeded from the case's parameters, the same in every process (hash() of str is not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


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
    g = seeded(B, L, H, Dk, Dv, q, mask_kind, ring, layout)
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
        sync()
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
        sync()
        check("decode B=0", out.shape == (0, 1, 2, 8))

    guarded("decode B=0", zero)


# ------------------------------------------------------------------ checks added with pools, quantized storage,
# cached_attention, prefix checkpoints and speculative decoding (issue 11)


def bits(t):
    """Bit pattern of a tensor on the CPU (NaN-safe equality for floats, fp8 codes as bytes)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def rel_err(actual, expected):
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.shape != e.shape:
        return float("inf")
    den = e.abs().max().item() if e.numel() else 0.0
    num = (a - e).abs().max().item() if a.numel() else 0.0
    return num if den == 0.0 else num / den


def code_diff(a, b):
    """Largest difference of two code tensors in code units (fp8: in e4m3 steps, via the byte order)."""
    if a.dtype == torch.float8_e4m3fn:  # adjacent e4m3 values of one sign have adjacent byte values
        a, b = bits(a).to(torch.int16), bits(b).to(torch.int16)
    return (a.cpu().to(torch.int64) - b.cpu().to(torch.int64)).abs().max().item() if a.numel() else 0


def on_both(fn):
    """fn(device) on the CPU and on DEV (each gets its own copies); returns (cpu result, DEV result)."""
    return fn("cpu"), fn(DEV)


def pool_case(P, B, L, H, Dk, Dv, q, starts, ids, mask_kind, ring=False, check_bounds=True, write_only=False,
              cache_dt=torch.bfloat16, in_dt=torch.float32):
    g = seeded(P, B, L, q, tuple(ids), mask_kind, ring, write_only)
    kv0 = torch.randn(P, L, H, Dk + Dv, generator=g).to(cache_dt)
    idx0 = torch.tensor(starts, dtype=torch.long)
    key = torch.randn(B, q, H, Dk, generator=g).to(in_dt)
    value = torch.randn(B, q, H, Dv, generator=g).to(in_dt)
    am = (torch.rand(B, L, generator=g) > 0.3) if mask_kind == "2d_bool" else None
    tt = torch.randint(0, 3, (B, q), generator=g) if mask_kind == "token_types" else None
    sid = torch.tensor(ids, dtype=torch.long)

    def run(dev):
        kv, idx = kv0.clone().to(dev), idx0.clone().to(dev)
        k, v = strided(key.to(dev)), value.to(dev)
        if write_only:
            ops.write_to_cache(kv, idx, k, v, ring, check_bounds, sid.to(dev), None)
            return kv.cpu(), idx.cpu(), None
        m = ops.concatenate_to_cache(kv, idx, k, v, None if am is None else am.to(dev), None,
                                     None if tt is None else tt.to(dev), mask_kind != "none", ring, check_bounds,
                                     sid.to(dev), None)
        return kv.cpu(), idx.cpu(), m.cpu()

    a, b = on_both(run)
    ok = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and (write_only or torch.equal(a[2], b[2]))
    op = "write_to_cache" if write_only else "concatenate_to_cache"
    check(f"pool {op} P{P} B{B} L{L} q{q} ids={ids} starts={starts} {mask_kind} ring={ring} cb={check_bounds}", ok,
          f"kv {torch.equal(a[0], b[0])} idx {a[1].tolist()} vs {b[1].tolist()}"
          + ("" if write_only else f" mask {torch.equal(a[2], b[2])}"))


def pool_suite(quick):
    cases = [
        # (P, B, L, q, starts, ids, mask, ring, check_bounds)
        (5, 3, 32, 1, [0, 4, 9, 31, 2], [2, -1, 0], "causal", False, True),         # -1 skips
        (5, 3, 32, 4, [0, 4, 9, 28, 2], [3, 0, 4], "2d_bool", False, True),         # permuted rows
        (4, 4, 32, 2, [1, 2, 3, 4], [1, 1, 3, 1], "causal", False, False),         # repeats: first wins
        (4, 4, 32, 2, [1, 2, 3, 4], [7, -9, 2, 2**62], "2d_bool", False, False),   # out of range: skipped
        (4, 3, 16, 3, [30, 15, 47, 0], [3, -1, 0], "causal", True, True),          # ring past L
        (4, 3, 16, 3, [30, 15, 47, 0], [2, 2, -5], "token_types", True, False),    # ring + repeats, checks off
        (3, 2, 32, 2, [31, 5, 0], [0, 1], "causal", False, False),                  # overflowing row skipped
    ]
    for P, B, L, q, starts, ids, kind, ring, cb in cases[:5] if quick else cases:
        for write_only in (False, True):
            guarded(f"pool {ids}", lambda: pool_case(P, B, L, 2, 16, 8, q, starts, ids, kind, ring, cb, write_only))
    if not quick:
        guarded("pool f32/bf16", lambda: pool_case(5, 3, 64, 4, 128, 128, 3, [0, 4, 9, 28, 2], [4, -1, 1], "causal",
                                                   cache_dt=torch.float32, in_dt=torch.bfloat16))


def quant_case(fmt, in_dt, P, B, L, H, Dk, Dv, q, starts, ids, ring=False, check_bounds=True, special=False):
    g = seeded(fmt, str(in_dt), P, B, L, H, Dk, Dv, q, str(ids), ring)
    code_dt = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[fmt]
    codes0 = torch.randint(-100, 100, (P, L, H, Dk + Dv), generator=g).to(code_dt)
    scales0 = torch.rand(P, L, H, 2, generator=g)
    idx0 = torch.tensor(starts, dtype=torch.long)
    key = (torch.randn(B, q, H, Dk, generator=g) * 3).to(in_dt)
    value = torch.randn(B, q, H, Dv, generator=g).to(in_dt)
    if special:  # an all-zero token-head (scale 0), a NaN one (scale NaN, codes 0), an exact tie, a huge value
        key[0, 0, 0] = 0
        value[-1, -1, -1, 0] = float("nan")
        key[-1, 0, 0, :2] = torch.tensor([254.0, 1.0]).to(in_dt)  # int8: x / scale = 0.5 exactly
        value[0, -1, 0, 0] = 6e4 if in_dt != torch.float16 else 6e4
    if special == "float32-max":  # issue 24: amax at float32's top; the capped scale keeps code * scale finite
        top = torch.finfo(torch.float32).max
        key[..., 0] = top
        value[..., -1] = -top
        key[0, 0, 0, :2] = torch.tensor([top, -top])
    sid = None if ids is None else torch.tensor(ids, dtype=torch.long)
    name = (f"quantized {fmt} {in_dt} P{P} B{B} H{H} D{Dk}+{Dv} q{q} ids={ids} ring={ring} cb={check_bounds}"
            f"{' special' if special else ''}")

    def run(dev, write_only):
        kv, sc, idx = codes0.clone().to(dev), scales0.clone().to(dev), idx0.clone().to(dev)
        k, v = key.to(dev), strided(value.to(dev))
        s = None if sid is None else sid.to(dev)
        if write_only:
            ops.write_to_cache(kv, idx, k, v, ring, check_bounds, s, sc)
            m = None
        else:
            m = ops.concatenate_to_cache(kv, idx, k, v, None, None, None, True, ring, check_bounds, s, sc).cpu()
        return kv.cpu(), sc.cpu(), idx.cpu(), m

    for write_only in (False, True):
        op = "write_to_cache" if write_only else "concatenate_to_cache"
        a, b = run("cpu", write_only), run(DEV, write_only)
        same = same_bits(a[0], b[0]) and same_bits(a[1], b[1]) and torch.equal(a[2], b[2]) and (
            write_only or torch.equal(a[3], b[3]))
        check(f"{op} {name}: codes and scales bit-equal to CPU", same,
              f"codes {same_bits(a[0], b[0])} (max diff {code_diff(a[0], b[0])} codes) "
              f"scales {same_bits(a[1], b[1])} idx {torch.equal(a[2], b[2])}")
        if not same:
            check(f"{op} {name}: codes within 1 of CPU", code_diff(a[0], b[0]) <= 1 and torch.equal(a[2], b[2]),
                  code_diff(a[0], b[0]))
        if not write_only and check_bounds:  # the oracle (checks on: its rows rule is the op's)
            ref_kv, ref_sc, ref_idx = ref_quantized_write(codes0, scales0, idx0, key, value, fmt, ring=ring,
                                                          slot_ids=sid)
            check(f"{op} {name}: equals ref_quantized_write",
                  same_bits(b[0], ref_kv) and same_bits(b[1], ref_sc) and torch.equal(b[2], ref_idx),
                  f"codes max diff {code_diff(b[0], ref_kv)} scales {same_bits(b[1], ref_sc)}")
        if write_only:
            continue
        # dequantize_kv of what was written, every output dtype, CPU vs DEV vs reference
        for dt in (torch.float32, torch.bfloat16) if check_bounds else (torch.float16, torch.float64):
            kc, vc = ops.dequantize_kv(a[0], a[1], Dk, dt)
            kd, vd = ops.dequantize_kv(b[0].to(DEV), b[1].to(DEV), Dk, dt)
            kr, vr = ref_dequantize_kv(a[0], a[1], Dk, dt)
            ok = same_bits(kc, kd.cpu()) and same_bits(vc, vd.cpu()) and same_bits(kd.cpu(), kr) and same_bits(
                vd.cpu(), vr) and kd.device.type == torch.device(DEV).type
            check(f"dequantize_kv {fmt} -> {dt} (from {name})", ok)


def quant_suite(quick):
    fmts = ("int8", "fp8_e4m3")
    for fmt in fmts:
        for in_dt in (torch.float32, torch.bfloat16):
            # D = 128 + 128: full-warp amax shuffles; 5 + 3: 8-lane shuffle groups (several heads per warp)
            guarded("quant", lambda: quant_case(fmt, in_dt, 3, 3, 24, 2, 128, 128, 2, [0, 5, 22], None))
            guarded("quant", lambda: quant_case(fmt, in_dt, 4, 3, 24, 3, 5, 3, 3, [0, 5, 21, 9], [3, -1, 0],
                                                special=True))
        guarded("quant float32 max", lambda: quant_case(fmt, torch.float32, 4, 3, 24, 2, 8, 8, 2, [0, 5, 21, 9],
                                                        [3, -1, 0], special="float32-max"))
        guarded("quant ring", lambda: quant_case(fmt, torch.float32, 4, 3, 16, 2, 16, 16, 3, [30, 15, 47, 0],
                                                 [2, 2, 7], ring=True, check_bounds=False))
    if quick:
        return
    for fmt in fmts:
        for in_dt in (torch.float16, torch.float64):
            guarded("quant dtypes", lambda: quant_case(fmt, in_dt, 3, 3, 24, 2, 64, 32, 2, [0, 5, 22], [1, 0, 2]))
        # more heads than the block's y-threads (tx = 32 -> 8 rows of heads): heads loop twice, unevenly
        guarded("quant H10", lambda: quant_case(fmt, torch.bfloat16, 2, 2, 40, 10, 64, 64, 5, [0, 30], None,
                                                special=True))
        guarded("quant 1 token", lambda: quant_case(fmt, torch.float32, 6, 4, 64, 8, 128, 128, 1, [0, 9, 63, 2, 4, 5],
                                                    [5, 0, -1, 3]))
        guarded("quant bad ids", lambda: quant_case(fmt, torch.float32, 4, 4, 16, 2, 8, 8, 2, [1, 15, 3, 4],
                                                    [1, 1, 9, 2], check_bounds=False))


def attention_case(storage, B, L, H, group, Dk, Dv, q, query_dt=torch.float32, masked_rows=False, strided_in=False,
                   softmax_scale=None, positions=None):
    g = seeded(storage, B, L, H, group, Dk, Dv, q, str(query_dt))
    dense = torch.randn(B, L, H, Dk + Dv, generator=g)
    index = torch.tensor(positions if positions is not None else
                         [int(torch.randint(0, L - q + 1, (1,), generator=g)) for _ in range(B)])
    nk, nv = torch.randn(B, q, H, Dk, generator=g), torch.randn(B, q, H, Dv, generator=g)
    mask = ops.concatenate_to_cache(dense, index, nk, nv, None, None, None, True, False, True)
    if masked_rows:  # random masks, one query and one whole batch row seeing nothing
        mask = torch.rand(B, 1, q, L, generator=g) < 0.3
        mask[0, 0, q - 1] = False
        mask[-1] = False
    scales = None
    if storage in ("int8", "fp8_e4m3"):
        kc, ks = ref_quantize_kv_tokens(dense[..., :Dk], storage)
        vc, vs = ref_quantize_kv_tokens(dense[..., Dk:], storage)
        key_value, scales = torch.cat([kc, vc], -1), torch.stack([ks, vs], -1).contiguous()
    else:
        key_value = dense.to(getattr(torch, storage))
    query = torch.randn(B, q, H * group, Dk, generator=g).to(query_dt)
    want = ref_cached_attention(query, key_value, mask, Dk, scales, softmax_scale)

    def run(dev):
        qd, kv = query.to(dev), key_value.to(dev)
        if strided_in:
            qd = qd.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, q, Dk] memory
            wide = torch.zeros(B, L, H, Dk + Dv + 8, dtype=kv.dtype, device=dev)
            wide[..., 4 : 4 + Dk + Dv] = kv
            kv = wide[..., 4 : 4 + Dk + Dv]  # unit last stride, padded heads
        return ops.cached_attention(qd, kv, mask.to(dev), Dk, None if scales is None else scales.to(dev),
                                    softmax_scale)

    got_cpu, got = on_both(run)
    tol = 1e-2 if query_dt != torch.float32 else 1e-4  # float32 accumulation over up to 8192 columns
    err, err_cpu = rel_err(got, want), rel_err(got, got_cpu)
    seen = mask.any(-1).squeeze(1)  # [B, q]
    blind = got.cpu()[~seen]
    zeros_ok = torch.equal(blind, torch.zeros_like(blind))
    ok = (got.shape == want.shape and got.dtype == query_dt and got.device.type == torch.device(DEV).type
          and err <= tol and err_cpu <= 2 * tol and bool(torch.isfinite(got.cpu()).all()) and zeros_ok)
    check(f"cached_attention {storage} q{q} B{B} L{L} H{H} G{group} D{Dk}/{Dv} query {query_dt}"
          f"{' masked' if masked_rows else ''}{' strided' if strided_in else ''}", ok,
          f"rel err vs ref {err:.3g} vs CPU op {err_cpu:.3g} (tol {tol}); masked rows zero {zeros_ok}")


def attention_suite(quick):
    storages = ["float32", "bfloat16", "float16", "int8", "fp8_e4m3"]
    # (q, group, Dk, Dv): q = 1 and q > 1, GQA 1/4/8, lanes holding 1, 2, 4 and 8 dims
    shapes = [(1, 1, 16, 16), (1, 4, 128, 128), (1, 8, 24, 20), (3, 4, 64, 64), (5, 1, 32, 40), (2, 8, 256, 256)]
    for storage in storages if not quick else ["float32", "bfloat16", "int8", "fp8_e4m3"]:
        for q, group, Dk, Dv in shapes[:3] if quick else shapes:
            guarded("attn", lambda: attention_case(storage, 3, 150, 2, group, Dk, Dv, q))
        guarded("attn masked", lambda: attention_case(storage, 3, 140, 2, 2, 24, 24, 4, masked_rows=True))
    # long rows: B * H = 2 blocks of work, so the columns are split (flash-decoding) and combined
    for storage in ["float32", "int8"] if quick else storages:
        for q, group in ((1, 4), (2, 8)) if not quick else ((1, 4),):
            guarded("attn long", lambda: attention_case(storage, 1, 8192, 2, group, 128, 128, q,
                                                        positions=[8192 - q]))
    guarded("attn long masked", lambda: attention_case("fp8_e4m3", 1, 8192, 2, 8, 64, 64, 3, masked_rows=True))
    guarded("attn bf16 query", lambda: attention_case("int8", 2, 300, 2, 4, 64, 64, 1, query_dt=torch.bfloat16))
    guarded("attn strided", lambda: attention_case("bfloat16", 2, 100, 3, 2, 32, 48, 2, strided_in=True,
                                                   softmax_scale=0.3))
    if not quick:
        guarded("attn f16 query", lambda: attention_case("float16", 2, 3000, 4, 8, 128, 128, 1,
                                                         query_dt=torch.float16))
        guarded("attn many rows", lambda: attention_case("int8", 16, 1024, 8, 4, 128, 128, 4))

    def empty():
        out = ops.cached_attention(torch.randn(2, 1, 4, 8, device=DEV), torch.zeros(2, 0, 2, 16, device=DEV),
                                   torch.zeros(2, 1, 1, 0, dtype=torch.bool, device=DEV), 8, None, None)
        out0 = ops.cached_attention(torch.randn(0, 1, 4, 8, device=DEV), torch.zeros(0, 5, 2, 16, device=DEV),
                                    torch.zeros(0, 1, 1, 5, dtype=torch.bool, device=DEV), 8, None, None)
        sync()
        check("cached_attention L=0 (zeros) and B=0", torch.equal(out.cpu(), torch.zeros(2, 1, 4, 8))
              and out0.shape == (0, 1, 4, 8))

    guarded("attn empty", empty)


def checkpoint_case(n, every, C, block, ids, masked, state_dt=torch.float32, B=3, H=2, Dk=16, Dv=24):
    g = torch.Generator().manual_seed(n * 100 + every * 10 + C + block)
    S = B if ids is None else 5
    state0 = (torch.randn(S, H, Dk, Dv, generator=g) * 0.5).to(state_dt)
    q = torch.randn(B, n, H, Dk, generator=g)
    k = torch.randn(B, n, H, Dk, generator=g) / Dk**0.5
    v = torch.randn(B, n, H, Dv, generator=g)
    slopes = torch.rand(H, generator=g) + 0.1
    am = (torch.rand(B, n, generator=g) > 0.2) if masked else None
    sid = None if ids is None else torch.tensor(ids)
    sentinel = (torch.arange(B * C * H * Dk * Dv, dtype=torch.float64).view(B, C, H, Dk, Dv) * 1e3 + 7.25)
    sentinel.view(-1)[::5] = float("nan")
    sentinel = sentinel.to(state_dt)

    def run(dev):
        st, cps = state0.clone().to(dev), sentinel.clone().to(dev)
        out = ops.lightning_prefill(st, q.to(dev), k.to(dev), strided(v.to(dev)), slopes.to(dev),
                                    None if am is None else am.to(dev), None if sid is None else sid.to(dev), block,
                                    1.0, ids is None or -1 in ids, cps, every)
        return out.cpu(), st.cpu(), cps.cpu()

    a, b = on_both(run)
    tol = 2e-2 if state_dt == torch.bfloat16 else 1e-4
    untouched = bits(a[2]) == bits(sentinel)  # entries the CPU op did not write
    ok_untouched = torch.equal(bits(b[2])[untouched], bits(sentinel)[untouched])
    written = ~untouched
    err_cp = rel_err(b[2][written], a[2][written]) if written.any() else 0.0
    err_out, err_state = rel_err(b[0], a[0]), rel_err(b[1], a[1])
    check(f"lightning_prefill checkpoints n{n} every{every} C{C} block{block} ids={ids} masked={masked} {state_dt}",
          ok_untouched and err_cp <= tol and err_out <= tol and err_state <= tol and bool(written.any()),
          f"unwritten kept {ok_untouched}, rel err checkpoints {err_cp:.3g} out {err_out:.3g} state {err_state:.3g}")


def checkpoint_suite(quick):
    cases = [(37, 8, 6, 8, None, False), (37, 5, 8, 8, [4, -1, 0], True), (36, 12, 3, 8, [2, 2, 7], False),
             (40, 13, 4, 16, None, True), (9, 1, 12, 4, [1, 0, 3], False), (70, 24, 2, 256, None, False)]
    for n, every, C, block, ids, masked in cases[:3] if quick else cases:
        guarded("checkpoints", lambda: checkpoint_case(n, every, C, block, ids, masked))
    guarded("checkpoints bf16", lambda: checkpoint_case(33, 8, 4, 8, None, False, state_dt=torch.bfloat16))


def speculative_suite(quick):
    """lightning_decode(step_states=...) (a new kernel store), rewind_cache and lightning_accept."""
    g = torch.Generator().manual_seed(11)
    for state_dt, ids in ((torch.float32, None), (torch.bfloat16, [3, -1, 0]), (torch.float32, [1, 1, 2])):
        B, n, H, Dk, Dv = 3, 4, 2, 64, 48
        S = B if ids is None else 4
        state0 = torch.randn(S, H, Dk, Dv, generator=g).to(state_dt)
        q, k, v = (torch.randn(B, n, H, d, generator=g) for d in (Dk, Dk, Dv))
        slopes = torch.rand(H, generator=g) + 0.1
        sid = None if ids is None else torch.tensor(ids)
        cb = ids is None or len(set(ids)) == len(ids)  # repeated ids only with checks off

        def run(dev):
            st = state0.clone().to(dev)
            steps = torch.full((B, n + 1, H, Dk, Dv), 3.5, dtype=state_dt, device=dev)
            out = ops.lightning_decode(st, q.to(dev), k.to(dev), v.to(dev), slopes.to(dev),
                                       None if sid is None else sid.to(dev), 1.0, cb,
                                       steps)
            accept = torch.tensor([2, 4, 0])
            st2 = state0.clone().to(dev)
            ops.lightning_accept(st2, steps, accept.to(dev), None if sid is None else sid.to(dev), cb)
            return out.cpu(), st.cpu(), steps.cpu(), st2.cpu(), accept

        def guarded_run():
            a, b = on_both(run)
            tol = 2e-2 if state_dt == torch.bfloat16 else 1e-4
            errs = [rel_err(x, y) for x, y in zip(b[:4], a[:4])]
            want_accept = ref_lightning_accept(state0, b[2], b[4], sid)
            check(f"lightning_decode step_states + lightning_accept {state_dt} ids={ids}",
                  max(errs) <= tol and torch.equal(b[3], want_accept.to(b[3].dtype)), f"rel errs {errs}")

        guarded("step_states", guarded_run)

    def rewind():
        for ids, check_bounds in ((None, True), ([2, -1, 0, 2], False), ([3, 0, 9, 1], False)):
            index0 = torch.tensor([5, 0, 9, 2])
            num = torch.tensor([2, 3, 20, 1])
            sid = None if ids is None else torch.tensor(ids)

            def run(dev):
                idx = index0.clone().to(dev)
                ops.rewind_cache(idx, num.to(dev), None if sid is None else sid.to(dev), False, check_bounds)
                return idx.cpu()

            a, b = on_both(run)
            check(f"rewind_cache ids={ids} cb={check_bounds}",
                  torch.equal(a, b) and torch.equal(b, ref_rewind_cache(index0, num, sid)), f"{a} vs {b}")

    guarded("rewind", rewind)


def raising_suite():
    """Each new argument, bad, on DEV: the right Python exception, the process alive, nothing written."""
    d = DEV
    kv = torch.randn(4, 16, 2, 8, device=d)
    idx = torch.tensor([0, 3, 5, 15], device=d)
    k = torch.randn(3, 2, 2, 4, device=d)
    codes = torch.zeros(4, 16, 2, 8, dtype=torch.int8, device=d)
    scales = torch.ones(4, 16, 2, 2, device=d)
    st = torch.randn(3, 2, 4, 4, device=d)
    st6 = torch.randn(6, 2, 4, 4, device=d)  # step_states as a view of it overlap it
    k4 = torch.randn(4, 1, 2, 4, device=d)
    x = torch.randn(3, 5, 2, 4, device=d)
    sl = torch.ones(2, device=d)
    m = torch.ones(4, 1, 1, 16, dtype=torch.bool, device=d)
    qa = torch.randn(4, 1, 4, 4, device=d)
    big_kv = torch.zeros(1, 4, 1, 600, device=d)
    ids = lambda *v: torch.tensor(v, device=d)  # noqa: E731
    bt = torch.zeros(4, 2, dtype=torch.int64, device=d)
    cases = [
        # SPEC 11 arguments: validated the same on every device
        ("write_to_cache ring=True with block_tables", ValueError,
         lambda: ops.write_to_cache(kv, idx, k, k, True, True, None, None, bt, None)),
        ("cached_attention mask and cache_seqlens together", ValueError,
         lambda: ops.cached_attention(qa, kv, m, 4, None, None, None, None, ids(1, 1, 1, 1), None, True)),
        ("lightning_prefill attention_mask with cu_seqlens", ValueError,
         lambda: ops.lightning_prefill(st, x[:1], x[:1], x[:1], sl, torch.ones(1, 5, device=d), None, 256, 1.0, True,
                                       None, 0, ids(0, 2, 5))),
        ("concatenate_to_cache slot id out of range", IndexError,
         lambda: ops.concatenate_to_cache(kv, idx, k, k, None, None, None, True, False, True, ids(5, 0, 1), None)),
        ("write_to_cache repeated slot id", IndexError,
         lambda: ops.write_to_cache(kv, idx, k, k, False, True, ids(1, 1, 0), None)),
        ("write_to_cache slot_ids int32", TypeError,
         lambda: ops.write_to_cache(kv, idx, k, k, False, True, ids(1, 2, 0).int(), None)),
        ("write_to_cache slot_ids wrong length", ValueError,
         lambda: ops.write_to_cache(kv, idx, k, k, False, True, ids(1, 2), None)),
        ("write_to_cache slot row overflows", IndexError,
         lambda: ops.write_to_cache(kv, idx, k, k, False, True, ids(3, 0, 1), None)),
        ("write_to_cache int8 without scales", ValueError,
         lambda: ops.write_to_cache(codes, idx, k, k, False, True, ids(1, 2, 0), None)),
        ("concatenate_to_cache float64 scales", TypeError,
         lambda: ops.concatenate_to_cache(codes, idx, k, k, None, None, None, True, False, True, ids(1, 2, 0),
                                          scales.double())),
        ("write_to_cache scales wrong shape", ValueError,
         lambda: ops.write_to_cache(codes, idx, k, k, False, True, ids(1, 2, 0), scales[:, :8])),
        ("write_to_cache scales with float storage", ValueError,
         lambda: ops.write_to_cache(kv, idx, k, k, False, True, ids(1, 2, 0), scales)),
        ("write_to_cache quantized overflow", IndexError,
         lambda: ops.write_to_cache(codes, idx, k, k, False, True, ids(3, 2, 0), scales)),
        ("dequantize_kv key_dim", ValueError, lambda: ops.dequantize_kv(codes, scales, 8, torch.float32)),
        ("dequantize_kv float storage", TypeError, lambda: ops.dequantize_kv(kv, scales, 4, torch.float32)),
        ("dequantize_kv int dtype", TypeError, lambda: ops.dequantize_kv(codes, scales, 4, torch.int32)),
        ("cached_attention heads not a multiple", ValueError,
         lambda: ops.cached_attention(qa[:, :, :3], kv, m, 4, None, None)),
        ("cached_attention uint8 mask", TypeError,
         lambda: ops.cached_attention(qa, kv, m.to(torch.uint8), 4, None, None)),
        ("cached_attention int8 without scales", ValueError, lambda: ops.cached_attention(qa, codes, m, 4, None, None)),
        ("cached_attention NaN softmax_scale", ValueError,
         lambda: ops.cached_attention(qa, kv, m, 4, None, float("nan"))),
        ("lightning_prefill checkpoints without checkpoint_every", ValueError,
         lambda: ops.lightning_prefill(st, x, x, x, sl, None, None, 2, 1.0, True, torch.zeros(3, 2, 2, 4, 4, device=d),
                                       0)),
        ("lightning_prefill checkpoints wrong shape", ValueError,
         lambda: ops.lightning_prefill(st, x, x, x, sl, None, None, 2, 1.0, True, torch.zeros(3, 2, 2, 4, 3, device=d),
                                       2)),
        ("lightning_prefill checkpoints float64", TypeError,
         lambda: ops.lightning_prefill(st, x, x, x, sl, None, None, 2, 1.0, True,
                                       torch.zeros(3, 2, 2, 4, 4, dtype=torch.float64, device=d), 2)),
        ("lightning_decode step_states wrong shape", ValueError,
         lambda: ops.lightning_decode(st, x, x, x, sl, None, 1.0, True, torch.zeros(3, 5, 2, 4, 4, device=d))),
        ("rewind_cache ring", ValueError,
         lambda: ops.rewind_cache(idx, torch.ones(4, dtype=torch.long, device=d), None, True, True)),
        ("lightning_accept num_accepted out of range", IndexError,
         lambda: ops.lightning_accept(st, torch.zeros(3, 6, 2, 4, 4, device=d), torch.full((3,), 9, device=d), None,
                                      True)),
    ]
    # Aliasing (issue 24): a written argument sharing memory with another one is a ValueError, before any write.
    cases += [
        ("lightning_decode key is a view of state", ValueError,
         lambda: ops.lightning_decode(st, x[:, :1], st.view(3, 1, 2, 16)[..., :4], x[:, :1], sl, None, 1.0, True,
                                      None)),
        ("lightning_decode step_states overlapping state", ValueError,
         lambda: ops.lightning_decode(st6, x[:, :1], x[:, :1], x[:, :1], sl, ids(0, 1, 2), 1.0, True,
                                      st6.view(3, 2, 2, 4, 4))),
        ("lightning_prefill checkpoints overlapping key", ValueError,
         lambda: ops.lightning_prefill(st, x, x.clone(), x, sl, None, None, 2, 1.0, True,
                                       x.view(-1)[:96].view(3, 1, 2, 4, 4), 2)),
        ("write_to_cache key is a view of key_value", ValueError,
         lambda: ops.write_to_cache(kv, idx, kv[:3, :2, :, :4], kv[:3, :2, :, 4:], False, True, ids(1, 2, 0), None)),
        ("rewind_cache num_tokens is index", ValueError,
         lambda: ops.rewind_cache(idx, idx, None, False, True)),
        ("lightning_accept step_states holding state", ValueError,
         lambda: ops.lightning_accept(st, st.view(3, 1, 2, 4, 4), torch.zeros(3, dtype=torch.long, device=d), None,
                                      True)),
    ]
    if torch.device(d).type == "cuda":
        cases.append(("cached_attention key_dim > 256 (CUDA kernel limit)", ValueError,
                      lambda: ops.cached_attention(torch.zeros(1, 1, 1, 300, device=d), big_kv,
                                                   torch.ones(1, 1, 1, 4, dtype=torch.bool, device=d), 300, None,
                                                   None)))
    before = [t.clone() for t in (kv, idx, codes, scales, st, st6)]
    for name, error, fn in cases:
        try:
            fn()
            check(f"raises on {d}: {name}", False, "no exception")
        except error as e:
            check(f"raises on {d}: {name} -> {error.__name__}", True)
            del e
        except Exception as e:  # noqa: BLE001
            check(f"raises on {d}: {name}", False, f"{type(e).__name__} instead of {error.__name__}: {str(e)[:200]}")
    sync()
    untouched = all(torch.equal(bits(a), bits(b)) for a, b in zip(before, (kv, idx, codes, scales, st, st6)))
    check(f"every refused call on {d} left its tensors as they were", untouched)
    # The serving layouts' own value checks, raised from the host plan on every device.
    for name, error, fn in [
            ("write_to_cache block_tables entry outside the pool", IndexError,
             lambda: ops.write_to_cache(kv, idx, k4, k4, False, True, None, None,
                                        torch.full((4, 2), 9, dtype=torch.int64, device=d), None)),
            ("write_to_cache cu_seqlens not ending at T", ValueError,
             lambda: ops.write_to_cache(kv, idx, k[:1], k[:1], False, True, None, None, None, ids(0, 1, 1))),
            ("cached_attention cache_seqlens above the capacity", ValueError,
             lambda: ops.cached_attention(qa, kv, None, 4, None, None, bt, None, ids(1, 1, 1, 99), None, True))]:
        before_layouts = [t.clone() for t in (kv, idx)]
        try:
            fn()
            check(f"raises on {d}: {name}", False, "no exception")
        except error:
            check(f"raises on {d}: {name} -> {error.__name__}", True)
        except Exception as e:  # noqa: BLE001
            check(f"raises on {d}: {name}", False, f"{type(e).__name__}: {str(e)[:200]}")
        check(f"{name} on {d}: nothing written",
              all(torch.equal(bits(a), bits(b)) for a, b in zip(before_layouts, (kv, idx))))
    # the process and the device are still usable after the raises
    ops.write_to_cache(kv, idx, k[:, :1], k[:, :1], False, True, ids(0, 1, 2), None)
    sync()
    check(f"a good call on {d} after the raises works", idx.cpu().tolist() == [1, 4, 6, 15])



def layouts_suite(quick):
    """SPEC 11 on DEV against the CPU kernels: paged and packed writes (bit for bit, float and int8
    codes), cached_attention through block tables / packed rows / slot ids, packed prefill."""
    g = seeded("layouts")
    H, Dk, Dv, page_size = 2, 16, 16, 16
    B, max_pages = 3, 4
    N = B * max_pages + 2
    tables = torch.randperm(N, generator=g)[:B * max_pages].view(B, max_pages).to(torch.int32)
    k = torch.randn(B, 9, H, Dk, generator=g)
    v = torch.randn(B, 9, H, Dv, generator=g)
    cu = torch.tensor([0, 5, 5, 12])
    kp, vp = torch.randn(1, 12, H, Dk, generator=g), torch.randn(1, 12, H, Dv, generator=g)
    for storage in ("bfloat16", "int8") if quick else ("float32", "bfloat16", "int8", "fp8_e4m3"):
        quantized = storage in ("int8", "fp8_e4m3")

        def writes(dev):
            if quantized:
                pages, sc = torch_lightning_cache.init_paged_kv_cache(N, page_size, H, Dk, Dv, kv_quantization=storage)
            else:
                pages = torch_lightning_cache.init_paged_kv_cache(N, page_size, H, Dk, Dv, dtype=getattr(torch, storage))
                sc = None
            pages, sc = pages.to(dev), None if sc is None else sc.to(dev)
            idx = torch.tensor([0, 3, 30], device=dev)
            m = ops.concatenate_to_cache(pages, idx, k.to(dev), v.to(dev), None, None, None, True, False, True, None,
                                         sc, tables.to(dev))
            ops.write_to_cache(pages, idx, kp.to(dev), vp.to(dev), False, True, None, sc, tables.to(dev), cu.to(dev))
            return pages.cpu(), idx.cpu(), m.cpu(), None if sc is None else sc.cpu()

        a, b = on_both(writes)
        check(f"paged+packed writes {storage}: kv, index, mask{', scales' if quantized else ''} = CPU",
              all(x is None or same_bits(x, y) for x, y in zip(a, b)), [x is None or same_bits(x, y) for x, y in zip(a, b)])
    # Without checks, [B, q] paged writes are planned on the device (write_plan_rule.h): a contested page
    # slot (rows 0 and 1 on page 0) and an entry outside the pool (row 2) skip those rows, as on the CPU.
    hostile = torch.tensor([[0, 1, 2, 3], [0, 5, 6, 7], [8, 9, N + 3, 11]])

    def device_planned(dev):
        pages = torch.zeros(N, page_size, H, Dk + Dv, device=dev)
        idx = torch.tensor([2, 2, 40], device=dev)
        ops.write_to_cache(pages, idx, k.to(dev), v.to(dev), False, False, None, None, hostile.to(dev), None)
        return pages.cpu(), idx.cpu()

    a, b = on_both(device_planned)
    check("paged writes without checks (planned on the device) = CPU", all(same_bits(x, y) for x, y in zip(a, b)),
          b[1].tolist())
    pages = torch.randn(N, page_size, H, Dk + Dv, generator=g).to(torch.bfloat16)
    dense = torch.randn(5, max_pages * page_size, H, Dk + Dv, generator=g)
    for group, q in ((1, 1), (4, 3)):
        query = torch.randn(B, q, H * group, Dk, generator=g)
        packed_q = torch.randn(1, q + 2, H * group, Dk, generator=g)
        valid = torch.tensor([q, 33, max_pages * page_size])
        cu_q = torch.tensor([0, q, q, q + 2])

        def attention(dev):
            t = lambda x: None if x is None else x.to(dev)  # noqa: E731
            return (ops.cached_attention(t(query), t(pages), None, Dk, None, None, t(tables), None, t(valid), None,
                                         True).cpu(),
                    ops.cached_attention(t(packed_q), t(pages), None, Dk, None, None, t(tables), t(cu_q), t(valid),
                                         None, True).cpu(),
                    ops.cached_attention(t(packed_q), t(dense), None, Dk, None, None, None, t(cu_q), t(valid),
                                         t(torch.tensor([4, 0, 2])), True).cpu())

        a, b = on_both(attention)
        for what, x, y in zip(("paged", "paged packed", "packed slot_ids"), a, b):
            err = rel_err(y, x)
            check(f"cached_attention {what} group={group} q={q}: rel err vs CPU {err:.1e}", err < 1e-4, err)
    lengths = [40, 0, 1, 70]
    T = sum(lengths)
    cu_p = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    qx, kx, vx = (torch.randn(1, T, H, Dk, generator=g) for _ in range(3))
    s0 = torch.randn(6, H, Dk, Dv, generator=g)
    slopes = torch_lightning_cache.lightning_slopes(H)

    def prefill(dev):
        st = s0.to(dev, copy=True)
        ck = torch.zeros(4, 2, H, Dk, Dv, device=dev)
        out = ops.lightning_prefill(st, qx.to(dev), kx.to(dev), vx.to(dev), slopes.to(dev), None,
                                    torch.tensor([5, 0, 3, 1], device=dev), 32, 1.0, True, ck, 32, cu_p.to(dev))
        return out.cpu(), st.cpu(), ck.cpu()

    a, b = on_both(prefill)
    for what, x, y in zip(("output", "state", "checkpoints"), a, b):
        err = rel_err(y, x)
        check(f"lightning_prefill packed {what}: rel err vs CPU {err:.1e}", err < 1e-4, err)


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


FUSED_FLAG = "LIGHTNING_CACHE_FUSED_PREFILL"


def with_fused(on, fn):
    """fn() with the fused CUDA prefill selected (on) or not; the op reads the flag per call."""
    saved = os.environ.get(FUSED_FLAG)
    os.environ[FUSED_FLAG] = "1" if on else "0"
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ[FUSED_FLAG]
        else:
            os.environ[FUSED_FLAG] = saved


def fused_case(B, n, H, state_dt, masked, ids, every=0, C=0, nonfinite=False, scale=1.0, strided_in=False):
    """Fused prefill (D = 128, bfloat16 inputs) vs the ATen path vs the float64 reference."""
    g = seeded("fused", B, n, H, str(state_dt), masked, ids, every, C, nonfinite, scale, strided_in)
    D, P = 128, B + 2
    bf = torch.bfloat16
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(bf) for _ in range(3))
    if nonfinite:
        v[0, n // 2, 0, 3] = float("inf")
        k[-1, n - 1, -1, 5] = float("nan")
    S0 = torch.randn(P, H, D, D, generator=g).to(state_dt)
    slopes = torch_lightning_cache.lightning_slopes(H, 0, 2).float()
    mask = (torch.rand(B, n, generator=g) < 0.8) if masked else None
    if masked:
        mask[:, :5] = False
    slot_ids = {"none": None, "perm": torch.randperm(P, generator=g)[:B], "skip": torch.tensor([P - 1] + [-1] * (B - 1))}[ids]
    exp_state, exp_out = ref_lightning(S0[:B] if slot_ids is None else S0, q, k, v, slopes, mask, slot_ids, scale)
    if slot_ids is None:
        exp_state = torch.cat([exp_state, S0[B:].double()])
    results = {}
    for fused in (True, False):
        st = S0.to(DEV, copy=True)  # a copy on every device: the first run must not change the second's input
        cp = torch.zeros(B, C, H, D, D, dtype=state_dt, device=DEV) if C else None
        dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
        qd, kd, vd = dev(q), dev(k), dev(v)
        if strided_in:
            qd = torch.cat([qd, qd], dim=-1)[..., :D]  # 16-byte rows, non-contiguous
        out = with_fused(fused, lambda: ops.lightning_prefill(st if slot_ids is not None else st[:B], qd, kd, vd,
                                                             slopes.to(DEV), dev(mask), dev(slot_ids), 64, scale,
                                                             False, cp, every))
        sync()
        results[fused] = (out.cpu().double(), st.cpu().double(), None if cp is None else cp.cpu().double())
    name = (f"lightning_prefill fused B{B} n{n} H{H} {state_dt} masked={masked} ids={ids} every={every} C={C} "
            f"nonfinite={nonfinite} scale={scale} strided={strided_in}")
    fo, fs, fc = results[True]
    ao, as_, ac = results[False]
    tol_out, tol_state = (2e-2, 2e-5) if state_dt == torch.float32 else (2e-2, 2e-2)
    # Where the recurrence is NaN or +-Inf the kernels may differ in which (the fused one writes NaN).
    same_bad = torch.equal(fo.isfinite(), ao.isfinite()) and torch.equal(fs.isfinite(), as_.isfinite())
    check(name + " non-finite pattern = ATen path", same_bad,
          ((~fo.isfinite()).sum().item(), (~ao.isfinite()).sum().item()))
    if not nonfinite:
        check(name + " output vs reference", rel_err(fo, exp_out) < tol_out, rel_err(fo, exp_out))
        check(name + " state vs reference", rel_err(fs, exp_state) < tol_state, rel_err(fs, exp_state))
        check(name + " vs ATen path", rel_err(fo, ao) < tol_out and rel_err(fs, as_) < tol_state,
              (rel_err(fo, ao), rel_err(fs, as_)))
    else:
        fin = fo.isfinite() & ao.isfinite()
        check(name + " finite outputs vs ATen path", rel_err(fo[fin], ao[fin]) < tol_out, rel_err(fo[fin], ao[fin]))
    if fc is not None:
        check(name + " checkpoints vs ATen path", torch.equal(fc.isfinite(), ac.isfinite()) and
              rel_err(fc.nan_to_num(), ac.nan_to_num()) < tol_state, rel_err(fc.nan_to_num(), ac.nan_to_num()))


def fused_packed_case(lengths, state_dt, every=0, C=0):
    """Fused prefill of a packed batch (cu_seqlens: one CTA group per sequence) vs the ATen packed path and the
    float64 reference; a skipped slot and an empty sequence included."""
    g = seeded("fused-packed", tuple(lengths), str(state_dt), every, C)
    D, H, S = 128, 2, len(lengths)
    T = sum(lengths)
    bf = torch.bfloat16
    q, k, v = (torch.randn(1, T, H, D, generator=g).to(bf) for _ in range(3))
    S0 = torch.randn(S + 2, H, D, D, generator=g).to(state_dt)
    slopes = torch_lightning_cache.lightning_slopes(H, 0, 2).float()
    slot_ids = torch.randperm(S + 2, generator=g)[:S]
    slot_ids[-1] = -1
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    results = {}
    for fused in (True, False):
        st = S0.to(DEV, copy=True)
        cp = torch.zeros(S, C, H, D, D, dtype=state_dt, device=DEV) if C else None
        out = with_fused(fused, lambda: ops.lightning_prefill(st, q.to(DEV), k.to(DEV), v.to(DEV), slopes.to(DEV),
                                                             None, slot_ids.to(DEV), 64, 1.0, True, cp, every,
                                                             cu.to(DEV)))
        sync()
        results[fused] = (out.cpu().double(), st.cpu().double(), None if cp is None else cp.cpu().double())
    exp_state, exp_out = ref_lightning_packed(S0, q, k, v, slopes, cu, slot_ids)
    name = f"lightning_prefill fused packed lengths={lengths} {state_dt} every={every} C={C}"
    tol = 2e-2
    check(name + " output vs reference", rel_err(results[True][0], exp_out) < tol, rel_err(results[True][0], exp_out))
    check(name + " state vs reference", rel_err(results[True][1], exp_state) < tol,
          rel_err(results[True][1], exp_state))
    for what, a, b in zip(("output", "state", "checkpoints"), results[True], results[False]):
        if a is not None:
            check(f"{name} {what} vs ATen packed path", rel_err(a, b) < tol, rel_err(a, b))


def fused_suite(quick):
    fused_packed_case([70, 0, 129, 1, 64], torch.float32, every=64, C=2)
    fused_case(2, 64, 2, torch.float32, False, "none")
    fused_case(2, 200, 3, torch.float32, True, "perm", scale=0.125)
    fused_case(3, 130, 2, torch.bfloat16, True, "skip")
    fused_case(2, 256, 2, torch.float32, True, "none", every=128, C=3)
    fused_case(2, 300, 2, torch.bfloat16, False, "perm", every=64, C=5)
    fused_case(2, 96, 2, torch.float32, False, "none", nonfinite=True)
    fused_case(1, 77, 2, torch.float32, True, "none", strided_in=True)
    if not quick:
        fused_case(2, 4096, 4, torch.float32, True, "perm")
        fused_case(1, 1, 1, torch.float32, False, "none")
        fused_case(2, 192, 2, torch.float32, False, "none", every=96, C=2)  # not a multiple of 64: ATen path
        fused_packed_case([300, 5, 64, 0, 200], torch.bfloat16)


def fused_bench():
    """B = 1 and 8, T = 4096, H = 64, D = 128, bfloat16 inputs, float32 state from history."""
    print(f"\n-- fused prefill timings on {torch.cuda.get_device_name()}")
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # optional peer (carried as a wheel)
    except Exception as e:  # noqa: BLE001  (any import failure just drops the peer)
        chunk_simple_gla = None
        print(f"FLA not importable ({type(e).__name__}): no FLA row")
    T, H, D = 4096, 64, 128
    slopes = torch_lightning_cache.lightning_slopes(H, 0, 80).float().to(DEV)
    for B in (1, 8):
        q, k, v = (torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(B, H, D, D, device=DEV)
        fused = with_fused(True, lambda: gpu_us(lambda: ops.lightning_prefill(state, q, k, v, slopes), 20))
        aten = with_fused(False, lambda: gpu_us(lambda: ops.lightning_prefill(state, q, k, v, slopes), 5))
        moved = 4 * q.numel() * 2 + 2 * state.numel() * 4  # q, k, v read, o written; state read and written
        src = torch.empty(moved // 2, dtype=torch.bfloat16, device=DEV)
        dst = torch.empty_like(src)
        copy = gpu_us(lambda: dst.copy_(src), 20)  # reads and writes moved/2 bytes each: the same traffic
        flops = 2 * B * H * T * D * D * 2 + B * H * T * 64 * D * 2  # q S, update, intra (lower half, 2 products)
        line = (f"prefill B={B} T={T} H={H} D={D}: fused {fused:.1f} us ({flops / fused / 1e6:.1f} TFLOP/s useful, "
                f"{moved / fused / 1e3:.0f} GB/s), ATen path {aten:.1f} us ({aten / fused:.1f}x), "
                f"copy of the same bytes {copy:.1f} us (fused/copy {fused / copy:.2f})")
        if chunk_simple_gla is not None:
            g_gamma = -slopes
            def run_fla():
                return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=state,
                                        output_final_state=True)
            fla = gpu_us(run_fla, 20)
            line += f", FLA chunk_simple_gla {fla:.1f} us (FLA/fused {fla / fused:.2f})"
        print(line, flush=True)


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
    ap.add_argument("--fused-only", action="store_true", help="only the fused prefill checks and timings")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu: a dry run of the script itself")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    on_cuda = torch.device(DEV).type == "cuda"
    print(f"device {DEV}" + (f" ({torch.cuda.get_device_name(DEV)})" if on_cuda else " (dry run: CPU vs CPU)"))
    if args.fused_only:
        guarded("fused prefill suite", lambda: fused_suite(args.quick))
        if on_cuda and not args.no_bench:
            guarded("fused prefill bench", fused_bench)
        print(f"\n{len(FAILS)} failed: {FAILS[:20]}")
        sys.exit(1 if FAILS else 0)
    # the raise checks first: an op that kills the process when it raises should say so before the long suites
    guarded("raising suite", raising_suite)
    guarded("concat suite", lambda: concat_suite(args.quick))
    guarded("pool suite", lambda: pool_suite(args.quick))
    guarded("quantized suite", lambda: quant_suite(args.quick))
    guarded("attention suite", lambda: attention_suite(args.quick))
    guarded("lightning suite", lambda: lightning_suite(args.quick))
    guarded("checkpoint suite", lambda: checkpoint_suite(args.quick))
    guarded("speculative suite", lambda: speculative_suite(args.quick))
    guarded("layouts suite", lambda: layouts_suite(args.quick))
    guarded("fused prefill suite", lambda: fused_suite(args.quick))
    if on_cuda:
        guarded("graph suite", graph_suite)
        if not args.quick:
            guarded("launches", launches)
        if not args.no_bench:
            guarded("bench", bench)
    else:
        print("skip graph capture, launch counts and timings (no CUDA device)")
    print(f"\n{len(FAILS)} failed: {FAILS[:20]}")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
