"""Round 4 of the FP8 GEMM exploration: a Gluon kernel that overlaps the float32 promotion with the next product.

In Triton's `tl` language the kernel must wait for each K step's tensor-core product before it scales and adds it to
the float32 accumulator, so the tensor cores idle while the CUDA cores promote (benchmarks/fp8_gemm_notes.md). Gluon,
Triton's lower-level dialect, exposes the asynchronous `wgmma` directly: issue step k+1's product, then wait until at
most one product is in flight (`warpgroup_mma_wait(num_outstanding=1)`), and promote step k while step k+1 runs.
TMA loads run up to STAGES steps ahead through a ring of shared-memory buffers with one mbarrier each.

`CONFIGS` `gluon_ws_*` (round 5) add warp specialisation: one loader warp issues the TMA loads of every (tile, K step)
of a persistent program, the math warps run the loop above and store each tile while the next one loads.

`gluon_ws2_*`/`gluon_ws3_*` (round 6): a loader partition and two or three independent math warp groups, each owning
64 rows of the tile and promoting its own product while another group's `wgmma` runs (the in-group overlap above is
serialised by ptxas, message C7514); optionally an epilogue through shared memory and a TMA store. The three-group
kernel with the TMA store is the one notebook 08 exports as `fp8_gemm`'s large-M path on Hopper.

Same mathematics and numerics as the course kernel (promotion after every 128-wide K step). Needs an sm_90 GPU.
Outcomes (benchmarks/fp8_gemm_notes.md, rounds 4-6): rounds 4-5 at most +10% over the course kernel on long K;
round 6 0.81x (two groups) to 0.89x (three groups, TMA store) cuBLAS in geometric mean at M = 4096.
`probe_*` CONFIGS are not GEMMs (wrong numbers on purpose): each removes one part of the warp-specialised kernel (the
math, the promotion, the scale loads) to measure what that part costs.
Usage: python benchmarks/fp8_gemm_gluon.py [--m 4096] [--out benchmarks/results/fp8_gemm_gluon_h200.json]
"""

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8_gemm_gpu import SHAPES, cublas_blockwise  # noqa: E402  (benchmarks/fp8_gemm_gpu.py)
from timing import gpu_warmup, median_ms  # noqa: E402  (benchmarks/timing.py)

from dsv3_lite.kernels import fp8 as F8  # noqa: E402


