"""Multi-token prediction as DeepSeek-V3 trains it (depth 1, `dsv3_lite.mtp`): the main model reads t_1 … t_T and
predicts t_{i+1} from its final-normed states h_i; the MTP module combines hnorm(h_i) with enorm(Emb(t_{i+1})),
projects the concatenation with eh_proj [2·dim → dim], runs one Transformer block and its norm, and predicts t_{i+2}
through the same output head. The embedding and the head are shared (the same weights) by both."""

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

ATTN, FFN, NORM, SHARED, EDGE = "#c9daea", "#f2dcb8", "#dfe6d3", "#e2d6ea", "#444444"
XL, XR = 2.2, 7.0                      # centres of the main model and of the MTP module (inches)
W = 3.0                                # width of their boxes


def box(ax, xc, y, w, h, text, color, size=10, ls="-"):
    """A rounded box centred on (xc, y), with centred text."""
    ax.add_patch(FancyBboxPatch((xc - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                fc=color, ec=EDGE, lw=1.0, ls=ls))
    ax.text(xc, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=EDGE, lw=1.0, shrinkA=0, shrinkB=0))


def tokens(ax, xc, y, first, n, label, left=False):
    """Four token cells t_first … (positions i = 1 … 4) centred on xc; cells past the n-th are dotted and empty."""
    for j in range(4):
        x = xc + (j - 1.5) * 0.62
        box(ax, x, y, 0.5, 0.36, f"$t_{{{first + j}}}$" if j < n else "", "white", ls="-" if j < n else ":")
        if j < n:                      # inputs: up into the embedding; targets: up from the head
            y0, y1 = (y + 0.18, y + 0.62) if y < 1 else (y - 0.6, y - 0.18)
            arrow(ax, (x, y0), (x, y1))
    ax.text(xc - 1.4 if left else xc + 1.4, y, label, ha="right" if left else "left", va="center", fontsize=9)


def figure():
    fig = plt.figure(figsize=(9.8, 7.4))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 9.8)
    ax.set_ylim(-0.4, 7.0)
    ax.axis("off")

    ax.text(XL, 6.8, "main model", ha="center", va="center", fontsize=11, fontweight="bold")
    ax.text(XR, 6.8, "MTP module, depth 1", ha="center", va="center", fontsize=11, fontweight="bold")

    # main model: t_1 … t_T -> h_1 … h_T -> predictions of t_{i+1}
    tokens(ax, XL, 0.35, 1, 4, "x: $t_i$", left=True)
    box(ax, XL, 1.2, W, 0.45, "Embedding (embed)", SHARED)
    box(ax, XL, 2.9, W, 1.5, "Transformer blocks\n× n_layers\n(MLA, MLP / MoE)", ATTN)
    box(ax, XL, 4.55, W, 0.4, "RMSNorm (norm)", NORM)
    box(ax, XL, 5.45, W, 0.45, "Head (head)", SHARED)
    tokens(ax, XL, 6.25, 2, 4, "y: $t_{i+1}$", left=True)
    for y0, y1 in [(1.43, 2.15), (3.65, 4.35), (4.75, 5.22)]:
        arrow(ax, (XL, y0), (XL, y1))
    ax.text(XL + 0.1, 5.0, "$h_i$ = model.hidden(x)", ha="left", va="bottom", fontsize=9)

    # MTP module: hnorm(h_i) and enorm(Emb(t_{i+1})) -> eh_proj -> block -> norm -> head -> t_{i+2}
    tokens(ax, XR, 0.35, 2, 3, "y[:, :T−1]: $t_{i+1}$")
    box(ax, XR, 1.2, W, 0.45, "Embedding (the same)", SHARED)
    box(ax, XR - 0.8, 2.05, 1.4, 0.4, "hnorm", NORM)
    box(ax, XR + 0.8, 2.05, 1.4, 0.4, "enorm", NORM)
    box(ax, XR, 2.95, W, 0.6, "eh_proj: Linear 2·dim → dim\non [enorm(e) ; hnorm(h)]", FFN, size=9)
    box(ax, XR, 3.8, W, 0.45, "Transformer block (MLA, MoE)", ATTN)
    box(ax, XR, 4.55, W, 0.4, "RMSNorm (shared_head.norm)", NORM)
    box(ax, XR, 5.45, W, 0.45, "Head (the same)", SHARED)
    tokens(ax, XR, 6.25, 3, 3, "y[:, 1:]: $t_{i+2}$")
    for x, y0, y1 in [(XR + 0.8, 1.43, 1.85), (XR - 0.8, 2.25, 2.65), (XR + 0.8, 2.25, 2.65),
                      (XR, 3.25, 3.57), (XR, 4.03, 4.35), (XR, 4.75, 5.22)]:
        arrow(ax, (x, y0), (x, y1))

    # h_1 … h_{T−1} from the main model into hnorm
    ax.plot([XL, 4.6, 4.6, XR - 1.6], [4.97, 4.97, 2.05, 2.05], color=EDGE, lw=1.0)
    arrow(ax, (4.6, 2.05), (XR - 1.5, 2.05))
    ax.text(4.7, 2.3, "$h_1 … h_{T-1}$", ha="left", va="center", fontsize=9)

    # shared modules: one set of weights
    for y in (1.2, 5.45):
        ax.plot([XL + W / 2, XR - W / 2], [y, y], color="#7a5c8c", lw=1.2, ls="--")
        ax.text(4.6, y + 0.14, "shared weights", ha="center", va="bottom", fontsize=9, color="#5c4270")
    note = ("A window of T = 4 inputs: the main model predicts at positions 1 … 4, depth 1 at 1 … 3 "
            "(dotted: at position 4 its target $t_6$ lies outside the window).")
    ax.text(4.6, -0.2, note, ha="center", va="center", fontsize=9, color="#555555")
    return fig
