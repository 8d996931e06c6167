"""Block-scaled FP8 GEMM (notebook 08): the activation A [M, K] cut into 1×128 tiles, each with its float32 scale
a_s [M, K/128]; the weight B [N, K] cut into 128×128 blocks, each with its scale b_s [N/128, K/128]; and one output
tile C[BLOCK_M, BLOCK_N] accumulated over K in 128-wide steps: the FP8 tensor-core product of a step (limited-precision
sums) multiplied by a_s[m, kb] · b_s[n-block, kb] and promoted into a float32 accumulator."""

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

ACT, ACT_HI = "#dbe6f1", "#8fb0d0"          # activations, and the tiles of the current step
WGT, WGT_HI = "#f4e4c8", "#d9a55b"          # weights
SCALE, SCALE_HI = "#e3ead8", "#9fb98a"      # float32 scales
ACC, MMA, BAND, EDGE = "#eeeeee", "#e4e0ec", "#b5524a", "#444444"
KB = 2                                      # the K step drawn as current
ROWS = range(2, 6)                          # the rows of A in the output tile (BLOCK_M)
NBLK = 1                                    # the block row of B in the output tile (BLOCK_N = 128)


def grid(ax, x0, y_top, n_rows, n_cols, w, h, color, hi, hi_cells, lw=0.6):
    """n_rows × n_cols cells of w × h inches from the top-left corner (x0, y_top); hi_cells in colour hi."""
    for r in range(n_rows):
        for c in range(n_cols):
            ax.add_patch(Rectangle((x0 + c * w, y_top - (r + 1) * h), w, h, fc=hi if (r, c) in hi_cells else color,
                                   ec=EDGE, lw=lw))


def band(ax, x0, y0, w, h):
    """The outline of the rows (or block row) that the output tile reads."""
    ax.add_patch(Rectangle((x0, y0), w, h, fill=False, ec=BAND, lw=1.8, ls="--", zorder=5))


def box(ax, x0, y0, w, h, text, color, size=9.5):
    ax.add_patch(FancyBboxPatch((x0, y0), w, h, boxstyle="round,pad=0,rounding_size=0.08", fc=color, ec=EDGE, lw=1.0))
    ax.text(x0 + w / 2, y0 + h / 2, text, ha="center", va="center", fontsize=size, linespacing=1.4)


def arrow(ax, start, end, rad=0.0, **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=EDGE, lw=1.1,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0, **kw))


def figure():
    fig = plt.figure(figsize=(10, 5.3))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 5.3)
    ax.axis("off")
    top = 4.95                                         # top edge of the four grids

    # A [M, K]: 8 rows × 6 tiles of 1×128, and its scales a_s [M, K/128]
    tw, th = 0.46, 0.2                                 # one 1×128 tile: wide and one row high
    hi_a = {(r, KB) for r in ROWS}
    grid(ax, 0.3, top, 8, 6, tw, th, ACT, ACT_HI, hi_a)
    band(ax, 0.3, top - 6 * th, 6 * tw, 4 * th)
    ax.text(0.3, top + 0.25, "A  [M, K]  activations, e4m3", fontsize=10, fontweight="bold", va="center")
    ax.text(0.3 + 3 * tw, top - 8 * th - 0.2, "each cell: one 1×128 tile (one row)", fontsize=9, ha="center",
            va="center")
    ax.text(0.3 + 6 * tw + 0.07, top - 4 * th, "BLOCK_M\nrows", fontsize=9, color=BAND, ha="left", va="center")
    sw = 0.2                                           # a scale cell
    grid(ax, 3.35, top, 8, 6, sw, th, SCALE, SCALE_HI, hi_a)
    ax.text(3.35, top + 0.25, "a_s  [M, K/128]", fontsize=10, fontweight="bold", va="center")
    ax.text(3.35 + 3 * sw, top - 8 * th - 0.2, "float32, one per tile", fontsize=9, ha="center", va="center")

    # B [N, K]: 3 block rows × 6 blocks of 128×128, and its scales b_s [N/128, K/128]
    bw, bx = 0.46, 5.35                                # a block is square: 128 × 128
    hi_b = {(NBLK, KB)}
    grid(ax, bx, top, 3, 6, bw, bw, WGT, WGT_HI, hi_b)
    band(ax, bx, top - 2 * bw, 6 * bw, bw)
    ax.text(bx, top + 0.25, "B  [N, K]  weight, e4m3", fontsize=10, fontweight="bold", va="center")
    ax.text(bx + 3 * bw, top - 3 * bw - 0.2, "each cell: one 128×128 block", fontsize=9, ha="center", va="center")
    ax.text(bx - 0.07, top - 1.5 * bw, "BLOCK_N\n= 128", fontsize=9, color=BAND, ha="right", va="center")
    grid(ax, 8.45, top, 3, 6, sw, bw, SCALE, SCALE_HI, hi_b)
    ax.text(8.45, top + 0.25, "b_s  [N/128, K/128]", fontsize=10, fontweight="bold", va="center")
    ax.text(8.45 + 3 * sw, top - 3 * bw - 0.2, "float32, one per block", fontsize=9, ha="center", va="center")
    for x in (0.3 + (KB + 0.5) * tw, 3.35 + (KB + 0.5) * sw, bx + (KB + 0.5) * bw, 8.45 + (KB + 0.5) * sw):
        ax.text(x, top + 0.02, "kb", fontsize=9, ha="center", va="bottom", color=EDGE)
    ax.text(5.0, 2.85, "dashed: the rows of one output tile;  dark: what its K step kb reads", fontsize=9,
            ha="center", va="center", style="italic")

    # one K step of the output tile, left to right, and the loop over K
    y0, h = 1.0, 1.3
    box(ax, 0.3, y0 + 0.7, 2.0, 0.6, "A_q  [BLOCK_M, 128]", ACT_HI)
    box(ax, 0.3, y0, 2.0, 0.6, "B_q  [BLOCK_N, 128]", WGT_HI)
    box(ax, 2.75, y0, 2.35, h, "tensor cores (wgmma)\nP = A_q · B_qᵀ\n[BLOCK_M, BLOCK_N]\nlimited-precision sums", MMA)
    box(ax, 5.55, y0, 2.2, h, "promotion (CUDA cores)\nacc += P · a_s[m, kb]\n· b_s[n-block, kb]\nfloat32", SCALE)
    box(ax, 8.2, y0, 1.5, h, "output tile\nC[BLOCK_M,\nBLOCK_N] = acc", ACC)
    arrow(ax, (2.3, y0 + 1.0), (2.75, y0 + 0.8))
    arrow(ax, (2.3, y0 + 0.3), (2.75, y0 + 0.5))
    for xa, xb in ((5.1, 5.55), (7.75, 8.2)):
        arrow(ax, (xa, y0 + h / 2), (xb, y0 + h / 2))
    arrow(ax, (6.65, y0), (1.3, y0), rad=-0.2)
    ax.text(4.0, 0.2, "next kb: K/128 steps of 128; after the last, acc is stored", fontsize=9, ha="center",
            va="center")
    ax.text(6.65, y0 + h + 0.1, "after every 128 products", fontsize=9, ha="center", va="bottom", style="italic")
    return fig