def build():
    """Define the Gluon kernel (import inside: Gluon needs a GPU build of Triton)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    @gluon.jit
    def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """Grouped tile order, as the course kernel's `_tile_coords`."""
        group = GROUP_M * num_pid_n
        first_m = (tile // group) * GROUP_M
        size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (tile % group) % size_m, (tile % group) // size_m

    @gluon.jit
    def kernel(a_desc, b_desc, A_s, B_s, C, M, N, K,
               GROUP_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]      # 128: one scale group per K step
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]      # 128: one weight-scale block per tile
        pid_m, pid_n = tile_coords(gl.program_id(0), gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N), GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        nkb = K // BLOCK_K

        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        for i in gl.static_range(STAGES):                      # prologue: the first STAGES K steps in flight
            pred = i < nkb
            mbarrier.expect(bars.index(i), nbytes, pred=pred)
            tma.async_copy_global_to_shared(a_desc, [off_m, i * BLOCK_K], bars.index(i), a_smem.index(i), pred=pred)
            tma.async_copy_global_to_shared(b_desc, [off_n, i * BLOCK_K], bars.index(i), b_smem.index(i), pred=pred)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        rm = gl.where(rows < M, rows, 0)
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
        zero = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)

        mbarrier.wait(bars.index(0), phase=0)
        prev = warpgroup_mma(a_smem.index(0), b_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
        s_prev = gl.load(A_s + rm * nkb) * gl.load(B_s + pid_n * nkb)           # [BLOCK_M] scales of step 0
        for kb in range(1, nkb):
            s = kb % STAGES
            mbarrier.wait(bars.index(s), phase=(kb // STAGES) & 1)
            cur = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), zero, use_acc=False,
                                is_async=True)                                     # step kb on the tensor cores
            s_cur = gl.load(A_s + rm * nkb + kb) * gl.load(B_s + pid_n * nkb + kb)
            done = warpgroup_mma_wait(num_outstanding=1, deps=(prev,))            # step kb-1 finished
            nxt = kb - 1 + STAGES                                                  # its buffers are free: refill
            ns = nxt % STAGES
            pred = nxt < nkb
            mbarrier.expect(bars.index(ns), nbytes, pred=pred)
            tma.async_copy_global_to_shared(a_desc, [off_m, nxt * BLOCK_K], bars.index(ns), a_smem.index(ns),
                                            pred=pred)
            tma.async_copy_global_to_shared(b_desc, [off_n, nxt * BLOCK_K], bars.index(ns), b_smem.index(ns),
                                            pred=pred)
            acc = acc + done * s_prev[:, None]                                     # promote step kb-1 meanwhile
            s_prev = s_cur
            prev = cur
        done = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
        acc = acc + done * s_prev[:, None]
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        gl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty), mask=mask)

    @gluon.jit
    def ws_loader(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K,
                  GROUP_M: gl.constexpr, STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
        """Worker partition (one warp): TMA loads of every (tile, K step) of this program into the ring."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        nkb = K // BLOCK_K
        c = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
            pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            for kb in range(nkb):
                s = c % STAGES
                mbarrier.wait(empty.index(s), (c // STAGES) & 1)            # the math warps released buffer s
                mbarrier.expect(ready.index(s), nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kb * BLOCK_K], ready.index(s),
                                                a_smem.index(s))
                tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, kb * BLOCK_K], ready.index(s),
                                                b_smem.index(s))
                c += 1

    @gluon.jit
    def ws_math(a_smem, b_smem, ready, empty, A_s, B_s, C, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                MATH_WARPS: gl.constexpr, UNIT_SCALES: gl.constexpr):
        """Default partition: asynchronous wgmma per K step, step k promoted while step k+1 multiplies.
        UNIT_SCALES (probe, wrong numbers): promote with scale 1 instead of loading the scales from global memory."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[MATH_WARPS, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        nkb = K // BLOCK_K
        zero = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
        c = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
            pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
            rm = gl.where(rows < M, rows, 0)
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            prev = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), zero, use_acc=False,
                                 is_async=True)
            prev_s = s
            if UNIT_SCALES:
                s_prev = gl.full((BLOCK_M,), 1.0, gl.float32, layout=gl.SliceLayout(1, mma))
            else:
                s_prev = gl.load(A_s + rm * nkb) * gl.load(B_s + pid_n * nkb)
            c += 1
            for kb in range(1, nkb):
                s = c % STAGES
                mbarrier.wait(ready.index(s), (c // STAGES) & 1)
                cur = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), zero, use_acc=False,
                                    is_async=True)
                if UNIT_SCALES:
                    s_cur = gl.full((BLOCK_M,), 1.0, gl.float32, layout=gl.SliceLayout(1, mma))
                else:
                    s_cur = gl.load(A_s + rm * nkb + kb) * gl.load(B_s + pid_n * nkb + kb)
                done = warpgroup_mma_wait(num_outstanding=1, deps=(prev,))
                mbarrier.arrive(empty.index(prev_s), count=1)                  # step kb-1's buffers are free
                acc = acc + done * s_prev[:, None]
                s_prev = s_cur
                prev = cur
                prev_s = s
                c += 1
            done = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
            mbarrier.arrive(empty.index(prev_s), count=1)
            acc = acc + done * s_prev[:, None]
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
            gl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
                     mask=(rows[:, None] < M) & (cols[None, :] < N))

    @gluon.jit
    def ws_drain(ready, empty, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                 STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
        """Probe: a default partition that only takes each loaded buffer and frees it (no MMA, no output), so the
        kernel's time is the time of its TMA loads alone."""
        my_tiles = gl.cdiv(gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N) - gl.program_id(0), NUM_PROGRAMS)
        for c in range(my_tiles * (K // BLOCK_K)):                  # every (tile, K step) the loader issues
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            mbarrier.arrive(empty.index(s), count=1)

    @gluon.jit
    def ws_mma_only(a_smem, b_smem, ready, empty, C, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                    MATH_WARPS: gl.constexpr):
        """Probe: the math partition without scales or promotion, `wgmma` accumulating in place across K (wrong
        numbers for block-scaled operands): the ceiling of this kernel's `wgmma` pipeline alone."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[MATH_WARPS, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        nkb = K // BLOCK_K
        c = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
            pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
            prev_s = 0
            for kb in range(nkb):
                s = c % STAGES
                mbarrier.wait(ready.index(s), (c // STAGES) & 1)
                acc = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))        # step kb-1 finished
                mbarrier.arrive(empty.index(prev_s), count=1, pred=kb > 0)
                prev_s = s
                c += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(prev_s), count=1)
            rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
            gl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
                     mask=(rows[:, None] < M) & (cols[None, :] < N))

    @gluon.jit
    def ws_kernel(a_desc, b_desc, A_s, B_s, C, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                  NUM_PROGRAMS: gl.constexpr, LOAD_ONLY: gl.constexpr, MMA_ONLY: gl.constexpr,
                  UNIT_SCALES: gl.constexpr, num_warps: gl.constexpr):
        """Persistent, warp-specialised: one loader warp (TMA) feeding the math warps through an mbarrier ring."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
            mbarrier.arrive(empty.index(i), count=1)                           # every buffer starts free
        if LOAD_ONLY:
            gl.warp_specialize([
                (ws_drain, (ready, empty, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, NUM_PROGRAMS)),
                (ws_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M, STAGES, NUM_PROGRAMS)),
            ], [1], [40])
        elif MMA_ONLY:
            gl.warp_specialize([
                (ws_mma_only, (a_smem, b_smem, ready, empty, C, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                               STAGES, NUM_PROGRAMS, num_warps)),
                (ws_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M, STAGES, NUM_PROGRAMS)),
            ], [1], [40])
        else:
            gl.warp_specialize([
                (ws_math, (a_smem, b_smem, ready, empty, A_s, B_s, C, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                           STAGES, NUM_PROGRAMS, num_warps, UNIT_SCALES)),
                (ws_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M, STAGES, NUM_PROGRAMS)),
            ], [1], [40])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))

    @gluon.jit
    def ws2_math(c_desc, a_smem, b_smem, c_smem, ready, empty, A_s, B_s, C, M, N, K, GROUP_M: gl.constexpr,
                 STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, ASYNC: gl.constexpr, TMA_STORE: gl.constexpr,
                 WG: gl.constexpr):
        """One math warp group (4 warps) of round 6: rows WG*64 .. WG*64+63 of every (NUM_WG*64)x128 tile.
        Each group has its own accumulator and instruction stream, so while one promotes (CUDA cores) another's
        `wgmma` can keep the tensor cores busy. ASYNC: also try to overlap within the group (issue step k+1, promote
        k; ptxas serialises it, C7514). TMA_STORE: write the tile through shared memory with an asynchronous TMA
        store that overlaps the next tile's products, instead of `gl.store` from registers."""
        HALF: gl.constexpr = a_smem.type.shape[1]                   # 64 rows per math warp group
        NUM_WG: gl.constexpr = a_smem.type.shape[0] // STAGES
        BLOCK_N: gl.constexpr = b_smem.type.shape[1]
        BLOCK_K: gl.constexpr = b_smem.type.shape[2]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        num_pid_m = gl.cdiv(M, NUM_WG * HALF)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        nkb = K // BLOCK_K
        zero = gl.zeros((HALF, BLOCK_N), gl.float32, layout=mma)
        c = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
            pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            row0 = pid_m * NUM_WG * HALF + WG * HALF
            rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
            rm = gl.where(rows < M, rows, 0)
            acc = gl.zeros((HALF, BLOCK_N), gl.float32, layout=mma)
            if ASYNC:
                s = c % STAGES
                mbarrier.wait(ready.index(s), (c // STAGES) & 1)
                prev = warpgroup_mma(a_smem.index(NUM_WG * s + WG), b_smem.index(s).permute((1, 0)), zero,
                                     use_acc=False, is_async=True)
                prev_s = s
                s_prev = gl.load(A_s + rm * nkb) * gl.load(B_s + pid_n * nkb)
                c += 1
                for kb in range(1, nkb):
                    s = c % STAGES
                    mbarrier.wait(ready.index(s), (c // STAGES) & 1)
                    cur = warpgroup_mma(a_smem.index(NUM_WG * s + WG), b_smem.index(s).permute((1, 0)), zero,
                                        use_acc=False, is_async=True)
                    s_cur = gl.load(A_s + rm * nkb + kb) * gl.load(B_s + pid_n * nkb + kb)
                    done = warpgroup_mma_wait(num_outstanding=1, deps=(prev,))
                    mbarrier.arrive(empty.index(prev_s), count=1)
                    acc = acc + done * s_prev[:, None]
                    s_prev = s_cur
                    prev = cur
                    prev_s = s
                    c += 1
                done = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
                mbarrier.arrive(empty.index(prev_s), count=1)
                acc = acc + done * s_prev[:, None]
            else:
                for kb in range(nkb):
                    s = c % STAGES
                    mbarrier.wait(ready.index(s), (c // STAGES) & 1)
                    part = warpgroup_mma(a_smem.index(NUM_WG * s + WG), b_smem.index(s).permute((1, 0)), zero,
                                         use_acc=False, is_async=True)
                    sc = gl.load(A_s + rm * nkb + kb) * gl.load(B_s + pid_n * nkb + kb)
                    part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                    mbarrier.arrive(empty.index(s), count=1)
                    acc = acc + part * sc[:, None]
                    c += 1
            if TMA_STORE:
                tma.store_wait(pendings=0)                             # the previous tile has left c_smem
                c_smem.index(WG).store(acc.to(c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [row0, pid_n * BLOCK_N], c_smem.index(WG))
            else:
                cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
                gl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
                         mask=(rows[:, None] < M) & (cols[None, :] < N))
        if TMA_STORE:
            tma.store_wait(pendings=0)

    @gluon.jit
    def ws2_loader(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M: gl.constexpr,
                   STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
        """Loader of round 6 (the default partition; Triton 3.6 fails to lower a partition that is handed tensor
        descriptors it does not use, so the math partitions get only the output one): per K step, the NUM_WG
        64-row slices of the A tile and the shared B tile."""
        HALF: gl.constexpr = a_desc.block_type.shape[0]
        NUM_WG: gl.constexpr = a_smem.type.shape[0] // STAGES
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        nbytes: gl.constexpr = NUM_WG * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        num_pid_m = gl.cdiv(M, NUM_WG * HALF)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        nkb = K // BLOCK_K
        c = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
            pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            for kb in range(nkb):
                s = c % STAGES
                mbarrier.wait(empty.index(s), (c // STAGES) & 1)           # every math group released buffer s
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                for w in gl.static_range(NUM_WG):
                    tma.async_copy_global_to_shared(a_desc, [(pid_m * NUM_WG + w) * HALF, kb * BLOCK_K], bar,
                                                    a_smem.index(NUM_WG * s + w))
                tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, kb * BLOCK_K], bar, b_smem.index(s))
                c += 1

    @gluon.jit
    def ws2_kernel(a_desc, b_desc, c_desc, A_s, B_s, C, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                   NUM_PROGRAMS: gl.constexpr, NUM_WG: gl.constexpr, ASYNC: gl.constexpr, TMA_STORE: gl.constexpr,
                   MATH_REGS: gl.constexpr, num_warps: gl.constexpr):
        """Round 6: persistent, warp-specialised: a loader partition and NUM_WG (2 or 3) independent math groups."""
        HALF: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_WG * STAGES, HALF, BLOCK_K], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        if TMA_STORE:
            c_smem = gl.allocate_shared_memory(c_desc.dtype, [NUM_WG, HALF, BLOCK_N], c_desc.layout)
        else:
            c_smem = gl.allocate_shared_memory(c_desc.dtype, [NUM_WG, 8, BLOCK_N], c_desc.layout)  # unused
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NUM_WG)                        # one arrival per math group
            mbarrier.arrive(empty.index(i), count=NUM_WG)                      # every buffer starts free
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        WG2: gl.constexpr = 2
        if NUM_WG == 2:
            gl.warp_specialize([
                (ws2_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M, STAGES, NUM_PROGRAMS)),
                (ws2_math, (c_desc, a_smem, b_smem, c_smem, ready, empty, A_s, B_s, C, M, N, K, GROUP_M, STAGES,
                            NUM_PROGRAMS, ASYNC, TMA_STORE, WG0)),
                (ws2_math, (c_desc, a_smem, b_smem, c_smem, ready, empty, A_s, B_s, C, M, N, K, GROUP_M, STAGES,
                            NUM_PROGRAMS, ASYNC, TMA_STORE, WG1)),
            ], [4, 4], [MATH_REGS, MATH_REGS])
        else:
            gl.warp_specialize([
                (ws2_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M, STAGES, NUM_PROGRAMS)),
                (ws2_math, (c_desc, a_smem, b_smem, c_smem, ready, empty, A_s, B_s, C, M, N, K, GROUP_M, STAGES,
                            NUM_PROGRAMS, ASYNC, TMA_STORE, WG0)),
                (ws2_math, (c_desc, a_smem, b_smem, c_smem, ready, empty, A_s, B_s, C, M, N, K, GROUP_M, STAGES,
                            NUM_PROGRAMS, ASYNC, TMA_STORE, WG1)),
                (ws2_math, (c_desc, a_smem, b_smem, c_smem, ready, empty, A_s, B_s, C, M, N, K, GROUP_M, STAGES,
                            NUM_PROGRAMS, ASYNC, TMA_STORE, WG2)),
            ], [4, 4, 4], [MATH_REGS, MATH_REGS, MATH_REGS])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))

    def launch2(a, a_s, b, b_s, out_dtype=torch.bfloat16, STAGES=4, GROUP_M=8, num_wg=2, asynchronous=False,
                tma_store=False, math_regs=232, maxnreg=168):
        """Round 6 launcher: (num_wg*64)x128 tiles split in 64-row slices, one per math warp group."""
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        M, K = a.shape
        N = b.shape[0]
        c = a.new_empty(M, N, dtype=out_dtype)
        gl_out = {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[out_dtype]
        a_desc = TensorDescriptor.from_tensor(a, [64, 128], gl.NVMMASharedLayout.get_default_for(
            [64, 128], gl.float8e4nv))
        b_desc = TensorDescriptor.from_tensor(b, [128, 128], gl.NVMMASharedLayout.get_default_for(
            [128, 128], gl.float8e4nv))
        c_desc = TensorDescriptor.from_tensor(c, [64, 128], gl.NVMMASharedLayout.get_default_for([64, 128], gl_out))
        ring = num_wg * 64 * 128 + 128 * 128                   # bytes of one stage (fp8 A slices + B tile)
        out_tile = num_wg * 64 * 128 * c.element_size() if tma_store else 0
        STAGES = min(STAGES, (227 * 1024 - 1024 - out_tile) // ring)  # fit shared memory (float32 output: fewer)
        tiles = F8._cdiv(M, 64 * num_wg) * F8._cdiv(N, 128)
        n_prog = min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count)
        k = ws2_kernel[(n_prog,)](a_desc, b_desc, c_desc, a_s, b_s, c, M, N, K, GROUP_M=GROUP_M, STAGES=STAGES,
                                  NUM_PROGRAMS=n_prog, NUM_WG=num_wg, ASYNC=asynchronous, TMA_STORE=tma_store,
                                  MATH_REGS=math_regs, num_warps=4, maxnreg=maxnreg)
        return c, getattr(k, "n_regs", None), getattr(k, "n_spills", None), k

    def launch(a, a_s, b, b_s, out_dtype=torch.bfloat16, BLOCK_M=128, STAGES=4, num_warps=8, GROUP_M=8, ws=False,
               per_sm=1, load_only=False, mma_only=False, unit_scales=False, ws2=None):
        if ws2 is not None:                                     # round 6: ws2 holds launch2's keyword arguments
            return launch2(a, a_s, b, b_s, out_dtype, STAGES=STAGES, GROUP_M=GROUP_M, **ws2)[:3]
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        M, K = a.shape
        N = b.shape[0]
        c = a.new_empty(M, N, dtype=out_dtype)
        a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, 128], gl.NVMMASharedLayout.get_default_for(
            [BLOCK_M, 128], gl.float8e4nv))
        b_desc = TensorDescriptor.from_tensor(b, [128, 128], gl.NVMMASharedLayout.get_default_for(
            [128, 128], gl.float8e4nv))
        tiles = F8._cdiv(M, BLOCK_M) * F8._cdiv(N, 128)
        if ws:
            n_prog = min(tiles, per_sm * torch.cuda.get_device_properties(a.device).multi_processor_count)
            k = ws_kernel[(n_prog,)](a_desc, b_desc, a_s, b_s, c, M, N, K, GROUP_M=GROUP_M, STAGES=STAGES,
                                     NUM_PROGRAMS=n_prog, LOAD_ONLY=load_only, MMA_ONLY=mma_only,
                                     UNIT_SCALES=unit_scales, num_warps=num_warps)
        else:
            k = kernel[(tiles,)](a_desc, b_desc, a_s, b_s, c, M, N, K, GROUP_M=GROUP_M, STAGES=STAGES,
                                 num_warps=num_warps)
        return c, getattr(k, "n_regs", None), getattr(k, "n_spills", None)

    launch.launch2 = launch2
    return launch


def rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


CONFIGS = {"gluon_128x128_w8_s4": dict(BLOCK_M=128, num_warps=8, STAGES=4),
           "gluon_128x128_w8_s3": dict(BLOCK_M=128, num_warps=8, STAGES=3),
           "gluon_64x128_w4_s4": dict(BLOCK_M=64, num_warps=4, STAGES=4),
           "gluon_ws_persistent_128x128_s4": dict(BLOCK_M=128, num_warps=8, STAGES=4, ws=True),
           "gluon_ws_persistent_128x128_s5": dict(BLOCK_M=128, num_warps=8, STAGES=5, ws=True),
           "gluon_ws_persistent_64x128_w4_s4_x2": dict(BLOCK_M=64, num_warps=4, STAGES=4, ws=True, per_sm=2),
           "gluon_ws_persistent_64x128_w4_s3_x2": dict(BLOCK_M=64, num_warps=4, STAGES=3, ws=True, per_sm=2),
           # probe, not a GEMM: the same persistent grid and loads with the math removed (its output is garbage);
           # its "TFLOP/s" / 128 = TB/s of operand tiles delivered from L2 to shared memory (128x128 tiles: 128 FLOP/B)
           "probe_loads_only_128x128_s4": dict(BLOCK_M=128, num_warps=8, STAGES=4, ws=True, load_only=True),
           # probe: wgmma accumulating in place, no scales or promotion (wrong numbers): the MMA pipeline's ceiling
           "probe_mma_only_128x128_s4": dict(BLOCK_M=128, num_warps=8, STAGES=4, ws=True, mma_only=True),
           # probe: the full promotion loop with scale 1 instead of loading the scales (wrong numbers): what the
           # scale loads cost
           "probe_unit_scales_128x128_s4": dict(BLOCK_M=128, num_warps=8, STAGES=4, ws=True, unit_scales=True),
           # round 6: independent math warp groups (64 rows each, 2 or 3 of them) + a loader partition; sync = wait
           # for each product before promoting it (another group fills the tensor cores meanwhile), async = also
           # overlap in-group (ptxas serialises it anyway: C7514); tma = epilogue through shared memory + TMA store
           "gluon_ws2_sync_s4": dict(STAGES=4, ws2=dict(asynchronous=False)),
           "gluon_ws2_async_s4": dict(STAGES=4, ws2=dict(asynchronous=True)),
           "gluon_ws2_tma_s4": dict(STAGES=4, ws2=dict(tma_store=True)),
           "gluon_ws2_tma_s3": dict(STAGES=3, ws2=dict(tma_store=True)),
           "gluon_ws3_tma_s3": dict(STAGES=3, ws2=dict(num_wg=3, tma_store=True, math_regs=152, maxnreg=128)),
           # (stages above what fits in shared memory are cut: 4 stages for bf16 output, 3 for float32)
           "gluon_ws3_tma_s4": dict(STAGES=4, ws2=dict(num_wg=3, tma_store=True, math_regs=152, maxnreg=128)),
           "gluon_ws3_tma_s4_g4": dict(STAGES=4, GROUP_M=4, ws2=dict(num_wg=3, tma_store=True, math_regs=152,
                                                                      maxnreg=128)),
           "gluon_ws3_tma_s4_g16": dict(STAGES=4, GROUP_M=16, ws2=dict(num_wg=3, tma_store=True, math_regs=152,
                                                                        maxnreg=128))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp8_gemm_gluon_h200.json")
    args = ap.parse_args()
    import triton
    launch = build()
    torch.manual_seed(0)
    rec = {"benchmark": "benchmarks/fp8_gemm_gluon.py (see its docstring)",
           "method": "median of triton.testing.do_bench (L2 flushed), bf16 output timed; err_fp32: float32 output vs "
                     "float64 product of the dequantised operands on 256 rows",
           "machine": {"gpu": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version()},
           "date": datetime.date.today().isoformat(), "configs": CONFIGS, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gpu_warmup()
    for M in map(int, args.m.split(",")):
        for layer in args.shapes.split(","):
            N, K = SHAPES[layer]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            aq, a_s = F8.act_quant(x)
            bq, b_s = F8.weight_quant(w)
            rows = torch.cat([torch.arange(min(128, M), device="cuda"), torch.arange(max(M - 128, 0), M, device="cuda")])
            ref = (aq[rows].double() * a_s[rows].double().repeat_interleave(128, -1)) @ \
                F8.weight_dequant(bq, b_s, dtype=torch.float32).double().T
            row = {"M": M, "layer": layer, "N": N, "K": K}
            flops = 2.0 * M * N * K

            def timed(name, fn, fn32):
                try:
                    res = {"err_fp32": float(f"{rel(fn32()[rows], ref):.3e}")}
                    ms = median_ms(fn, "cuda", rep_ms=100)
                    res.update(us=round(ms * 1e3, 2), tflops=round(flops / (ms * 1e-3) / 1e12, 1))
                except Exception as err:  # keep going: one failing variant must not lose the run
                    res = {"error": f"{type(err).__name__}: {str(err)[:1500]}"}
                row[name] = res

            timed("cublas_bw", lambda: cublas_blockwise(aq, a_s, bq, b_s, torch.bfloat16),
                  lambda: cublas_blockwise(aq, a_s, bq, b_s, torch.float32))
            timed("fp8_gemm", lambda: F8.fp8_gemm(aq, a_s, bq, b_s), lambda: F8.fp8_gemm(aq, a_s, bq, b_s, torch.float32))
            for name, cfg in ((n, CONFIGS[n]) for n in args.configs.split(",")):
                timed(name, lambda cfg=cfg: launch(aq, a_s, bq, b_s, torch.bfloat16, **cfg)[0],
                      lambda cfg=cfg: launch(aq, a_s, bq, b_s, torch.float32, **cfg)[0])
                if "error" not in row[name]:
                    _, regs, spills = launch(aq, a_s, bq, b_s, torch.bfloat16, **cfg)
                    row[name].update(n_regs=regs, n_spills=spills)
            rec["rows"].append(row)
            print("ROW", M, layer, json.dumps({k: (v.get("tflops"), v.get("err_fp32"), v.get("n_regs"), v.get("n_spills"))
                                               if "error" not in v else v["error"][:600]
                                               for k, v in row.items() if isinstance(v, dict)}), flush=True)
            args.out.write_text(json.dumps(rec, indent=1) + "\n")
            torch.cuda.empty_cache()
    for M in sorted({r["M"] for r in rec["rows"]}):
        rs = [r for r in rec["rows"] if r["M"] == M]
        g = {n: round(math.exp(sum(math.log(r[n]["tflops"]) for r in rs) / len(rs)), 1)
             for n in ["cublas_bw", "fp8_gemm", *args.configs.split(",")] if all("tflops" in r[n] for r in rs)}
        rec.setdefault("geomean_tflops", {})[str(M)] = g
        print("GEOMEAN", M, json.dumps(g))
    args.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
