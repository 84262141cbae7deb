#!/usr/bin/env python3
"""Register counts and SASS instruction counts of the CUDA kernels, without a GPU.

    python3 tools/sass_counts.py [--arch 90] [--objects DIR] [--no-compile] [file.cu ...]

Compiles csrc/cuda/*.cu (or the files given) for sm_<arch> with `-Xptxas -v`
through tools/check_cuda_compiles.sh (same flags as the real build), keeping the
objects in DIR (default: a temporary folder), then reads:

- registers and spills per kernel: ptxas's `-v` report ("Used N registers",
  "N bytes spill stores");
- static shared memory per kernel ("N bytes smem"; dynamic shared memory, such as the
  fused prefill's kSharedBytes, is set at launch and not in this report);
- the SASS of every kernel: `cuobjdump -sass` on the object, with the HMMA (tensor-core
  mma) count of the function and of each loop (the fused prefill's chunk loop: mma per
  chunk and 64-column value tile).

Method for "instructions per 16 bytes" (static, from the SASS text):
  A loop is a backward branch `BRA target` with target <= its own address; its
  body is the instructions from target to the branch, inclusive. For each loop
  the script prints the body's instruction count (an upper bound on one pass:
  every instruction once, taken or not), the shortest pass (fewest
  instructions from the loop head to the back-edge following fall-through and
  forward branches: a lower bound, exact for the cheapest branch outcome), and
  the "widest load+store pass" (the shortest pass that executes the body's
  widest global load, if any, then its widest store: for a mask or copy loop,
  the cost of one full 16-byte chunk on the aligned fast path), and
  the widths of the body's global stores (STG.E.U8 = 1, .U16 = 2, STG.E = 4,
  .64 = 8, .128 = 16) and the bytes its loads read.
  One pass of a mask loop writes one 16-byte chunk (one STG.E.128, or 16
  STG.E.U8 on the unaligned fallback branch), and one pass of a copy loop one
  16-byte vector (one STG.E.128) or one element (VEC = 1): so "instructions
  per 16 mask bytes" and "per 16 copied bytes" are read off the loop lines.
  Straight-line kernels (one chunk per thread, no loop; main's mask path) are
  counted over the whole function, which is then an upper bound.

cuobjdump (and the nvdisasm it runs, looked up beside it first): $CUOBJDUMP,
else on PATH, else $CUDA_HOME/bin, else pip's nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels (nvidia/cu13/bin in site-packages or in
/opt/cuobjdump). Install without touching the Python environment:
    pip download --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm -d /tmp/w && mkdir -p /opt/cuobjdump \\
      && for w in /tmp/w/*.whl; do python3 -m zipfile -e "$w" /opt/cuobjdump; done \\
      && chmod +x /opt/cuobjdump/nvidia/cu13/bin/*
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def find_cuobjdump():
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], "/opt/cuobjdump"}:
        candidates += glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("sass_counts: cuobjdump not found; see the install line in this script's header")


def access_bytes(op):
    """Bytes moved by one global load/store instruction, from its modifiers."""
    width = 4
    for part in op.split(".")[1:]:
        if part in WIDTH:
            width = WIDTH[part]
    return width


def demangle(names):
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


def short(name, width=110):
    name = re.sub(r"\blightning_cache::(\(anonymous namespace\)::)?", "", name)
    name = name.replace("c10::", "").replace("std::integral_constant<int, ", "ic<")
    return name if len(name) <= width else name[: width - 3] + "..."


def parse_sass(text):
    """{function: [(addr, opcode_with_modifiers, full_text)]}"""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur:
            body = m.group(2).strip()
            tokens = body.split()
            if tokens and tokens[0].startswith("@"):
                tokens = tokens[1:]
            funcs[cur].append((int(m.group(1), 16), tokens[0] if tokens else "", body))
    return funcs


def analyse(instrs):
    """Loops (backward branches) of one function, and whole-function totals."""
    addr_to_pos = {a: k for k, (a, _, _) in enumerate(instrs)}
    loops = []
    for k, (addr, op, body) in enumerate(instrs):
        if op.split(".")[0] != "BRA":
            continue
        m = re.search(r"\b0x([0-9a-f]+)\b", body.split("BRA", 1)[1])
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= addr and target in addr_to_pos:
            loops.append(region(instrs[addr_to_pos[target] : k + 1], f"loop {target:#06x}-{addr:#06x}"))
    real = [i for i in instrs if i[1] not in ("NOP",)]
    return loops, region(real, "whole function")


def branch_target(body):
    m = re.search(r"\bBRA\b(?:\.\S+)?\s+(?:`\()?.*?0x([0-9a-f]+)", body)
    return int(m.group(1), 16) if m else None


def min_path(instrs, first=0, last=None):
    """Fewest instructions from instrs[first] to instrs[last] (default: the last),
    following fall-through and forward branches inside the region (inner loops taken 0 times)."""
    last = len(instrs) - 1 if last is None else last
    pos = {a: k for k, (a, _, _) in enumerate(instrs)}
    INF = float("inf")
    dist = [INF] * len(instrs)
    dist[first] = 1
    for k, (addr, op, body) in enumerate(instrs):
        if dist[k] == INF or k >= last:
            continue
        predicated = body.startswith("@")
        base = op.split(".")[0]
        succ = []
        if base in ("EXIT", "RET") and not predicated:
            succ = []
        elif base == "BRA":
            t = branch_target(body)
            if t is not None and t > addr and t in pos:
                succ.append(pos[t])
            if predicated or t is None:
                succ.append(k + 1)
        else:
            succ.append(k + 1)
        for n in succ:
            dist[n] = min(dist[n], dist[k] + 1)
    return dist[last]


def wide_pass(instrs):
    """Shortest pass that executes the region's widest global load (if any) and then its widest store."""
    def widest(prefixes):
        best = None
        for k, (_, op, _) in enumerate(instrs):
            if op.startswith(prefixes) and (best is None or access_bytes(op) > access_bytes(instrs[best][1])):
                best = k
        return best

    st, ld = widest(("STG", "ST.")), widest(("LDG", "LD."))
    if st is None:
        return None
    points = [0] + ([ld] if ld is not None and ld < st else []) + [st, len(instrs) - 1]
    total = 1
    for a, b in zip(points, points[1:]):
        total += min_path(instrs, a, b) - 1
    return total


