"""The whole DeepSeek-V3 `Transformer`, bottom to top: token ids → Embedding → n_layers × Block (RMSNorm → MLA
→ +, RMSNorm → dense SwiGLU MLP in the first n_dense_layers layers, MoE in the others → +) → final RMSNorm → Head
→ logits. Beside it, the sizes of the "tiny" and "671B" presets, read from `ModelArgs.preset`."""

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle

from dsv3_lite.config import ModelArgs

ATTN, FFN, NORM, EDGE = "#c9daea", "#f2dcb8", "#dfe6d3", "#444444"
MONO = "DejaVu Sans Mono"
X0, X1 = 0.7, 4.1                      # left and right edge of the main column (inches)
XC = (X0 + X1) / 2


def box(ax, x0, y, x1, h, text, color, size=10, **kw):
    """A rounded box from x0 to x1 centred vertically on y, with centred text."""
    ax.add_patch(FancyBboxPatch((x0, y - h / 2), x1 - x0, h, boxstyle="round,pad=0,rounding_size=0.08",
                                fc=color, ec=EDGE, lw=1.0, **kw))
    ax.text((x0 + x1) / 2, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, **kw):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=EDGE, lw=1.0, shrinkA=0,
                                                          shrinkB=0, **kw))


def plus(ax, y):
    ax.add_patch(Circle((XC, y), 0.13, fc="white", ec=EDGE, lw=1.0))
    ax.text(XC, y - 0.01, "+", ha="center", va="center", fontsize=11)


