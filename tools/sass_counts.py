#!/usr/bin/env python3
"""Register counts and SASS instruction counts of the CUDA kernels, without a GPU.

    python3 tools/sass_counts.py [--arch 90] [--objects DIR] [--no-compile] [file.cu ...]

Compiles csrc/cuda/*.cu (or the files given) for sm_<arch> with `-Xptxas -v`
through tools/check_cuda_compiles.sh (same flags as the real build), keeping the
objects in DIR (default: a temporary folder), then reads:

- registers and spills per kernel: ptxas's `-v` report ("Used N registers",
  "N bytes spill stores");
- the SASS of every kernel: `cuobjdump -sass` on the object.

Method for "instructions per 16 bytes" (static, from the SASS text):
  A loop is a backward branch `BRA target` with target <= its own address; its
  body is the instructions from target to the branch, inclusive. For each loop
  the script sums the bytes that the body's global stores write (STG.E.U8 = 1,
  .U16/.S16 = 2, STG.E = 4, .64 = 8, .128 = 16) and its global loads read (LDG,
  same widths), and reports
      instructions per 16 stored bytes = 16 * body instructions / stored bytes.
  That is exact for a branch-free body (an unrolled per-chunk loop: one pass
  writes one 16-byte chunk); for a body with internal branches it is an upper
  bound (every instruction counted once per pass, taken or not). Straight-line
  kernels (one chunk per thread, no loop) are reported the same way over the
  whole function, which is then also an upper bound.
  The loops of interest are labelled by their stores: a mask chunk stores one
  STG.E.128 of bools (or 16 STG.E.U8), a K|V copy pass stores one STG.E.128 of
  cache elements. Non-inlined device functions (e.g. the mask row writer) appear
  as their own "Function" blocks and are analysed the same way.

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


def region(instrs, label):
    stored = sum(access_bytes(op) for _, op, _ in instrs if op.startswith(("STG", "ST.")))
    loaded = sum(access_bytes(op) for _, op, _ in instrs if op.startswith(("LDG", "LD.")))
    n = sum(1 for i in instrs if i[1] != "NOP")
    per16 = 16.0 * n / stored if stored else float("nan")
    return {"label": label, "instructions": n, "stored": stored, "loaded": loaded, "per16": per16}


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
                f"    regs {r.get('regs', '?')}, spill bytes {r.get('spill', 0)}, stack {r.get('stack', 0)}; "
                f"{whole['instructions']} instructions, stores {whole['stored']} B, "
                f"loads {whole['loaded']} B (static totals)"
            )
            for lp in loops:
                if lp["stored"]:
                    print(
                        f"    {lp['label']}: {lp['instructions']} instr, stores {lp['stored']} B, "
                        f"loads {lp['loaded']} B -> {lp['per16']:.1f} instr / 16 B stored"
                    )
                else:
                    print(f"    {lp['label']}: {lp['instructions']} instr, no global stores")


if __name__ == "__main__":
    main()