def region(instrs, label):
    stores = [access_bytes(op) for _, op, _ in instrs if op.startswith(("STG", "ST."))]
    loaded = sum(access_bytes(op) for _, op, _ in instrs if op.startswith(("LDG", "LD.")))
    n = sum(1 for i in instrs if i[1] != "NOP")
    hmma = sum(1 for _, op, _ in instrs if op.startswith("HMMA"))  # tensor-core mma (m16n8k16: one each)
    return {"label": label, "instructions": n, "min_path": min_path(instrs), "wide_pass": wide_pass(instrs),
            "hmma": hmma,
            "stores": stores,
            "stored": sum(stores), "loaded": loaded}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--objects", help="keep objects and ptxas logs here")
    ap.add_argument("--no-compile", action="store_true", help="reuse the objects already in --objects")
    ap.add_argument("--sass", action="store_true", help="also print each kernel's SASS to DIR/<file>.sass")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    objects = args.objects or tempfile.mkdtemp(prefix="sass_counts_")
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not args.no_compile:
        env = dict(os.environ, OBJ_DIR=objects, NVCC_EXTRA="-Xptxas -v", CUDA_ARCH=args.arch)
        subprocess.run(["bash", os.path.join(ROOT, "tools", "check_cuda_compiles.sh"), *files], env=env, check=True)
    cuobjdump = find_cuobjdump()
    for f in files:
        name = os.path.splitext(os.path.basename(f))[0]
        obj, log = os.path.join(objects, name + ".o"), os.path.join(objects, name + ".log")
        regs = {}
        current = None
        for line in open(log, errors="replace"):
            m = re.search(r"Compiling entry function '(\S+)'|Function properties for (\S+)", line)
            if m:
                current = m.group(1) or m.group(2)
            m = re.search(r"Used (\d+) registers", line)
            if m and current:
                regs.setdefault(current, {})["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current:
                regs.setdefault(current, {})["spill"] = int(m.group(1)) + int(m.group(2))
            m = re.search(r"(\d+) bytes smem", line)
            if m and current:
                regs.setdefault(current, {})["smem"] = int(m.group(1))
            m = re.search(r"(\d+) bytes stack frame", line)
            if m and current:
                regs.setdefault(current, {})["stack"] = int(m.group(1))
        # cuobjdump runs nvdisasm, which the pip wheels put beside it.
        env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True, env=env).stdout
        if args.sass:
            with open(os.path.join(objects, name + ".sass"), "w") as out:
                out.write(sass)
        funcs = parse_sass(sass)
        names = demangle(list(funcs))
        print(f"\n=== {os.path.relpath(f, ROOT)}: {len(funcs)} functions (sm_{args.arch})")
        for fn in sorted(funcs, key=lambda n: names[n]):
            r = regs.get(fn, {})
            loops, whole = analyse(funcs[fn])
            print(f"- {short(names[fn])}")
            print(
                f"    regs {r.get('regs', '?')}, spill bytes {r.get('spill', 0)}, stack {r.get('stack', 0)}, "
                f"static smem {r.get('smem', 0)} B (dynamic not included); "
                f"{whole['instructions']} instructions, stores {whole['stored']} B, "
                f"loads {whole['loaded']} B (static totals)" + (f", HMMA {whole['hmma']}" if whole["hmma"] else "")
            )
            for lp in loops:
                widths = ",".join(str(w) for w in sorted(set(lp["stores"]), reverse=True)) or "-"
                wp = "" if lp["wide_pass"] is None else f", widest load+store pass {lp['wide_pass']}"
                print(
                    f"    {lp['label']}: {lp['instructions']} instr (shortest pass {lp['min_path']}{wp}), "
                    f"{len(lp['stores'])} stores (widths {widths} B), loads {lp['loaded']} B"
                    + (f", HMMA {lp['hmma']}" if lp["hmma"] else "")
                )


if __name__ == "__main__":
    main()
