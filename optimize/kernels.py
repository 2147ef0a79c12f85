"""Hand-written GPU kernels the rewrites in ``optimize/rewrites.py`` call (Triton, exported into
AOTInductor packages as user-defined kernels, so serving still compiles nothing).

``bn_relu_conv1x1``: a DenseNet layer's first half in one kernel. torchvision's layer computes
``relu(norm2(conv1(relu(norm1(x)))))`` where ``x`` is every channel of the block so far; compiled
stock, batch norm + ReLU reads ``x`` and writes a normalised copy, which the 1x1 convolution (a
matrix multiply in channels-last) reads again: three passes over the block's largest tensor for
one pass of arithmetic. Here the matrix multiply normalises each tile of ``x`` as it loads it
(prologue) and applies ``norm2`` + ReLU to its result before storing it (epilogue): ``x`` is read
once and the normalised copy never exists. ``x`` is the first ``k`` channels of the block's
channels-last buffer (rows are pixels, ``stride(3)`` apart), passed whole with ``k`` beside it.

``write_channels``: a layer's new channels into the buffer, as a Triton op that mutates it. The
compiler copies a buffer that is written by slice assignment and read by a user kernel (a copy of
the slice or of the whole buffer per layer, 2.3-2.9 ms of a 7 ms batch-128 forward on the H100);
with every write through this op it copies nothing (records ``...-fused-*-s11.json``).

``conv3x3_into``: a layer's 3x3 convolution as an implicit GEMM that writes its channels straight
into the block buffer (no output tensor, no copy; cuDNN's convolution plus the copy took 2.32 ms of
a batch-128 forward where this takes 1.82, records ``...-conv3x3-*s12.json``).

Both split the reduction (split-K) when a batch has too few pixels to fill the GPU (batch 1: block
4 is 49 pixels, one or two tiles): the programs of a tile store partial sums into a shared
workspace (``split_workspace``) and the last to finish sums them and stores the result. The split
count comes from integer arithmetic on the pixel count, so one exported package with a dynamic
batch splits at batch 1 and not at batch 128.

Without Triton or a CUDA tensor the ops run the same arithmetic as PyTorch ops (the CPU kernels),
and Triton's interpreter (``TRITON_INTERPRET=1``) runs the Triton kernels themselves on the CPU (tests).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build without Triton: the PyTorch path only
    triton = None


def available() -> bool:
    """Whether the Triton kernel can run (Triton present; the tensors must also be on a CUDA device)."""
    return triton is not None


def empty_channels_last(
    n: int, c: int, h: int, w: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:  # fmt: skip
    """``torch.empty((n, c, h, w), memory_format=torch.channels_last)`` spelled with explicit strides.

    Inductor lowers ``empty(..., memory_format=channels_last)`` as a contiguous empty buffer and
    then copies it into channels-last strides; the copy of an uninitialised buffer is a kernel that
    stores NaN over the whole tensor (the AOTInductor package ran one per layer output and per
    block buffer: 0.85 ms of a 5.6 ms batch-128 forward on the H100, record
    ``fused-package-trace-s12``). ``empty_strided`` is lowered with the strides it is given: no
    kernel at all. The strides do not involve ``n``, so a dynamic batch stays dynamic."""
    return torch.empty_strided((n, c, h, w), (h * w * c, 1, w * c, c), dtype=dtype, device=device)


def bn_affine(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode ``BatchNorm2d`` as ``x * scale + shift`` (FP32, per channel)."""
    bn: Any = norm
    scale = bn.weight.detach().float() * torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    shift = bn.bias.detach().float() - bn.running_mean.detach().float() * scale
    return scale, shift