def figure():
    tiny, big = ModelArgs.preset("tiny"), ModelArgs.preset("671B")
    fig = plt.figure(figsize=(9.6, 9.4))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 9.6)
    ax.set_ylim(0, 9.4)
    ax.axis("off")

    # the main column, bottom to top
    ax.text(XC, 0.3, "token ids  [B, S]", ha="center", va="center", fontsize=10)
    box(ax, X0, 1.0, X1, 0.5, "Embedding  (embed)", NORM)
    ax.add_patch(FancyBboxPatch((0.2, 1.6), 4.3, 5.05, boxstyle="round,pad=0,rounding_size=0.12", fc="#f7f7f7",
                                ec="#888888", lw=1.0, ls="--", zorder=-1))
    ax.text(0.3, 6.5, "Block  × n_layers", ha="left", va="center", fontsize=10, fontweight="bold")
    box(ax, X0, 2.05, X1, 0.4, "RMSNorm  (attn_norm)", NORM)
    box(ax, X0, 2.8, X1, 0.6, "MLA: multi-head latent attention\n(attn)", ATTN)
    plus(ax, 3.45)
    box(ax, X0, 4.0, X1, 0.4, "RMSNorm  (ffn_norm)", NORM)
    xm = 2.0                                                            # dense MLP | MoE split
    box(ax, X0, 5.25, xm - 0.1, 1.35, "dense\nSwiGLU MLP\n\nfirst\nn_dense_layers", FFN, size=9)
    ax.add_patch(FancyBboxPatch((xm + 0.05, 4.575), X1 - xm - 0.05, 1.35, boxstyle="round,pad=0,rounding_size=0.08",
                                fc=FFN, ec=EDGE, lw=1.0))
    ax.text((xm + X1) / 2, 5.75, "MoE  (the other layers)", ha="center", va="center", fontsize=9)
    box(ax, xm + 0.25, 4.82, X1 - 0.2, 0.3, "Gate: scores, top-k", FFN, size=9)
    ex = [xm + 0.25 + 0.19 * i for i in range(8)]                      # routed experts, the top-k filled
    for i, x in enumerate(ex):
        ax.add_patch(Rectangle((x - 0.07, 5.3), 0.14, 0.22, fc="#d9a55b" if i in (2, 5) else "white", ec=EDGE, lw=0.8))
    ax.add_patch(Rectangle((X1 - 0.4, 5.3), 0.2, 0.22, fc="#b98a4a", ec=EDGE, lw=0.8))
    ax.text((ex[0] + ex[-1]) / 2, 5.15, "routed", ha="center", va="center", fontsize=9)
    ax.text(X1 - 0.3, 5.15, "shared", ha="center", va="center", fontsize=9)
    plus(ax, 6.25)
    box(ax, X0, 7.05, X1, 0.4, "RMSNorm  (norm)", NORM)
    box(ax, X0, 7.8, X1, 0.5, "Head (untied): Linear  dim → vocab_size", NORM)
    ax.text(XC, 8.5, "logits  [B, S, V]  (float32)", ha="center", va="center", fontsize=10)

    # the data path and the two residual branches
    for y0, y1 in [(0.45, 0.75), (1.25, 1.85), (2.25, 2.5), (3.1, 3.32), (3.58, 3.8), (6.38, 6.85), (7.25, 7.55),
                   (8.05, 8.35)]:
        arrow(ax, (XC, y0), (XC, y1))
    arrow(ax, (XC, 4.2), (1.3, 4.575))
    arrow(ax, (XC, 4.2), ((xm + X1) / 2, 4.575))
    arrow(ax, (1.3, 5.925), (XC - 0.1, 6.17))
    arrow(ax, ((xm + X1) / 2, 5.925), (XC + 0.1, 6.17))
    for y0, y1 in [(1.6, 3.45), (3.58, 6.25)]:                          # h + f(RMSNorm(h))
        ax.plot([XC, 0.4, 0.4], [y0 + 0.1, y0 + 0.1, y1], color=EDGE, lw=1.0)
        arrow(ax, (0.4, y1), (XC - 0.13, y1))
    ax.text(XC + 0.1, 1.42, "h  [B, S, dim]", ha="left", va="center", fontsize=9)

    # the two presets, read from ModelArgs
    cols = {"tiny": 7.2, "671B": 8.8}
    ax.text(4.85, 9.0, "ModelArgs field", ha="left", va="center", fontsize=10, fontweight="bold")
    for name, x in cols.items():
        ax.text(x, 9.0, f'"{name}"', ha="center", va="center", fontsize=10, fontweight="bold")
    ax.plot([4.8, 9.6], [8.8, 8.8], color="#888888", lw=0.8)

    def dense(a):
        return f"0–{a.n_dense_layers - 1}" if a.n_dense_layers > 1 else "0"

    rows = [  # (y, field names, value function)
        (7.8, "dim → vocab_size", lambda a: f"{a.dim:,} → {a.vocab_size:,}"),
        (6.5, "n_layers", lambda a: f"{a.n_layers}\n(dense {dense(a)}, MoE {a.n_dense_layers}–{a.n_layers - 1})"),
        (5.25, "n_dense_layers\ninter_dim\nn_routed_experts\nn_activated_experts\n"
               "n_shared_experts\nmoe_inter_dim",
         lambda a: f"{a.n_dense_layers}\n{a.inter_dim:,}\n"
                   f"{a.n_routed_experts}\n{a.n_activated_experts}\n{a.n_shared_experts}\n{a.moe_inter_dim:,}"),
        (2.8, "n_heads\nq_lora_rank\nkv_lora_rank", lambda a: f"{a.n_heads}\n{a.q_lora_rank:,}\n{a.kv_lora_rank}"),
        (1.42, "dim", lambda a: f"{a.dim:,}"),
        (1.0, "vocab_size × dim", lambda a: f"{a.vocab_size:,} × {a.dim:,}"),
    ]
    for y, fields, value in rows:
        ax.text(4.85, y, fields, ha="left", va="center", fontsize=9, family=MONO, linespacing=1.35)
        for a, x in zip((tiny, big), cols.values(), strict=True):
            ax.text(x, y, value(a), ha="center", va="center", fontsize=9, linespacing=1.35)
        ax.plot([4.55, 4.8], [y, y], color="#bbbbbb", lw=0.8, ls=":")
    return fig