def reference(
    x: torch.Tensor, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor, scale2: torch.Tensor,
    shift2: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The op's arithmetic in PyTorch ops: ``relu(relu(x*s1+b1) @ w * s2 + b2)`` over channels (``w``: [K, N])."""
    a = torch.relu(x.float() * scale1.view(1, -1, 1, 1) + shift1.view(1, -1, 1, 1)).to(x.dtype)
    y = torch.einsum("nkhw,ko->nohw", a.float(), w.float())
    out = torch.relu(y * scale2.view(1, -1, 1, 1) + shift2.view(1, -1, 1, 1))
    return out.to(x.dtype).contiguous(memory_format=torch.channels_last)


def conv3x3_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight (cout, cin, 3, 3) as the conv kernel reads it: [9 * cin, cout], tap-major."""
    cout, cin = weight.shape[:2]
    return weight.detach().permute(2, 3, 1, 0).reshape(9 * cin, cout).contiguous()


def conv3x3_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``conv2d(x, weight, padding=1)`` from ``conv3x3_weight``'s layout, in PyTorch ops."""
    cin, cout = x.shape[1], w.shape[1]
    weight = w.reshape(3, 3, cin, cout).permute(3, 2, 0, 1)
    return torch.nn.functional.conv2d(x, weight.to(x.dtype), padding=1)


if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction

    def _wrap(kernel: Any) -> Any:
        """``wrap_triton`` (what lets the compiler trace the launch into a package); the interpreted
        kernel as it is under ``TRITON_INTERPRET=1``, which torch 2.11's ``wrap_triton`` refuses."""
        return kernel if isinstance(kernel, InterpretedFunction) else torch.library.wrap_triton(kernel)

    @triton.jit
    def _bn_relu_store(acc, s2_ptr, b2_ptr, out_ptr, rm, rn, M, N, stride_om):
        s2 = tl.load(s2_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        out = tl.maximum(acc * s2[None, :] + b2[None, :], 0.0)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip

    #: Split-K: at least this many steps of the reduction per program, so the tile's last program
    #: sums a few partial tiles only (summing one per step made batch 1 slower, record
    #: ``...-layer-split-s12.json``); programs past that exit at once.
    MIN_STEPS: tl.constexpr = tl.constexpr(4)

    @triton.jit
    def _store_partial(acc, ws_ptr, cnt_ptr, SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Split-K: this program's partial sum into its own slot of the FP32 workspace (plain stores:
        atomic additions from every program of a tile serialise at the cache); returns how many
        programs of the tile had stored theirs before it (the last, ``SPLIT - 1``, sums them)."""
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        slot = ws_ptr + (tile * SPLIT + tl.program_id(2)) * (BLOCK_M * BLOCK_N)
        tl.store(slot + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], acc)
        tl.debug_barrier()  # every thread's stores before the count (released with it)
        return tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")

    @triton.jit
    def _sum_partials(ws_ptr, cnt_ptr, SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Split-K, the tile's last program: the sum of its SPLIT slots; the counter back to 0."""
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLIT):
            # From L2, where the other programs' stores are (not this multiprocessor's L1).
            total += tl.load(ws_ptr + (tile * SPLIT + s) * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
        tl.store(cnt_ptr + tile, 0)
        return total

    @triton.jit(do_not_specialize=["M", "SPLIT"])
    def _bn_relu_gemm(
        a_ptr, w_ptr, s1_ptr, b1_ptr, s2_ptr, b2_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, stride_am, stride_wk, stride_wn, stride_om, SPLIT,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Rows are pixels (M = batch x height x width), columns output channels; the channel
        # (K) dimension of ``a`` and of the output is contiguous (channels-last). SPLIT programs
        # share one output tile, each a contiguous range of K (split-K: few pixels, as at batch 1,
        # still spread over the GPU); SPLIT = 1 finishes each tile in one program.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        split = tl.minimum(SPLIT, tl.cdiv(tl.cdiv(K, BLOCK_K), MIN_STEPS))  # programs with work (MIN_STEPS)
        if tl.program_id(2) >= split:
            return
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), split) * BLOCK_K
        k_start = tl.program_id(2) * per
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(K, k_start + per), BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)  # fmt: skip
            # Past K the scale and shift load as 0, so the padded columns stay relu(0) = 0.
            s1 = tl.load(s1_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            b1 = tl.load(b1_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            a = tl.maximum(a.to(tl.float32) * s1[None, :] + b1[None, :], 0.0).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)  # fmt: skip
            acc = tl.dot(a, w, acc)
        if split == 1:
            _bn_relu_store(acc, s2_ptr, b2_ptr, out_ptr, rm, rn, M, N, stride_om)
        elif _store_partial(acc, ws_ptr, cnt_ptr, split, BLOCK_M, BLOCK_N) == split - 1:
            total = _sum_partials(ws_ptr, cnt_ptr, split, BLOCK_M, BLOCK_N)
            _bn_relu_store(total, s2_ptr, b2_ptr, out_ptr, rm, rn, M, N, stride_om)

    def _split(m: Any, block_m: int, block_n: int, cols: int, split_target: int) -> Any:
        """Programs per output tile: enough to reach ``split_target`` programs in all (1 when the
        tiles alone do, or when 0). ``m`` may be symbolic (a dynamic batch under export): plain
        integer arithmetic, so the choice becomes part of the package's grid, not a guard."""
        if not split_target:
            return 1
        if block_m * block_n > WORKSPACE_TILE:
            raise ValueError(f"split-K tiles hold at most {WORKSPACE_TILE} values, got {block_m}x{block_n}")
        tiles = triton.cdiv(m, block_m) * triton.cdiv(cols, block_n)
        return triton.cdiv(split_target, tiles)

    def launch(
        buf: torch.Tensor, k: int, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor,
        scale2: torch.Tensor, shift2: torch.Tensor, block_m: int, block_k: int = 64, warps: int = 0, stages: int = 3,
        split_target: int = 0, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Run the Triton kernel on the first ``k`` channels of ``buf`` (CUDA tensors, or CPU ones under
        ``TRITON_INTERPRET=1``): tiles of ``block_m`` pixels x 128 output channels (64 for at most 64), ``block_k``
        input channels a step, ``warps`` (0: 4 up to 64-pixel tiles, else 8), ``stages`` of pipelining;
        ``split_target``: split K until about that many programs run (``split_workspace``'s tensors);
        into ``out`` (channels-last, rows ``stride(3)`` apart) when given, else a new tensor."""
        n, _, h, wd = buf.shape
        cols = w.shape[1]
        if out is None:
            out = empty_channels_last(n, cols, h, wd, dtype=buf.dtype, device=buf.device)
        m = n * h * wd
        # One column tile up to 128 channels: each column tile reads its rows of ``buf`` again, so a
        # channel-pruned layer's 88 columns in two 64-wide tiles read the block buffer twice (the
        # pruned package ran 0.53x its unpruned base at batch 32 that way, ``issue4-pruned-pairs-s14``).
        block_n = 128 if cols > 64 else 64
        split = _split(m, block_m, block_n, cols, split_target if workspace is not None else 0)
        ws, cnt = workspace if workspace is not None else (out, out)  # unused when split is 1
        grid = (triton.cdiv(m, block_m), triton.cdiv(cols, block_n), split)
        _wrap(_bn_relu_gemm)[grid](
            buf, w, scale1, shift1, scale2, shift2, out, ws, cnt, m, cols, k, buf.stride(3), w.stride(0), w.stride(1),
            out.stride(3), split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps or (4 if block_m <= 64 else 8), num_stages=stages,
        )  # fmt: skip
        return out

    @torch.library.triton_op("densenet::bn_relu_conv1x1", mutates_args=("ws", "cnt"))
    def _bn_relu_conv1x1_op(
        buf: torch.Tensor, k: int, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor,
        scale2: torch.Tensor, shift2: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, block_m: int, block_k: int,
        warps: int, stages: int, split_target: int,
    ) -> torch.Tensor:  # fmt: skip
        """``relu(norm2(conv1x1(relu(norm1(buf[:, :k])))))`` in one kernel; ``buf`` channels-last.
        ``ws``/``cnt``: ``split_workspace``'s (the counters zero before and after)."""
        return launch(buf, k, w, scale1, shift1, scale2, shift2, block_m, block_k, warps, stages, split_target,
                      (ws, cnt))  # fmt: skip

    @torch.library.triton_op("densenet::bn_relu_conv1x1_into", mutates_args=("out", "ws", "cnt"))
    def _bn_relu_conv1x1_into_op(
        buf: torch.Tensor, k: int, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor,
        scale2: torch.Tensor, shift2: torch.Tensor, out: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor,
        block_m: int, block_k: int, warps: int, stages: int, split_target: int,
    ) -> None:  # fmt: skip
        """The same kernel writing into ``out`` (a channels-last tensor, or channel slice of one) it is given."""
        launch(buf, k, w, scale1, shift1, scale2, shift2, block_m, block_k, warps, stages, split_target, (ws, cnt),
               out)  # fmt: skip

    @triton.jit
    def _copy_rows(src_ptr, dst_ptr, M, G, C0, stride_src, stride_dst, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rg = tl.arange(0, BLOCK_G)
        mask = (rm[:, None] < M) & (rg[None, :] < G)
        v = tl.load(src_ptr + rm[:, None] * stride_src + rg[None, :], mask=mask)
        tl.store(dst_ptr + C0 + rm[:, None] * stride_dst + rg[None, :], v, mask=mask)

    def launch_write(buf: torch.Tensor, y: torch.Tensor, c: int) -> None:
        """``buf[:, c : c + y.shape[1]] = y`` by the Triton copy kernel (both channels-last)."""
        n, g, h, wd = y.shape
        m = n * h * wd
        block_g = triton.next_power_of_2(g)
        block_m = max(16, 4096 // block_g)
        _wrap(_copy_rows)[(triton.cdiv(m, block_m),)](
            y, buf, m, g, c, y.stride(3), buf.stride(3), BLOCK_M=block_m, BLOCK_G=block_g
        )

    @torch.library.triton_op("densenet::write_channels", mutates_args=("buf",))
    def _write_channels_op(buf: torch.Tensor, y: torch.Tensor, c: int) -> None:
        """``buf[:, c : c + y.shape[1]] = y``, both channels-last, as a mutation the compiler sees as one."""
        launch_write(buf, y, c)

    @triton.jit(do_not_specialize=["M", "SPLIT"])
    def _conv3x3(
        x_ptr, w_ptr, out_ptr, ws_ptr, cnt_ptr, M, H, W, C0, stride_xm, stride_om, SPLIT, CIN: tl.constexpr,
        COUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ROW_TAPS: tl.constexpr = False,
    ):  # fmt: skip
        # An implicit GEMM: rows are output pixels, columns output channels, and the reduction runs
        # over 9 taps x CIN input channels (weights as [9 * CIN, COUT], tap-major). A tap's rows are
        # the neighbouring pixels' rows of ``x`` (channels-last, so one row step per pixel), zero
        # outside the image (padding 1). The result goes straight into the block buffer's channels
        # C0 .. C0 + COUT (``out`` rows ``stride_om`` apart): no copy afterwards. SPLIT programs
        # share a tile, each a range of the reduction, as in ``_bn_relu_gemm``.
        # ROW_TAPS (``x`` exactly CIN channels wide): a row of taps (dw = -1, 0, 1) is one span of
        # 3 * CIN contiguous values of ``x``, as are its weights' rows, so the reduction steps through
        # 3 spans instead of 9 taps; with CIN not a multiple of BLOCK_K (a pruned layer's 80 channels)
        # that is fewer, fuller steps (80 channels: 12 steps of 64 instead of 18, 9 of those a quarter full).
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        hw = rm % (H * W)
        h = hw // W
        w = hw % W
        SPAN: tl.constexpr = 3 * CIN if ROW_TAPS else CIN
        GROUPS: tl.constexpr = 3 if ROW_TAPS else 9
        steps: tl.constexpr = (SPAN + BLOCK_K - 1) // BLOCK_K
        split = tl.minimum(SPLIT, tl.cdiv(GROUPS * steps, MIN_STEPS))
        if tl.program_id(2) >= split:
            return
        per = tl.cdiv(GROUPS * steps, split)
        start = tl.program_id(2) * per
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(start, tl.minimum(GROUPS * steps, start + per)):
            g = i // steps
            kk = (i % steps) * BLOCK_K + rk  # within the tap's (or row's) span
            if ROW_TAPS:
                dh = g - 1
                dw = kk // CIN - 1
                ww = w[:, None] + dw[None, :]
                ok = ((rm < M) & (h + dh >= 0) & (h + dh < H))[:, None] & (ww >= 0) & (ww < W)
                rows = x_ptr + (rm + dh * W - 1)[:, None] * CIN  # the row's first tap (dw = -1)
            else:
                dh = g // 3 - 1
                dw = g % 3 - 1
                ok = ((rm < M) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W))[:, None]
                rows = x_ptr + (rm + dh * W + dw)[:, None] * stride_xm
            a = tl.load(rows + kk[None, :], mask=ok & (kk[None, :] < SPAN), other=0.0)
            b = tl.load(w_ptr + (g * SPAN + kk)[:, None] * COUT + rn[None, :],
                        mask=(kk[:, None] < SPAN) & (rn[None, :] < COUT), other=0.0)  # fmt: skip
            acc = tl.dot(a, b, acc)
        mask = (rm[:, None] < M) & (rn[None, :] < COUT)
        dst = out_ptr + C0 + rm[:, None] * stride_om + rn[None, :]
        if split == 1:
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
        elif _store_partial(acc, ws_ptr, cnt_ptr, split, BLOCK_M, BLOCK_N) == split - 1:
            total = _sum_partials(ws_ptr, cnt_ptr, split, BLOCK_M, BLOCK_N)
            tl.store(dst, total.to(out_ptr.dtype.element_ty), mask=mask)

    def launch_conv3x3(
        buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: int, block_m: int = 64, block_k: int = 64,
        warps: int = 4, stages: int = 3, split_target: int = 0,
        workspace: tuple[torch.Tensor, torch.Tensor] | None = None, taps: bool | None = None,
    ) -> None:  # fmt: skip
        """``buf[:, c : c + cout] = conv2d(x, w, padding=1)`` by the Triton kernel; ``x`` and ``buf``
        channels-last, ``w`` as ``conv3x3_weight`` lays it out ([9 * cin, cout]). ``taps``: step
        through rows of taps or not (``row_taps``; default: as ``row_taps`` says; True where it
        does not apply is an error)."""
        if taps is None:
            taps = row_taps(x, block_k)
        elif taps and not _channels_dense(x):
            raise ValueError(f"rows of taps need x exactly {x.shape[1]} channels wide, got rows {x.stride(3)} apart")
        n, cin, h, wd = x.shape
        cout = w.shape[1]
        m = n * h * wd
        block_n = max(16, triton.next_power_of_2(cout))
        split = _split(m, block_m, block_n, cout, split_target if workspace is not None else 0)
        ws, cnt = workspace if workspace is not None else (buf, buf)  # unused when split is 1
        _wrap(_conv3x3)[(triton.cdiv(m, block_m), 1, split)](
            x, w, buf, ws, cnt, m, h, wd, c, x.stride(3), buf.stride(3), split, CIN=cin, COUT=cout, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, ROW_TAPS=taps, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    @torch.library.triton_op("densenet::conv3x3_into", mutates_args=("buf", "ws", "cnt"))
    def _conv3x3_into_op(
        buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: int, ws: torch.Tensor, cnt: torch.Tensor,
        block_m: int, block_k: int, warps: int, stages: int, split_target: int,
    ) -> None:  # fmt: skip
        """``buf[:, c : c + cout] = conv2d(x, w, padding=1)`` in one kernel, written in place."""
        launch_conv3x3(buf, x, w, c, block_m, block_k, warps, stages, split_target, (ws, cnt))

    @_conv3x3_into_op.register_kernel("cpu")
    def _conv3x3_into_cpu(
        buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: int, ws: torch.Tensor, cnt: torch.Tensor,
        block_m: int, block_k: int, warps: int, stages: int, split_target: int,
    ) -> None:  # fmt: skip
        buf[:, c : c + w.shape[1]] = conv3x3_reference(x, w)

    @_write_channels_op.register_kernel("cpu")
    def _write_channels_cpu(buf: torch.Tensor, y: torch.Tensor, c: int) -> None:
        buf[:, c : c + y.shape[1]] = y

    @_bn_relu_conv1x1_into_op.register_kernel("cpu")
    def _bn_relu_conv1x1_into_cpu(
        buf: torch.Tensor, k: int, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor,
        scale2: torch.Tensor, shift2: torch.Tensor, out: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor,
        block_m: int, block_k: int, warps: int, stages: int, split_target: int,
    ) -> None:  # fmt: skip
        out.copy_(reference(buf[:, :k], w, scale1, shift1, scale2, shift2))

    @_bn_relu_conv1x1_op.register_kernel("cpu")
    def _bn_relu_conv1x1_cpu(
        buf: torch.Tensor, k: int, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor,
        scale2: torch.Tensor, shift2: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, block_m: int, block_k: int,
        warps: int, stages: int, split_target: int,
    ) -> torch.Tensor:  # fmt: skip
        return reference(buf[:, :k], w, scale1, shift1, scale2, shift2)


#: A kernel configuration: pixels a tile, channels a step, warps, pipeline stages, and the split-K
#: target (split the reduction until about that many programs run; 0: never).
Config = tuple[int, int, int, int, int]

#: Values one split-K partial tile holds in the workspace (``split_workspace``): 64 pixels x 128 channels.
WORKSPACE_TILE = 64 * 128

#: The layer kernel's configuration per dense block of DenseNet-121, from ``benchmarks/kernel_bench.py``
#: on the H100 (records ``...-kernels-s11.json``, ``...-layer-split3-s12.json``): 64x64 tiles, the
#: fastest at batch 128 (1.61 ms for the four blocks against 1.43 ms of cuBLAS products that do not
#: normalise their input); split-K in blocks 3 and 4, where batch 1 has a few tiles only (0.30 ms
#: instead of 0.33 there), with block 4's target below its 98 tiles at batch 128 (splitting
#: them took 0.196 ms instead of 0.145). Block 3's target is 96, not 264: at batch 1 both split its 4
#: tiles as far as its reduction allows (4 programs a tile, ``MIN_STEPS``), while 264 also split
#: batch 32's 98 tiles in 3, at 0.338 ms for the block against 0.194 unsplit (``layer-b32-s14``).
#: A network with more blocks uses the last one for the rest.
BLOCK_CONFIGS: tuple[Config, ...] = ((64, 64, 4, 3, 0), (64, 64, 4, 3, 0), (64, 64, 4, 3, 96), (64, 64, 4, 3, 96))

#: The 3x3 convolution kernel's configuration per dense block (``benchmarks/kernel_bench.py --kernel
#: conv3x3``, records ``...-conv3x3-s12.json``, ``...-conv3x3-split3-s12.json``): at batch 128 1.82
#: ms for the four blocks against cuDNN's 1.91 before the copy into the buffer this kernel does not
#: need (2.32 with it); at batch 1 0.33 against 0.48 (0.60 with the copies). 128-pixel tiles in
#: block 1 give up 2 % at batch 128 against 256 for a third less at batch 1.
CONV_CONFIGS: tuple[Config, ...] = ((128, 64, 4, 3, 132), (64, 64, 4, 3, 132), (64, 64, 4, 3, 132), (64, 64, 4, 3, 96))


def split_target(configs: tuple[Config, ...]) -> int:
    """The largest split-K target of ``configs`` (what ``split_workspace`` is sized for)."""
    return max((cfg[4] for cfg in configs), default=0)


def split_workspace(device: torch.device, target: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The FP32 workspace (partial tiles) and zeroed per-tile counters the split-K kernels share
    (each call leaves the counters zero again, so one pair serves every layer of a forward in turn),
    for configurations whose split targets are at most ``target`` (``split_target``); ``None`` where
    the kernels do not run (no Triton, not a CUDA device, or no split). A kernel splits only while
    its tiles number fewer than the target T, into ceil(T / tiles) programs a tile: fewer than 2T
    partial tiles, T counters."""
    if triton is None or device.type != "cuda" or not target:
        return None
    return (torch.empty(2 * target * WORKSPACE_TILE, device=device, dtype=torch.float32),
            torch.zeros(target, device=device, dtype=torch.int32))  # fmt: skip


def _workspace_args(
    workspace: tuple[torch.Tensor, torch.Tensor] | None, config: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    if workspace is None:  # no split: any tensors stand in (the kernel does not touch them)
        return torch.empty(0, device=device), torch.empty(0, device=device, dtype=torch.int32), 0
    return workspace[0], workspace[1], config[4]


def bn_relu_conv1x1(
    buf: torch.Tensor, k: int, w: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor, scale2: torch.Tensor,
    shift2: torch.Tensor, config: Config = BLOCK_CONFIGS[1],
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``relu(norm2(conv1x1(relu(norm1(buf[:, :k])))))``: the Triton op on a CUDA tensor where Triton is
    present, else ``reference`` (also what the op's own CPU kernel runs). ``buf``: (N, C, H, W)
    channels-last; ``w``: [k, out channels], out channels contiguous; ``workspace``:
    ``split_workspace``'s (without it the kernel never splits K); ``out``: write there (a
    channels-last tensor or channel slice of one, through the mutating op ``bn_relu_conv1x1_into``)
    instead of into a new tensor.

    The whole buffer goes in, not ``buf[:, :k]``: the compiler hands a user kernel a channel slice
    as a contiguous copy (on the H100 those copies took a third of a batch-128 forward). With ``out``
    (one bottleneck tensor per dense block) the package ran batch 128 at 28,402 img/s against 25,738
    with a new tensor per layer (record ``...-issue4-nofill-mids-s13.json``)."""
    if not rows_dense(buf):
        raise ValueError(f"bn_relu_conv1x1 needs a dense channels-last buffer, got strides {buf.stride()}")
    if out is not None and not rows_dense(out):
        raise ValueError(f"bn_relu_conv1x1 needs a channels-last out, got strides {out.stride()}")
    if triton is None or buf.device.type != "cuda":
        ref = reference(buf[:, :k], w, scale1, shift1, scale2, shift2)
        return ref if out is None else out.copy_(ref)
    ws, cnt, split_target = _workspace_args(workspace, config, buf.device)
    if out is not None:
        torch.ops.densenet.bn_relu_conv1x1_into(buf, k, w, scale1, shift1, scale2, shift2, out, ws, cnt,
                                                *config[:4], split_target)  # fmt: skip
        return out
    new: torch.Tensor = torch.ops.densenet.bn_relu_conv1x1(
        buf, k, w, scale1, shift1, scale2, shift2, ws, cnt, *config[:4], split_target
    )
    return new


def conv3x3_into(
    buf: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: int, config: Config = CONV_CONFIGS[1],
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """``buf[:, c : c + cout] = conv2d(x, weight, padding=1)`` with ``w = conv3x3_weight(weight)``:
    on a CUDA tensor one Triton kernel that writes its result into the buffer (no output tensor, no
    copy); else PyTorch's convolution and a slice assignment. ``buf`` and ``x`` channels-last."""
    if not (rows_dense(buf) and rows_dense(x)):
        raise ValueError(f"conv3x3_into needs dense channels-last tensors, got strides {buf.stride()}, {x.stride()}")
    if triton is None or buf.device.type != "cuda":
        buf[:, c : c + w.shape[1]] = conv3x3_reference(x, w)
        return
    ws, cnt, split_target = _workspace_args(workspace, config, buf.device)
    torch.ops.densenet.conv3x3_into(buf, x, w, c, ws, cnt, *config[:4], split_target)


def _channels_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` (channels-last) is exactly its channels wide: neighbouring pixels' channels are then
    one contiguous span, and so is a row of 3x3 taps."""
    return bool(x.stride(3) == x.shape[1])


def row_taps(x: torch.Tensor, block_k: int) -> bool:
    """Whether the 3x3 kernel steps through ``x`` a row of taps at a time (``_conv3x3``'s
    ``ROW_TAPS``): where ``x`` is exactly its channels wide (:func:`_channels_dense`) and that takes
    fewer steps of ``block_k`` channels than tap by tap (channels not a multiple of it)."""
    cin = x.shape[1]
    return _channels_dense(x) and 3 * -(-3 * cin // block_k) < 9 * -(-cin // block_k)


def write_channels(buf: torch.Tensor, y: torch.Tensor, c: int) -> None:
    """``buf[:, c : c + y.shape[1]] = y`` (both channels-last). On a CUDA tensor a Triton op that
    mutates ``buf`` in place: written as a slice assignment, the compiler turns each layer's write
    into a new copy of the whole block buffer when a user kernel reads it."""
    if triton is None or buf.device.type != "cuda":
        buf[:, c : c + y.shape[1]] = y
        return
    torch.ops.densenet.write_channels(buf, y.contiguous(memory_format=torch.channels_last), c)


def rows_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` (N, C, H, W) is channels-last with pixels ``stride(3)`` apart: what the kernel indexes."""
    s = x.stride()
    _, _, h, w = x.shape  # never the batch: a symbolic size under export with a dynamic batch
    return bool(s[1] == 1 and s[2] == w * s[3] and s[0] == h * w * s[3])
